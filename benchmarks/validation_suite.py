"""Validation suite of distinct real brains: emorph (affine, network, refinement ablation), ANTs SyN, greedy.

Pairs
* real: every ordered pair of the offline real-brain subjects of :mod:`emorph_deploy.data.realbrains`
  (MNI152 2009c template and the pydeface mean head — averages; the ROBEX reference head and ITK's example
  T1 — single subjects; 12 pairs with 4 subjects, ``--unordered`` for 6), each in the **same** contrast
  and with the moving brain's contrast **inverted** inside its mask. Labels: the same method for every
  subject (ROBEX mask, N4, ANTs Atropos 3-class k-means → 1 CSF, 2 GM, 3 WM). Each subject on its own grid
  (~2 mm), centroid at world 0.
* deformed: ``--deformed N`` (default 2) known smooth deformations of each subject's own brain (fixed = the
  brain and its labels warped by a random diffeomorphism of at most DEFORMED_MM[k] mm, control scale 40 mm;
  moving = the brain as it is; no intensity change): the issue's "real brain under a known smooth
  deformation", Dice against the warped labels.
* synthetic: ``--synthetic N`` (default 4) held-out pairs per contrast relation (same, different) from
  ``emorph_deploy.data.brainsynth.heldout_pairs(paired=True)`` (80×96×112 at 2 mm; Dice = the mean over
  their labels): pair i of both relations is one geometry and one moving image, only the fixed image's
  contrast differs, so "different − same" is a paired comparison; skipped with the reason if that
  module is missing.

Methods (``--methods``; each row's seconds = the whole job: read the images and the moving labels,
register, warp the image and the labels onto the fixed grid)
* ``none``: the moving labels resampled onto the fixed grid by the headers (centroid-aligned);
* ``affine``: emorph's affine pre-alignment alone (``register(affine=True, network=False)``, = ``--affine``);
* ``network``: the network alone after the affine (``Registrar.load(model).register(affine=True)``);
* ``network2``: the network alone, run twice (``register(passes=2)``, ``--passes 2``: the second pass
  registers the moving image warped by the first and the flows are composed);
* ``refine0``: refinement from a ZERO flow after the affine, no network (``register(network=False,
  refine=M)``), at **equal time** to ``refine``: M = N + round(network seconds / seconds per refinement
  step), both measured on the first pair before the rows (``--refine-zero-steps M`` fixes it);
* ``refine``: network + refinement (``refine=N``, ``--refine``, default 20 as in ``emorph demo``);
* ``syn``: ANTs SyN (antspy defaults; ``benchmarks/peers.py``'s ``run_ants``);
* ``greedy``: greedy affine + deformable NCC (``peers.run_greedy``).
emorph rows: the median of ``--runs`` ``register()`` calls after ``--warmup`` (model kept warm); ANTs and
greedy: the median of ``--peer-runs`` runs (default 1).

Dice per label (CSF, GM, WM) of the warped moving labels vs the fixed labels on the fixed grid; "Dice" =
the mean of GM and WM (as in ``peers.py``; CSF from k-means on skull-stripped brains is the least reliable
class). J ≤ 0: fraction of non-positive Jacobian determinants (emorph: model grid; ANTs/greedy: their warp on
the fixed grid).

    python benchmarks/validation_suite.py [--model CKPT] [--methods none,affine,network,network2,refine0,
        refine,syn,greedy] [--refine 20] [--refine-zero-steps M] [--unordered] [--contrasts same,inverted]
        [--subjects mni152,robex,...] [--deformed 2] [--synthetic 4] [--quick] [--threads 2] [--runs 3]
        [--force]

Writes ``benchmarks/results/validation_suite.{json,md}`` (``--quick``: ``results/quick/``).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import peers as P

NAME = "validation_suite"
LABELS = {1: "csf", 2: "gm", 3: "wm"}
SCORED = (2, 3)  # "Dice" = mean over GM and WM
METHODS: dict[str, str] = {  # key → row name (table order)
    "none": "no registration",
    "affine": "affine (emorph --affine)",
    "network": "network (after affine)",
    "network2": "network, 2 passes (after affine)",
    "refine0": "refinement from zero",
    "refine": "network + refinement",
    "syn": "ANTs SyN",
    "greedy": "greedy",
}
EMORPH = ("affine", "network", "network2", "refine0", "refine")
CROSS_CONTRAST_TOL = 0.02
QUICK_SUBJECTS = ("mni152", "robex")
#: largest displacement (mm) of the k-th known deformation of each subject (--deformed N takes the first N)
DEFORMED_MM = (8.0, 12.0, 10.0, 6.0)
DEFORMED_SCALE_MM = 40.0  # control scale of those deformations
DEFORMED_SEED0 = 7_000  # subject s, deformation k: seed DEFORMED_SEED0 + 10 s + k
#: issue 15: the registration defaults reach this Dice on synthetic deformations of a real brain
TARGET_DEFORMED_DICE = 0.93


# ---------------------------------------------------------------------------------------------- scoring
def score(warped: Any, fixed: Any, tissue: bool = True) -> dict[str, float]:
    """``tissue`` (the real brains): Dice per class (``dice_csf``/``dice_gm``/``dice_wm``; NaN when a class is
    in neither map) and ``dice`` = mean over GM and WM. ``tissue=False`` (synthetic label maps): ``dice`` =
    the mean over the labels present in both maps, no per-class columns."""
    import numpy as np

    from emorph_deploy.metrics import mean_dice

    a, b = np.asarray(warped), np.asarray(fixed)
    if a.shape != b.shape:
        raise ValueError(f"score: expected warped labels on the fixed grid {b.shape}, got {a.shape}")
    if not tissue:
        return {"dice": mean_dice(a, b)}
    out: dict[str, float] = {}
    for lab, name in LABELS.items():
        x, y = a == lab, b == lab
        s = int(x.sum()) + int(y.sum())
        out[f"dice_{name}"] = float(2.0 * np.logical_and(x, y).sum() / s) if s else float("nan")
    out["dice"] = float(np.nanmean([out[f"dice_{LABELS[k]}"] for k in SCORED]))
    return out


# ---------------------------------------------------------------------------------------------- summary
def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    import math

    vals = [r.get(key) for r in rows]
    vals = [float(v) for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """group → method → means over the ok rows (pairs, Dice per label and GM/WM mean, seconds, J ≤ 0).

    Groups: each row's ``group`` ("same", "inverted", "synthetic-…") plus "single-subject" (same-contrast
    pairs whose two brains are single subjects, ``row["single_subject"]``)."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        if not r.get("ok"):
            continue
        keys = [r["group"]] + (["single-subject"] if r["group"] == "same" and r.get("single_subject") else [])
        for g in keys:
            groups.setdefault(g, {}).setdefault(r["method"], []).append(r)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for g, ms in groups.items():
        out[g] = {}
        for m in [k for k in METHODS if k in ms] + [k for k in ms if k not in METHODS]:
            rs = ms[m]
            out[g][m] = {
                "pairs": len(rs),
                "dice": _mean(rs, "dice"),
                **{f"dice_{n}": _mean(rs, f"dice_{n}") for n in LABELS.values()},
                "seconds": _mean(rs, "seconds"),
                "frac_jac_nonpos": _mean(rs, "frac_jac_nonpos"),
                "steps": rs[0].get("steps"),
                "full_steps": rs[0].get("full_steps"),
            }
    return out


