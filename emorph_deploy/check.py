"""``emorph check``: run an artifact's runner and the PyTorch reference on the same pairs and compare.

Per pair and output:

- ``flow``: max / mean of the per-voxel Euclidean norm ``|flow_artifact − flow_reference|`` in voxels
  and in mm (components scaled by the grid spacing);
- ``warped``: global NCC and PSNR (data range 1) of the artifact's warped moving image vs the
  reference's (computed from the artifact's flow with the torch warp when the graph has no ``warped``);
- labels: the moving labels warped (nearest) by each flow — Dice of one vs the other (agreement), Dice
  of each vs the fixed labels and ``dice_delta = |Dice_artifact − Dice_reference|`` (gated);
- Jacobian: fraction of voxels with J ≤ 0 for each flow and their difference.

The tolerances per precision live in :data:`TOLERANCES` (one table); the check passes when every gated
metric is within its limit on every pair.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emorph_deploy.choices import CheckPrecision, Precision
from emorph_deploy.data.pairs import PairRow, read_pairs
from emorph_deploy.errors import ConfigMismatchError, InputError

#: Gated limits per precision (a :class:`~emorph_deploy.choices.Precision` value): metric name → maximum
#: allowed value (worst pair). max_flow_voxel / mean_flow_voxel: max / mean per-voxel |Δflow| in voxels;
#: dice_delta: |ΔDice| vs fixed labels.
TOLERANCES: dict[str, dict[str, float]] = {
    Precision.fp32.value: {"max_flow_voxel": 1e-3},
    Precision.fp16.value: {"mean_flow_voxel": 0.05, "dice_delta": 0.002},
    Precision.bf16.value: {"mean_flow_voxel": 0.05, "dice_delta": 0.002},
    Precision.int8.value: {"mean_flow_voxel": 0.2, "dice_delta": 0.01},
}
PRECISIONS: tuple[str, ...] = tuple(p.value for p in CheckPrecision)


@dataclass
class CheckPair:
    """One input pair on the model grid: images (D, H, W) float32 in [0, 1], labels (D, H, W) int32 or
    None."""

    name: str
    moving: np.ndarray
    fixed: np.ndarray
    moving_labels: np.ndarray | None = None
    fixed_labels: np.ndarray | None = None


# ------------------------------------------------------------------------------------------------ pairs
def synthetic_pairs(n: int, grid_shape: Sequence[int], seed: int = 0) -> Iterator[CheckPair]:
    """``n`` SynthMorph-style pairs (with labels) from :mod:`emorph_deploy.data.synthetic` at
    ``grid_shape``."""
    if n < 1:
        raise InputError(f"--synthetic expects N >= 1, got {n}")
    from emorph_deploy.data.synthetic import synth_pair

    for i in range(n):
        p = synth_pair(tuple(int(s) for s in grid_shape), seed=seed + i)
        yield CheckPair(f"synthetic-{seed + i}", p.moving, p.fixed, p.moving_labels, p.fixed_labels)


def read_check_pairs(path: str | Path) -> list[PairRow]:
    """The pairs of a pairs CSV (:func:`emorph_deploy.data.pairs.read_pairs`: ``fixed,moving`` and
    optionally ``fixed_labels,moving_labels``, both or neither, per line)."""
    rows = read_pairs(path)
    for row in rows:
        if (row.moving_labels is None) != (row.fixed_labels is None):
            raise InputError(
                f"pairs CSV {path} line {row.line}: expected both moving_labels and fixed_labels or "
                f"neither, got only {'moving' if row.fixed_labels is None else 'fixed'}_labels; "
                "fix: fill in the other or empty both"
            )
    return rows


def csv_pairs(
    path: str | Path, preprocessing: dict[str, Any] | None, grid_shape: Sequence[int]
) -> Iterator[CheckPair]:
    """NIfTI pairs from a CSV, each brought to the model grid by the artifact's ``Preprocessing`` with
    :func:`emorph_deploy.calibration.pairs.load_pair` (the calibration pairs' preprocessing).

    The fixed image defines the grid for both images (and labels, resampled nearest).
    """
    from emorph_deploy.calibration.pairs import load_pair
    from emorph_deploy.data.preprocess import Preprocessing

    if not preprocessing:
        raise InputError(
            "the artifact records no preprocessing, so NIfTI pairs cannot be brought to its grid; "
            "fix: use --synthetic N or re-export from a checkpoint with preprocessing"
        )
    pre = Preprocessing.from_dict(preprocessing)
    if tuple(pre.grid_shape) != tuple(grid_shape):
        raise ConfigMismatchError(
            f"artifact preprocessing grid {tuple(pre.grid_shape)} differs from its model grid "
            f"{tuple(grid_shape)}; fix: re-export the checkpoint"
        )
    for i, row in enumerate(read_check_pairs(path)):
        v = load_pair(pre, row.moving, row.fixed, row.moving_labels, row.fixed_labels)
        yield CheckPair(f"{i}:{row.moving.name}", v.moving, v.fixed, v.moving_labels, v.fixed_labels)


# ------------------------------------------------------------------------------------------------ metrics
def _warp_np(src: np.ndarray, flow: np.ndarray, mode: str) -> np.ndarray:
    """Warp (D, H, W) ``src`` by flow (3, D, H, W) voxels with the package's torch warp (grid_sample)."""
    import torch

    from emorph_deploy.models.warp import warp

    with torch.inference_mode():
        s = torch.from_numpy(np.ascontiguousarray(src, dtype=np.float32))[None, None]
        f = torch.from_numpy(np.ascontiguousarray(flow, dtype=np.float32))[None]
        return warp(s, f, mode=mode).numpy()[0, 0]


def compare_pair(
    art: dict[str, np.ndarray], ref: dict[str, np.ndarray], pair: CheckPair, spacing: Sequence[float]
) -> dict[str, Any]:
    """Metrics of one pair: artifact outputs vs reference outputs (both ``{"flow": (1,3,D,H,W), ...}``)."""
    from emorph_deploy.metrics import (
        fraction_nonpositive_jacobian,
        jacobian_determinant,
        mean_dice,
        ncc_global,
        psnr,
    )

    fa = art["flow"][0].astype(np.float64)  # (3, D, H, W)
    fr = ref["flow"][0].astype(np.float64)
    diff = fa - fr
    sp = np.asarray(spacing, dtype=np.float64).reshape(3, 1, 1, 1)
    d_vox = np.sqrt(np.sum(diff * diff, axis=0))  # (D, H, W)
    d_mm = np.sqrt(np.sum((diff * sp) ** 2, axis=0))
    out: dict[str, Any] = {
        "pair": pair.name,
        "max_flow_voxel": float(d_vox.max()),
        "mean_flow_voxel": float(d_vox.mean()),
        "max_flow_mm": float(d_mm.max()),
        "mean_flow_mm": float(d_mm.mean()),
        "ref_flow_max_voxel": float(np.sqrt(np.sum(fr * fr, axis=0)).max()),
    }
    warped_ref = ref["warped"][0, 0] if "warped" in ref else _warp_np(pair.moving, ref["flow"][0], "bilinear")
    if "warped" in art:
        warped_art, out["warped_source"] = art["warped"][0, 0], "output"
    else:
        warped_art, out["warped_source"] = _warp_np(pair.moving, art["flow"][0], "bilinear"), "from flow"
    out["warped_ncc"] = ncc_global(warped_art, warped_ref)
    out["warped_psnr_db"] = psnr(warped_art, warped_ref, data_range=1.0)
    out["warped_max_abs"] = float(np.abs(warped_art.astype(np.float64) - warped_ref).max())
    if pair.moving_labels is not None and pair.fixed_labels is not None:
        lab_a = np.rint(_warp_np(pair.moving_labels, art["flow"][0], "nearest")).astype(np.int32)
        lab_r = np.rint(_warp_np(pair.moving_labels, ref["flow"][0], "nearest")).astype(np.int32)
        out["dice_agreement"] = mean_dice(lab_a, lab_r)
        out["dice_artifact"] = mean_dice(lab_a, pair.fixed_labels)
        out["dice_reference"] = mean_dice(lab_r, pair.fixed_labels)
        out["dice_delta"] = abs(out["dice_artifact"] - out["dice_reference"])
    jac_a = fraction_nonpositive_jacobian(jacobian_determinant(art["flow"][0], spacing))
    jac_r = fraction_nonpositive_jacobian(jacobian_determinant(ref["flow"][0], spacing))
    out.update(
        {
            "frac_jac_nonpos_artifact": jac_a,
            "frac_jac_nonpos_reference": jac_r,
            "frac_jac_nonpos_delta": jac_a - jac_r,
        }
    )
    return out


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def evaluate(pairs: list[dict[str, Any]], precision: Precision | str) -> tuple[list[dict[str, Any]], bool]:
    """Gate the worst pair of each metric in ``TOLERANCES[precision]``; returns (checks, passed)."""
    precision = str(precision)
    if precision not in TOLERANCES:
        raise InputError(f"precision must be one of {list(TOLERANCES)}, got {precision!r}")
    checks = []
    for metric, limit in TOLERANCES[precision].items():
        values = [p[metric] for p in pairs if metric in p]
        if not values:
            checks.append(
                {
                    "metric": metric,
                    "value": None,
                    "limit": limit,
                    "ok": None,
                    "note": "not measured (pairs without labels)",
                }
            )
            continue
        worst = max(values)
        checks.append(
            {"metric": metric, "value": worst, "limit": limit, "ok": bool(_finite(worst) and worst <= limit)}
        )
    measured = [c for c in checks if c["ok"] is not None]
    passed = bool(measured) and all(c["ok"] for c in measured)
    return checks, passed


def summarise(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Worst/mean over pairs of the main figures."""

    def agg(key: str, fn) -> float | None:
        vals = [p[key] for p in pairs if key in p and p[key] is not None]
        return float(fn(vals)) if vals else None

    return {
        "max_flow_voxel": agg("max_flow_voxel", max),
        "mean_flow_voxel": agg("mean_flow_voxel", np.mean),
        "max_flow_mm": agg("max_flow_mm", max),
        "mean_flow_mm": agg("mean_flow_mm", np.mean),
        "warped_ncc_min": agg("warped_ncc", min),
        "warped_psnr_db_min": agg("warped_psnr_db", min),
        "dice_agreement_min": agg("dice_agreement", min),
        "dice_delta_max": agg("dice_delta", max),
        "frac_jac_nonpos_delta_max_abs": agg("frac_jac_nonpos_delta", lambda v: max(abs(x) for x in v)),
    }


# ------------------------------------------------------------------------------------------------ driver
def resolve_reference(artifact_meta: dict[str, Any], reference: str | Path | None) -> Path:
    """``--reference`` or the manifest's ``source_checkpoint``; InputError if neither exists."""
    if reference is not None:
        return Path(reference)
    src = artifact_meta.get("source_checkpoint")
    if not src:
        raise InputError(
            "no reference checkpoint: the artifact's manifest records no source_checkpoint; "
            "fix: pass --reference CHECKPOINT"
        )
    if not Path(src).with_suffix(".safetensors").is_file():
        raise InputError(
            f"reference checkpoint {src} recorded in the manifest is missing; "
            "fix: pass --reference CHECKPOINT"
        )
    return Path(src)


def resolve_precision(precision: CheckPrecision | str, artifact_meta: dict[str, Any]) -> str:
    """The tolerance set's name: ``precision``, or the artifact's recorded precision for ``auto``."""
    precision = str(precision)
    if precision == CheckPrecision.auto:
        precision = str(artifact_meta.get("precision", "fp32"))
    if precision not in TOLERANCES:
        raise InputError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def check_grids(artifact_runner, reference_runner) -> None:
    if tuple(artifact_runner.grid_shape) != tuple(reference_runner.grid_shape):
        raise ConfigMismatchError(
            f"grid mismatch: artifact grid {tuple(artifact_runner.grid_shape)} vs reference grid "
            f"{tuple(reference_runner.grid_shape)}; fix: pass the checkpoint the artifact was exported from"
        )


def run_check(
    artifact_runner,
    reference_runner,
    pairs: Iterable[CheckPair],
    precision: CheckPrecision | str = CheckPrecision.auto,
    spacing: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Compare two runners on ``pairs``; returns the JSON-able report (``passed``: within tolerance)."""
    check_grids(artifact_runner, reference_runner)
    meta = artifact_runner.meta
    precision = resolve_precision(precision, meta)
    if spacing is None:
        from emorph_deploy.export.manifest import spacing_and_orientation

        spacing = (
            meta.get("spacing_mm")
            or spacing_and_orientation(meta.get("preprocessing"))[0]
            or spacing_and_orientation(reference_runner.meta.get("preprocessing"))[0]
            or (1.0, 1.0, 1.0)
        )
    spacing = tuple(float(s) for s in spacing)
    rows: list[dict[str, Any]] = []
    latencies: dict[str, list[float]] = {"artifact": [], "reference": []}
    for pair in pairs:
        if pair.moving.shape != tuple(artifact_runner.grid_shape) or pair.fixed.shape != pair.moving.shape:
            raise ConfigMismatchError(
                f"pair {pair.name}: images {pair.moving.shape}/{pair.fixed.shape} are not on "
                f"the model grid {tuple(artifact_runner.grid_shape)}"
            )
        feed = {
            "moving": np.ascontiguousarray(pair.moving, dtype=np.float32)[None, None],
            "fixed": np.ascontiguousarray(pair.fixed, dtype=np.float32)[None, None],
        }
        art = artifact_runner.infer(feed)
        latencies["artifact"].append(artifact_runner.last_latency_s)
        ref = reference_runner.infer(feed)
        latencies["reference"].append(reference_runner.last_latency_s)
        rows.append(compare_pair(art, ref, pair, spacing))
    if not rows:
        raise InputError("no pairs to check; fix: --synthetic N or a --pairs CSV with rows")
    checks, passed = evaluate(rows, precision)
    return {
        "format": "emorph-check/1",
        "artifact": str(artifact_runner.artifact),
        "artifact_backend": meta.get("backend", artifact_runner.name),
        "reference": str(reference_runner.artifact),
        "reference_backend": reference_runner.meta.get("backend", reference_runner.name),
        "precision": precision,
        "grid_shape": list(artifact_runner.grid_shape),
        "spacing_mm": list(spacing),
        "outputs": list(artifact_runner.output_names),
        "tolerances": dict(TOLERANCES[precision]),
        "pairs": rows,
        "summary": summarise(rows),
        "latency_s_median": {k: float(np.median(v)) for k, v in latencies.items() if v},
        "checks": checks,
        "passed": passed,
    }


# ------------------------------------------------------------------------------------------------ report
def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def format_report(report: dict[str, Any]) -> str:
    """Plain-text tables: one per output (flow, warped), labels, Jacobian, then the gated checks."""
    rows = report["pairs"]
    name_w = max(12, *(len(r["pair"]) for r in rows))
    lines = [
        f"check: {report['artifact']} ({report['artifact_backend']})",
        f"   vs: {report['reference']} ({report['reference_backend']})",
        f"precision {report['precision']}, grid {tuple(report['grid_shape'])}, "
        f"spacing {tuple(report['spacing_mm'])} mm, {len(rows)} pair(s)",
        "",
    ]

    def table(title: str, cols: list[tuple[str, str, str]]) -> None:
        lines.append(title)
        lines.append("  " + "pair".ljust(name_w) + "".join(h.rjust(14) for h, _, _ in cols))
        for r in rows:
            lines.append(
                "  " + r["pair"].ljust(name_w) + "".join(_fmt(r.get(k), s).rjust(14) for _, k, s in cols)
            )
        lines.append("")

    table(
        "flow: |Δflow| per voxel (Euclidean)",
        [
            ("max vox", "max_flow_voxel", ".3g"),
            ("mean vox", "mean_flow_voxel", ".3g"),
            ("max mm", "max_flow_mm", ".3g"),
            ("mean mm", "mean_flow_mm", ".3g"),
            ("ref max vox", "ref_flow_max_voxel", ".3g"),
        ],
    )
    table(
        f"warped vs reference warped ({rows[0].get('warped_source', 'output')})",
        [
            ("NCC", "warped_ncc", ".6f"),
            ("PSNR dB", "warped_psnr_db", ".1f"),
            ("max |Δ|", "warped_max_abs", ".3g"),
        ],
    )
    if any("dice_agreement" in r for r in rows):
        table(
            "labels warped (nearest) by each flow",
            [
                ("Dice art~ref", "dice_agreement", ".4f"),
                ("Dice art", "dice_artifact", ".4f"),
                ("Dice ref", "dice_reference", ".4f"),
                ("|ΔDice|", "dice_delta", ".4f"),
            ],
        )
    table(
        "Jacobian: fraction J <= 0",
        [
            ("artifact", "frac_jac_nonpos_artifact", ".3g"),
            ("reference", "frac_jac_nonpos_reference", ".3g"),
            ("Δ", "frac_jac_nonpos_delta", ".3g"),
        ],
    )
    lines.append(f"tolerance ({report['precision']}):")
    for c in report["checks"]:
        verdict = "n/a" if c["ok"] is None else ("ok" if c["ok"] else "FAIL")
        lines.append(f"  {c['metric']:<16} worst {_fmt(c['value'])} <= {_fmt(c['limit'])}  {verdict}")
    lines.append("PASS: within tolerance" if report["passed"] else "FAIL: outside tolerance")
    return "\n".join(lines)
