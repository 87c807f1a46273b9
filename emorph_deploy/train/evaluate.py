"""Evaluate a checkpoint on registration pairs: per-pair metrics and their mean.

Metrics per pair (model grid): Dice (mean over labels present in both; background excluded), Dice before
registration, HD95 in mm, SDlogJ (true std of log J over J > 0) and the Learn2Reg variant (std of
log(J + 3), clipped; labelled ``sdlogj_l2r``), fraction of voxels with J ≤ 0, global NCC after/before, and
the endpoint error (voxels) against the true deformation of synthetic pairs.

OASIS / Learn2Reg mode (``oasis=True``): labels 1–35 only, and the Jacobian statistics on the volume cropped
by 2 voxels per face as in the official Learn2Reg evaluation script.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = [
    "COLUMNS",
    "OASIS_HEADER",
    "OASIS_LABELS",
    "build_eval_pairs",
    "evaluate_model",
    "format_table",
    "summarise",
    "to_csv_bytes",
]

OASIS_LABELS: tuple[int, ...] = tuple(range(1, 36))
OASIS_HEADER = (
    "OASIS / Learn2Reg 2021 task 3 protocol: Dice over labels 1-35 (present in both), HD95, SDlogJ (true and "
    "L2R log(J+3) variant, 2-voxel crop), fraction J<=0. Paper reference (EfficientMorph, WACV 2025): "
    "0.867 validation Dice at 1 mm 160x192x224; TransMorph 0.8575 / SDlogJ(L2R) 0.1253 / HD95 1.4594."
)

#: (key, header, format) of the table columns.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("dice", "Dice", ".4f"),
    ("dice_init", "Dice(init)", ".4f"),
    ("hd95_mm", "HD95 mm", ".3f"),
    ("sdlogj", "SDlogJ", ".4f"),
    ("sdlogj_l2r", "SDlogJ(L2R)", ".4f"),
    ("frac_jac_nonpos", "J<=0", ".5f"),
    ("ncc", "NCC", ".4f"),
    ("ncc_init", "NCC(init)", ".4f"),
    ("epe_vox", "EPE vox", ".3f"),
    ("time_s", "time s", ".2f"),
)


def evaluate_model(
    model: Any,
    pairs: Iterable[dict[str, Any]],
    spacing: tuple[float, float, float],
    oasis: bool = False,
    device: str = "cpu",
    labels: Iterable[int] | None = None,
    names: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Per-pair metric rows for ``pairs`` (dicts of tensors as produced by the datasets)."""
    import torch

    from emorph_deploy import metrics as M
    from emorph_deploy.errors import InputError
    from emorph_deploy.models.warp import warp

    lab = list(OASIS_LABELS) if oasis else (list(labels) if labels is not None else None)
    model = model.to(device).eval()
    rows: list[dict[str, Any]] = []
    for i, item in enumerate(pairs):
        for key in ("moving", "fixed"):
            if not torch.isfinite(item[key]).all():
                raise InputError(
                    f"pair {i}: the {key} image holds NaN/Inf voxels; fix: clean the input volume"
                )
        moving = item["moving"][None].to(device)  # (1, 1, D, H, W)
        fixed = item["fixed"][None].to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            warped, flow = model(moving, fixed)  # (1, 1, D, H, W), (1, 3, D, H, W)
        elapsed = time.perf_counter() - t0
        flow_np = flow[0].float().cpu().numpy()
        fixed_np = fixed[0, 0].cpu().numpy()
        jac = M.jacobian_determinant(flow_np, spacing)
        jac_stats = jac[2:-2, 2:-2, 2:-2] if oasis and min(jac.shape) > 4 else jac
        row: dict[str, Any] = {
            "pair": names[i] if names and i < len(names) else str(item.get("name", i)),
            "dice": math.nan,
            "dice_init": math.nan,
            "hd95_mm": math.nan,
            "sdlogj": M.sd_log_jacobian(jac_stats),
            "sdlogj_l2r": M.sd_log_jacobian_l2r(jac_stats),
            "frac_jac_nonpos": M.fraction_nonpositive_jacobian(jac_stats),
            "ncc": M.ncc_global(warped[0, 0].float().cpu().numpy(), fixed_np),
            "ncc_init": M.ncc_global(moving[0, 0].cpu().numpy(), fixed_np),
            "epe_vox": math.nan,
            "time_s": elapsed,
        }
        if item.get("moving_labels") is not None and item.get("fixed_labels") is not None:
            ml = item["moving_labels"][None].to(device).float()
            with torch.no_grad():
                wl = warp(ml, flow.float(), mode="nearest")[0, 0].round().long().cpu().numpy()
            fl = item["fixed_labels"][0].cpu().numpy()
            row["dice"] = M.mean_dice(wl, fl, lab)
            row["dice_init"] = M.mean_dice(item["moving_labels"][0].cpu().numpy(), fl, lab)
            row["hd95_mm"] = M.hd95(wl, fl, spacing, lab)
        if item.get("flow") is not None:
            err = np.sqrt(((flow_np - item["flow"].cpu().numpy()) ** 2).sum(0))  # (D, H, W) voxels
            row["epe_vox"] = float(err.mean())
        rows.append(row)
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean (NaN-ignoring) of every metric column, plus the pair count."""
    out: dict[str, Any] = {"pair": "mean", "n_pairs": len(rows)}
    for key, _, _ in COLUMNS:
        vals = [r[key] for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
        out[key] = float(np.mean(vals)) if vals else math.nan
    return out


def _present(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    def has(r: dict[str, Any], k: str) -> bool:
        return isinstance(r.get(k), float) and math.isfinite(r[k])

    return [c for c in COLUMNS if any(has(r, c[0]) for r in rows)]


def format_table(rows: list[dict[str, Any]], mean: dict[str, Any]) -> str:
    """Plain-text table: one line per pair and a mean line (columns without any value are left out)."""
    cols = _present(rows)
    name_w = max([len("pair"), len("mean"), *(len(str(r["pair"])) for r in rows)])
    widths = [max(len(h), 9) for _, h, _ in cols]
    head = f"{'pair':<{name_w}}  " + "  ".join(f"{h:>{w}}" for (_, h, _), w in zip(cols, widths, strict=True))
    lines = [head, "-" * len(head)]

    def fmt(r: dict[str, Any]) -> str:
        cells = []
        for (k, _, f), w in zip(cols, widths, strict=True):
            v = r.get(k)
            ok = isinstance(v, float) and math.isfinite(v)
            cells.append(f"{format(v, f):>{w}}" if ok else f"{'-':>{w}}")
        return f"{r['pair']!s:<{name_w}}  " + "  ".join(cells)

    lines += [fmt(r) for r in rows]
    lines.append("-" * len(head))
    lines.append(fmt(mean))
    return "\n".join(lines)


def to_csv_bytes(rows: list[dict[str, Any]], mean: dict[str, Any]) -> bytes:
    buf = io.StringIO()
    fields = ["pair", *(k for k, _, _ in COLUMNS)]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in [*rows, mean]:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue().encode()


def build_eval_pairs(
    pre: Any,
    data: str | None = None,
    synthetic: int | None = None,
    seed: int = 0,
    atlas: str | None = None,
    kind: str = "mix",
    max_pairs: int | None = None,
    preset_spacing: bool = True,
) -> tuple[list[str], Any]:
    """(names, dataset) of evaluation pairs: consecutive subjects of a folder/CSV (``i → i+1``), explicit
    CSV pairs, atlas → subject, or ``synthetic`` generated pairs with known deformations; at most
    ``max_pairs`` of them (>= 1)."""
    from emorph_deploy.errors import InputError

    if max_pairs is not None and max_pairs < 1:
        raise InputError(
            f"--max-pairs: expected a number of pairs >= 1, got {max_pairs}; fix: drop it to evaluate every "
            "pair, or pass e.g. --max-pairs 10"
        )
    if synthetic is not None and max_pairs is not None:
        synthetic = min(synthetic, max_pairs)
    if synthetic is not None:
        from emorph_deploy.data.synthetic import SyntheticPairs
        from emorph_deploy.train.loop import _SyntheticAdapter

        if synthetic < 1:
            raise InputError(f"--synthetic expects a number of pairs ≥ 1; got {synthetic}")
        if kind == "brains":  # held-out brain pairs: first half same contrast, second half different
            from emorph_deploy.data.brainsynth import heldout_pairs

            spacing = float(pre.spacing_mm[0]) if preset_spacing else None
            n_same = (synthetic + 1) // 2
            items = heldout_pairs(n_same, tuple(pre.grid_shape), spacing, "same", seed=seed)
            items += heldout_pairs(synthetic - n_same, tuple(pre.grid_shape), spacing, "different", seed=seed)
            names = [f"brains-{i}-{p['contrast'].replace('/', '-')}" for i, p in enumerate(items)]
            return names, items
        tkw: dict[str, Any] = {"spacing": tuple(pre.spacing_mm)} if preset_spacing else {}
        pairs = SyntheticPairs(synthetic, tuple(pre.grid_shape), seed=seed, kind=kind)
        ds = _SyntheticAdapter(pairs, {}, tkw)
        names = [
            f"synthetic-{i}" + ("-tpl" if kind == "template" or (kind == "mix" and i % 2) else "")
            for i in range(synthetic)
        ]
        return names, ds
    if data is None:
        raise InputError("no evaluation data: expected DATA (folder or CSV) or --synthetic N; fix: pass one")
    from emorph_deploy.data.datasets import PairDataset, PairSpec, discover

    subjects, pairs = discover(data)
    if pairs:
        specs = pairs
    elif atlas is not None:
        specs = PairDataset(subjects, pre, atlas=atlas, seed=seed).pairs
    else:
        if len(subjects) < 2:
            raise InputError(
                f"dataset {data}: expected at least 2 volumes for inter-subject pairs, got "
                f"{len(subjects)}; fix: add volumes or pass --atlas"
            )
        specs = [PairSpec(fixed=subjects[i + 1], moving=subjects[i]) for i in range(len(subjects) - 1)]
    if max_pairs is not None:
        specs = specs[:max_pairs]
    ds = PairDataset((), pre, pairs=specs, seed=seed)
    names = [f"{_short(s.moving.image)}->{_short(s.fixed.image)}" for s in specs]
    return names, ds


def _short(p: Any) -> str:
    name = getattr(p, "name", str(p))
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name