def targets(summary: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The issue-15 comparisons measured on the suite (None where a row is missing):
    network alone vs ANTs SyN, network + refinement vs greedy (same contrast), inverted − same contrast for
    each emorph method (within ±0.02 = met), and the emorph rows' J ≤ 0."""
    same, inv = summary.get("same", {}), summary.get("inverted", {})

    def d(g: dict[str, Any], m: str) -> float | None:
        return (g.get(m) or {}).get("dice")

    def compare(
        target: str, m: str, a: float | None, b: float | None, within: bool, peer: str | None = None
    ) -> dict[str, Any]:
        """``a`` against ``b``: met when ``a >= b`` or, with ``within``, when ``|a − b|`` ≤ the tolerance."""
        delta = None if a is None or b is None else a - b
        met = None if delta is None else (abs(delta) <= CROSS_CONTRAST_TOL if within else delta >= 0)
        return {
            "target": target,
            "method": m,
            **({"peer": peer} if peer else {}),
            "dice": a,
            "peer_dice": b,
            "delta": delta,
            "met": met,
        }

    out: list[dict[str, Any]] = []
    for m, peer in (("network", "syn"), ("network2", "syn"), ("refine", "greedy"), ("refine", "syn")):
        out.append(
            compare(
                f"{METHODS[m]} vs {METHODS[peer]} (same contrast)", m, d(same, m), d(same, peer), False, peer
            )
        )
    syn_same, syn_diff = summary.get("synthetic-same", {}), summary.get("synthetic-different", {})
    for m in EMORPH[1:] if syn_same and syn_diff else ():
        out.append(
            compare(
                f"{METHODS[m]}: synthetic different − same contrast within ±{CROSS_CONTRAST_TOL}",
                m,
                d(syn_diff, m),
                d(syn_same, m),
                True,
            )
        )
    for m in EMORPH[1:]:
        out.append(
            compare(
                f"{METHODS[m]}: inverted − same contrast within ±{CROSS_CONTRAST_TOL}",
                m,
                d(inv, m),
                d(same, m),
                True,
            )
        )
    deformed = summary.get("deformed", {})
    if deformed:
        out.append(
            compare(
                f"{METHODS['refine']} ≥ {TARGET_DEFORMED_DICE} on known deformations of real brains",
                "refine",
                d(deformed, "refine"),
                TARGET_DEFORMED_DICE,
                False,
            )
        )
    for m in EMORPH[1:]:
        vals = [
            g[m]["frac_jac_nonpos"] for g in (same, inv) if m in g and g[m]["frac_jac_nonpos"] is not None
        ]
        out.append(
            {
                "target": f"{METHODS[m]}: fraction J ≤ 0 (worst of same/inverted means)",
                "method": m,
                "frac_jac_nonpos": max(vals) if vals else None,
                "met": None,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------- report
def _method_name(key: str, entry: dict[str, Any]) -> str:
    name = METHODS.get(key, key)
    if key in ("refine", "refine0") and entry.get("steps") is not None:
        full = entry.get("full_steps")
        name += f" ({entry['steps']} half + {full} full steps)" if full else f" ({entry['steps']} steps)"
    return name


def group_table(ms: dict[str, dict[str, Any]]) -> str:
    """Per-method means of one group as a markdown table."""
    return C.md_table(
        ["method", "pairs", "Dice (GM/WM)", "CSF", "GM", "WM", "J ≤ 0", "s / pair"],
        [
            [
                _method_name(m, v),
                v["pairs"],
                C.fmt(v["dice"], ".3f"),
                C.fmt(v["dice_csf"], ".3f"),
                C.fmt(v["dice_gm"], ".3f"),
                C.fmt(v["dice_wm"], ".3f"),
                C.fmt(v["frac_jac_nonpos"], ".2g"),
                C.fmt(v["seconds"], ".3g"),
            ]
            for m, v in ms.items()
        ],
    )


def pair_table(rows: list[dict[str, Any]]) -> str:
    return C.md_table(
        ["pair", "method", "Dice", "CSF", "GM", "WM", "J ≤ 0", "s", "note"],
        [
            [
                r["pair"],
                METHODS.get(r["method"], r["method"]),
                C.fmt(r.get("dice"), ".3f"),
                C.fmt(r.get("dice_csf"), ".3f"),
                C.fmt(r.get("dice_gm"), ".3f"),
                C.fmt(r.get("dice_wm"), ".3f"),
                C.fmt(r.get("frac_jac_nonpos"), ".2g"),
                C.fmt(r.get("seconds"), ".3g"),
                r.get("error") or "",
            ]
            for r in rows
        ],
    )


GROUP_TITLES = {
    "same": "Distinct real brains, same contrast (mean over pairs)",
    "inverted": "Distinct real brains, moving contrast inverted inside its mask",
    "single-subject": "Single-subject pairs only (robex ↔ itk), same contrast",
    "deformed": "Real brains under known smooth deformations (each subject against itself warped)",
}


def render(res: dict[str, Any]) -> str:
    s = res["summary"]
    body = [
        f"Model: {s.get('model') or '-'}. Subjects: "
        + ", ".join(f"`{x['name']}` ({x['kind']})" for x in s.get("subjects", []))
        + f". Pairs: {s.get('pair_rule', '-')}.",
        "",
    ]
    eq = s.get("equal_time")
    if eq:
        body += [
            f"Equal time: refinement from zero runs {eq['steps_zero']} steps = {eq['steps']} + "
            f"round({C.fmt(eq.get('network_s'), '.3g')} s network / {C.fmt(eq.get('step_s'), '.3g')} s per "
            f"step) ({eq['how']}).",
            "",
        ]
    by = s.get("by_group", {})
    groups = [
        "same",
        "inverted",
        "single-subject",
        "deformed",
        *sorted(k for k in by if k.startswith("synthetic")),
    ]
    for g in groups:
        if by.get(g):
            body += [
                f"## {GROUP_TITLES.get(g, 'Held-out synthetic pairs: ' + g)}",
                "",
                group_table(by[g]),
                "",
            ]
    if s.get("targets"):
        body += ["## Targets (issue 15)", ""]
        for t in s["targets"]:
            if "frac_jac_nonpos" in t:
                body.append(f"- {t['target']}: {C.fmt(t['frac_jac_nonpos'], '.2g')}")
            else:
                verdict = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
                body.append(
                    f"- {t['target']}: {C.fmt(t['dice'], '.3f')} vs {C.fmt(t['peer_dice'], '.3f')} "
                    f"(Δ {C.fmt(t['delta'], '+.3f')}) → {verdict}"
                )
        body.append("")
    body += ["## Per pair", "", pair_table(res["rows"]), ""]
    for x in s.get("subjects", []):
        body.append(f"- `{x['name']}`: {x['description']}; {x['grid']}; mask: {x['mask_method']}.")
    for k, v in (s.get("skipped") or {}).items():
        body.append(f"\nSkipped {k}: {v}.")
    return C.markdown_document(res, "Validation suite: distinct real brains", "\n".join(body))


# ---------------------------------------------------------------------------------------------- emorph
class _Fixed:
    """A Registrar whose ``register`` always gets extra keyword arguments (e.g. ``network=False``), so
    ``peers.run_emorph`` times every emorph variant the same way."""

    def __init__(self, registrar: Any, **kwargs: Any) -> None:
        self._r, self._kw = registrar, kwargs

    def register(self, *args: Any, **kwargs: Any) -> Any:
        return self._r.register(*args, **{**kwargs, **self._kw})


def equal_time_steps(registrar: Any, pair: dict[str, Any], steps: int, repeats: int = 3) -> dict[str, Any]:
    """Steps M of refinement from zero taking the time of the network + ``steps`` refinement steps:
    M = steps + round(network s / s per step), from the medians of ``repeats`` calls on ``pair`` (after one
    warm-up)."""
    import statistics

    from emorph_deploy.refine import RefineConfig

    infer, refine = [], []
    for i in range(repeats + 1):
        # half-resolution steps only: the default's full-resolution steps run in both rows alike, so the
        # extra steps of refinement from zero must be priced at the half-resolution step's cost
        q = registrar.register(
            str(pair["fixed"]),
            str(pair["moving"]),
            affine=True,
            refine=RefineConfig(steps=steps, full_steps=0),
        ).qc
        if i:
            infer.append(q["times_s"]["infer"])
            refine.append(q["times_s"]["refine"])
    net, step = statistics.median(infer), statistics.median(refine) / steps
    return {
        "steps": steps,
        "steps_zero": steps + round(net / step),
        "network_s": net,
        "step_s": step,
        "pair": pair["name"],
        "how": f"medians of {repeats} calls on {pair['name']}",
    }


# ---------------------------------------------------------------------------------------------- pairs
def load_real_suite(args: Any) -> Any:
    """The realbrains subjects ``--subjects`` names (``--quick``: two at ~6 mm), from their cache."""
    from emorph_deploy.data.realbrains import load_suite

    names = args.subjects.split(",") if args.subjects else (list(QUICK_SUBJECTS) if args.quick else None)
    return load_suite(names, spacing_mm=6.0 if args.quick else 2.0, log=C.log)


def real_pairs(args: Any, work: Path, res: dict[str, Any]) -> list[dict[str, Any]]:
    from emorph_deploy.data.realbrains import suite_pairs

    t0 = time.perf_counter()
    suite = load_real_suite(args)
    C.log(f"real-brain suite ready in {time.perf_counter() - t0:.1f} s: {suite.names()}")
    s = res["summary"]
    s["skipped"].update({f"subject {k}": v for k, v in suite.skipped.items()})
    s["suite_params"] = suite.params
    s["subjects"] = [
        {
            "name": x.name,
            "kind": x.kind,
            "description": x.description,
            "mask_method": x.meta["mask_method"],
            "grid": f"{x.meta['orientation']} {C.fmt_size(x.meta['shape'])} at "
            + "×".join(f"{z:.3g}" for z in x.meta["voxel_mm"])
            + " mm",
            "brain_ml": x.meta["brain_ml"],
            "labels": x.meta["labels"],
            "cache": str(x.paths["image"].parent),
        }
        for x in suite.subjects
    ]
    contrasts = [c.strip() for c in args.contrasts.split(",") if c.strip()]
    pairs = suite_pairs(suite, ordered=not args.unordered, contrasts=contrasts)
    s["pair_rule"] = (
        f"{'unordered (i < j, earlier subject fixed)' if args.unordered else 'all ordered'} pairs of "
        f"distinct subjects × contrasts {contrasts}"
    )
    return [
        {
            "name": p.name,
            "group": p.contrast,
            "single_subject": p.fixed.kind == "single subject" and p.moving.kind == "single subject",
            "fixed": p.fixed.paths["image"],
            "moving": p.moving_path,
            "fixed_labels": p.fixed.paths["labels"],
            "moving_labels": p.moving.paths["labels"],
        }
        for p in pairs
    ]


def check_deformed_count(n: int) -> None:
    """SystemExit unless ``--deformed`` ``n`` is within 0..len(DEFORMED_MM)."""
    if not 0 <= n <= len(DEFORMED_MM):
        raise SystemExit(f"--deformed: expected 0..{len(DEFORMED_MM)}, got {n}")


def deformed_pairs(args: Any, work: Path, res: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """``n`` known smooth deformations of each subject's brain (see the module docstring), written to
    ``work``: fixed = the brain and its labels warped (trilinear / nearest), moving = the brain as is."""
    import nibabel as nib
    import numpy as np

    from emorph_deploy.data.synthetic import random_displacement, warp_numpy

    suite = load_real_suite(args)
    out = []
    for si, x in enumerate(suite.subjects):
        img, lab = nib.load(str(x.paths["image"])), nib.load(str(x.paths["labels"]))
        data = np.asanyarray(img.dataobj).astype(np.float32)
        labels = np.asanyarray(lab.dataobj).astype(np.float32)
        voxel_mm = float(np.mean(np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))))
        for k, mm in enumerate(DEFORMED_MM[:n]):
            phi = random_displacement(
                data.shape,
                DEFORMED_SEED0 + 10 * si + k,
                max_disp=mm / voxel_mm,
                scale=DEFORMED_SCALE_MM / voxel_mm,
            )
            d = work / f"deformed-{x.name}-{k}"
            d.mkdir(parents=True, exist_ok=True)
            files = {"fixed": d / "fixed.nii.gz", "fixed_labels": d / "fixed_labels.nii.gz"}
            nib.save(nib.Nifti1Image(warp_numpy(data, phi, order=1), img.affine), str(files["fixed"]))
            warped_labels = warp_numpy(labels, phi, order=0).astype(np.int16)
            nib.save(nib.Nifti1Image(warped_labels, lab.affine), str(files["fixed_labels"]))
            out.append(
                {
                    "name": f"{x.name} deformed {mm:g} mm",
                    "group": "deformed",
                    "fixed": files["fixed"],
                    "moving": x.paths["image"],
                    "fixed_labels": files["fixed_labels"],
                    "moving_labels": x.paths["labels"],
                }
            )
    res["summary"]["deformed"] = {
        "per_subject": n,
        "max_disp_mm": list(DEFORMED_MM[:n]),
        "scale_mm": DEFORMED_SCALE_MM,
        "seeds": f"{DEFORMED_SEED0} + 10 · subject index + k",
    }
    return out


def synthetic_pairs(work: Path, res: dict[str, Any], n: int, spacing_mm: float = 2.0) -> list[dict[str, Any]]:
    """``n`` held-out synthetic pairs per contrast relation ("same", "different") from
    ``emorph_deploy.data.brainsynth.heldout_pairs(n=, shape=, spacing_mm=, contrast=, paired=True)`` if it
    exists (items: dicts with ``fixed``/``moving`` and ``fixed_labels``/``moving_labels`` arrays or tensors,
    (1, D, H, W) or (D, H, W), on a ``spacing_mm`` grid), written to ``work``; else [] with the reason in
    ``summary.skipped``."""
    import nibabel as nib
    import numpy as np

    try:
        from emorph_deploy.data.brainsynth import heldout_pairs
    except ImportError as exc:
        res["summary"]["skipped"]["synthetic pairs"] = (
            f"emorph_deploy.data.brainsynth.heldout_pairs is not available here ({exc})"
        )
        return []
    aff = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    out = []
    try:
        for contrast in ("same", "different"):
            items = heldout_pairs(
                n=n, shape=C.DEFAULT_GRID, spacing_mm=spacing_mm, contrast=contrast, paired=True
            )
            for i, item in enumerate(items):
                d = work / f"synthetic-{contrast}-{i}"
                d.mkdir(parents=True, exist_ok=True)
                files = {}
                for key, dtype in (
                    ("fixed", np.float32),
                    ("moving", np.float32),
                    ("fixed_labels", np.int16),
                    ("moving_labels", np.int16),
                ):
                    v = np.asarray(item[key], dtype=dtype)
                    v = v.reshape(v.shape[-3:]) if v.ndim == 4 and v.shape[0] == 1 else v
                    if v.ndim != 3:
                        raise ValueError(f"{key} of item {i}: expected a 3D volume, got shape {v.shape}")
                    files[key] = d / f"{key}.nii.gz"
                    nib.save(nib.Nifti1Image(v, aff), str(files[key]))
                kinds = item.get("contrast")
                out.append(
                    {
                        "name": f"synthetic-{contrast}-{i}" + (f" ({kinds})" if kinds else ""),
                        "group": f"synthetic-{contrast}",
                        "tissue": False,
                        **files,
                    }
                )
    except Exception as exc:
        msg = " ".join(str(exc).split())[:200]
        res["summary"]["skipped"]["synthetic pairs"] = f"heldout_pairs() failed: {type(exc).__name__}: {msg}"
        return []
    res["summary"]["synthetic"] = {
        "source": "emorph_deploy.data.brainsynth.heldout_pairs",
        "pairs_per_contrast": n,
        "grid": list(C.DEFAULT_GRID),
        "spacing_mm": spacing_mm,
        "paired": "pair i of 'same' and 'different': one geometry and moving image, another fixed contrast",
        "dice": "mean over the labels present in both maps",
    }
    return out


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = C.base_parser(__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        default=None,
        help="checkpoint (.json/.safetensors), .onnx or engine; default: the packaged default model "
        "(emorph_deploy/weights/default.json)",
    )
    ap.add_argument("--backend", default="auto", help="Registrar backend (auto|torch|onnxruntime|tensorrt)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--refine", type=int, default=20, help="refinement steps N of 'network + refinement'")
    ap.add_argument(
        "--refine-zero-steps",
        type=int,
        default=None,
        help="steps of 'refinement from zero' (default: equal time to network + N steps, measured)",
    )
    ap.add_argument("--subjects", default=None, help="comma list of realbrains subjects (default all)")
    ap.add_argument("--unordered", action="store_true", help="unordered pairs (i < j) instead of all ordered")
    ap.add_argument("--contrasts", default="same,inverted", help="comma list of same, inverted")
    ap.add_argument(
        "--synthetic",
        type=int,
        default=None,
        help="held-out synthetic pairs per contrast relation (same, different) when brainsynth.heldout_pairs "
        "exists (default 4; --quick 1; 0 = none)",
    )
    ap.add_argument(
        "--deformed",
        type=int,
        default=None,
        help="known smooth deformations per subject (default 2; --quick 1; 0 = none; at most "
        f"{len(DEFORMED_MM)})",
    )
    ap.add_argument("--peer-runs", type=int, default=1, help="timed runs of ANTs/greedy per pair (median)")
    ap.add_argument("--keep", default=None, help="keep the outputs in this folder")
    args = ap.parse_args(argv)
    if args.synthetic is None:
        args.synthetic = 1 if args.quick else 4
    if args.deformed is None:
        args.deformed = 1 if args.quick else 2
    check_deformed_count(args.deformed)
    if args.runs is None:
        args.runs = 3  # emorph rows: median of 3 calls after the warm-up (24 pairs × 4 emorph methods)
    args = C.finish_args(args, NAME)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or args.refine < 1 or args.peer_runs < 1:
        raise SystemExit(
            f"--methods: expected some of {', '.join(METHODS)} (got unknown {bad}); --refine and --peer-runs "
            "must be >= 1"
        )
    args._quick_shape = (32, 40, 48)  # peers.open_registrar's untrained --quick model grid
    C.check_outputs_writable(args.out, args.force)

    import ants  # after finish_args: ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS is set

    if hasattr(ants, "config"):
        ants.config._random_seed = 1
    import torch

    from emorph_deploy.refine import RefineConfig

    torch.set_num_threads(args.threads)
    res = C.new_result(NAME, args, argv)
    s = res["summary"]
    s["skipped"] = {}
    with contextlib.ExitStack() as stack:
        if args.keep:
            work = Path(args.keep)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="emorph-suite-")))
        pairs = real_pairs(args, work, res)
        if args.deformed <= 0:
            s["skipped"]["deformed pairs"] = "--deformed 0"
        else:
            pairs += deformed_pairs(args, work, res, args.deformed)
        if args.synthetic <= 0:
            s["skipped"]["synthetic pairs"] = "--synthetic 0"
        else:
            pairs += synthetic_pairs(work, res, args.synthetic)
        C.log(f"{len(pairs)} pair(s)")
        registrar = None
        if any(m in EMORPH for m in methods):
            if args.model is None and not args.quick:
                from emorph_deploy.registration import default_artifact

                args.model = str(default_artifact())
            registrar, label = P.open_registrar(args, work)
            if registrar is None:
                raise SystemExit(f"error: {label}; fix: pass --model CHECKPOINT")
            s["model"] = label
        n_refine = args.refine
        n_zero = args.refine_zero_steps
        if "refine0" in methods and n_zero is None and pairs:
            t0 = time.perf_counter()
            s["equal_time"] = equal_time_steps(registrar, pairs[0], n_refine, repeats=args.runs)
            n_zero = s["equal_time"]["steps_zero"]
            C.log(f"equal time: {n_zero} steps from zero ({time.perf_counter() - t0:.1f} s)")
        elif n_zero is not None:
            s["equal_time"] = {"steps": n_refine, "steps_zero": n_zero, "how": "fixed by --refine-zero-steps"}
        s["refine_steps"] = n_refine
        s["refine_zero_steps"] = n_zero

        def em(kw: dict[str, Any], refine: Any = 0):
            return lambda p, t, a: P.run_emorph(p, t, a, _Fixed(registrar, **kw), True, refine=refine)

        refine_cfg = {"refine0": RefineConfig(steps=n_zero or 0), "refine": RefineConfig(steps=n_refine)}
        jobs: dict[str, Any] = {
            "none": P.run_none,
            "affine": em({"network": False}),
            "network": em({}),
            "network2": em({"passes": 2}),
            "refine0": em({"network": False}, refine_cfg["refine0"]),
            "refine": em({}, refine_cfg["refine"]),
            "syn": lambda p, t, a: P.run_ants(p, t, a, "SyN"),
            "greedy": P.run_greedy,
        }
        for pair in pairs:
            fixed_labels = P._labels_array(pair["fixed_labels"])
            for m in methods:
                d = work / re.sub(r"[^A-Za-z0-9_.-]+", "_", pair["name"].replace("→", "_to_")) / m
                d.mkdir(parents=True, exist_ok=True)
                row: dict[str, Any] = {
                    "pair": pair["name"],
                    "group": pair["group"],
                    "single_subject": pair.get("single_subject", False),
                    "method": m,
                    "steps": refine_cfg[m].steps if m in refine_cfg else None,
                    "full_steps": refine_cfg[m].full_steps if m in refine_cfg else None,
                    "threads": args.threads,
                    "load_avg": C.load_avg(),
                }
                try:
                    r = jobs[m](pair, d, args)
                    warped = P._labels_array(r.pop("warped_labels"))
                    row.update(r)
                    row.update(score(warped, fixed_labels, tissue=pair.get("tissue", True)))
                    row["ok"] = True
                    C.log(
                        f"[{pair['name']}] {METHODS[m]}: Dice {row['dice']:.3f}, "
                        f"J<=0 {C.fmt(row.get('frac_jac_nonpos'), '.2g')}, {row['seconds']:.3g} s"
                    )
                except Exception as exc:
                    row.update(
                        {"ok": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
                    )
                    C.log(f"[{pair['name']}] {METHODS[m]}: FAILED {row['error']}")
                res["rows"].append(row)
    s["by_group"] = summarise(res["rows"])
    s["targets"] = targets(s["by_group"])
    res["notes"] += [
        "Seconds depend on what else ran on the cores: the load average at start and end is in the header "
        "and per row in the JSON (a quiet 2-thread run shows ~2 from the run itself); Dice values do not "
        "depend on it.",
        "Seconds: the whole job per method (read images and moving labels, register, warp image and labels). "
        f"emorph rows: median of {args.runs} register() calls after {args.warmup} warm-up, model kept warm, "
        "affine pre-alignment included. ANTs/greedy: median of "
        f"{args.peer_runs} run(s) (peers.run_ants / run_greedy). No registration: 0.",
        "Dice = mean of GM and WM (labels 2, 3) per pair, then the mean over pairs; CSF shown separately. "
        "Labels: ANTs Atropos 3-class k-means after N4 in the ROBEX/template brain mask, the same method for "
        "every subject (emorph_deploy/data/realbrains.py). Two subjects are averages (MNI152, pydeface "
        "mean).",
        "J ≤ 0: emorph on the model grid, ANTs/greedy on their warp (fixed grid).",
    ]
    if args.quick:
        res["notes"].append(
            "--quick: two subjects at ~6 mm, few ANTs/greedy iterations, untrained tiny model unless "
            "--model: checks the script only."
        )
    C.publish(res, render, args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
