"""End-to-end native-space registration latency, split by stage, against the model forward.

One MNI152 pair on disk (nilearn's bundled 1 mm template, 197×233×189, as ``.nii.gz``; the moving image is the
template under a small rotation + shift on its own grid, plus a GM label map) is registered with
:class:`emorph_deploy.registration.Registrar`: ``--warmup`` warm-up pairs, then ``--runs`` timed pairs;
medians.

Stages: ``load`` (read + validate both NIfTI files and the labels), ``resample`` (normalise + world-space
resampling onto the model grid), ``infer`` (runner call; ``model`` = the runner's own forward time),
``resample_back`` (flow → fixed native grid, warp of the original moving image and labels, ITK displacement),
``qc`` (Jacobian, NCC, slices), ``write`` (warped, labels, displacement, qc.json [+ qc.png]: gzip dominates).
Summary: median end-to-end, with and without writing, as a multiple of the model forward (target ≤ 1.3×).

    python benchmarks/register_e2e.py [--quick] [--threads 2] [--runs 5] [--model CHECKPOINT]
        [--backend torch|onnxruntime] [--grid 80x96x112] [--png] [--affine] [--force]

Without ``--model`` a random-init em-23-hires (flow head rescaled to ~2 voxels RMS) at ``--grid`` is used
(``--quick``: a narrow model at 32³ on the 2 mm template).
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

STAGES = ("load", "affine", "resample", "infer", "resample_back", "qc", "package", "write")


def _pair(folder: Path, resolution: int) -> dict[str, Path]:
    import nibabel as nib
    import numpy as np
    from nilearn import datasets

    from emorph_deploy.data.resample import resample_to_grid

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = datasets.load_mni152_template(resolution=resolution)
        gm = datasets.load_mni152_gm_template(resolution=resolution)
    fixed = np.asanyarray(t.dataobj).astype(np.float32)
    a_f = t.affine
    c, s = np.cos(0.05), np.sin(0.05)
    move = np.eye(4)
    move[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    move[:3, 3] = [3.0, -2.0, 1.5]
    a_m = a_f.copy()
    a_m[:3, 3] += [1.0, 1.0, -1.0]
    moving = resample_to_grid(fixed, move @ a_f, fixed.shape, a_m, order=1)
    labels = resample_to_grid(
        (np.asanyarray(gm.dataobj) > 0.5).astype(np.uint8), move @ a_f, fixed.shape, a_m, order=0
    )
    out = {}
    for name, data, aff in (("fixed", fixed, a_f), ("moving", moving, a_m), ("labels", labels, a_m)):
        out[name] = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, aff), str(out[name]))
    return out


def _is_packaged_default(path: Path) -> bool:
    """Whether ``path`` is the packaged default model (its .json or its weights file)."""
    from emorph_deploy.registration import default_artifact

    try:
        default = default_artifact()
    except Exception:  # no default model packaged
        return False
    return path.resolve().with_suffix("") == default.resolve().with_suffix("")


def main(argv: list[str] | None = None) -> int:
    ap = C.base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (.json); default: random-init em-23-hires")
    ap.add_argument("--onnx", default=None, help="exported .onnx (+ manifest) instead of a checkpoint")
    ap.add_argument("--backend", default="auto", help="auto|torch|onnxruntime|tensorrt (default auto)")
    ap.add_argument("--grid", default=None, help="model grid DxHxW for the random model (default 80x96x112)")
    ap.add_argument("--png", action="store_true", help="also render qc.png in the write stage")
    ap.add_argument("--affine", action="store_true", help="include the affine pre-alignment")
    args = C.finish_args(ap.parse_args(argv), "register_e2e")
    C.check_outputs_writable(args.out, args.force)

    import torch

    torch.set_num_threads(args.threads)
    from emorph_deploy.registration import Registrar
    from emorph_deploy.registration.pipeline import load_inputs

    result = C.new_result("register_e2e", args, argv)
    tmp = Path(tempfile.mkdtemp(prefix="emorph-bench-reg-"))
    grid = C.parse_size(args.grid) if args.grid else ((32, 32, 32) if args.quick else C.DEFAULT_GRID)
    # label: the short name of the model in run_all's summary ("case" below)
    if args.onnx:
        artifact, desc = Path(args.onnx), f"ONNX {args.onnx}"
        label = desc
    elif args.model:
        artifact, desc = Path(args.model), f"checkpoint {args.model}"
        label = "default model" if _is_packaged_default(Path(args.model)) else args.model
    else:
        spacing = 6.0 if args.quick else (2.0 if tuple(grid) == C.DEFAULT_GRID else 1.0)
        artifact, desc = C.make_checkpoint(
            tmp, grid, overrides=C.QUICK_OVERRIDES if args.quick else None, spacing_mm=spacing
        )
        label = "random-init em-23-hires"
    C.log(f"model: {desc}")
    pair = _pair(tmp, 2 if args.quick else 1)
    reg = Registrar.load(artifact, backend=args.backend, affine=args.affine)
    C.log(
        f"backend {reg.backend} ({reg.precision}), grid {C.fmt_size(reg.grid_shape)}; "
        f"notes {reg.backend_notes}"
    )

    per_run: list[dict[str, float]] = []
    qc_last: dict[str, Any] = {}
    for i in range(args.warmup + args.runs):
        t0 = time.perf_counter()
        f_img, m_img, l_img = load_inputs(pair["fixed"], pair["moving"], pair["labels"])
        t_load = time.perf_counter() - t0
        res = reg.register(f_img, m_img, l_img, validate=False)
        res.save(tmp / "out", force=True, qc_png=args.png)
        times = dict(res.qc["times_s"])
        times["load"] = t_load + times.get("load", 0.0)
        times["model"] = float(res.qc.get("model_latency_s") or times["infer"])
        times["e2e"] = sum(times.get(s, 0.0) for s in STAGES)
        times["e2e_no_write"] = times["e2e"] - times.get("write", 0.0)
        C.log(
            f"{'warm-up' if i < args.warmup else 'run'} {i}: e2e {times['e2e']:.3f} s, "
            f"model {times['model']:.3f} s"
        )
        if i >= args.warmup:
            per_run.append(times)
        qc_last = res.qc
        del res

    timings = {
        key: C.Timing([t[key] for t in per_run if key in t])
        for key in (*STAGES, "model", "e2e_no_write", "e2e")
        if any(key in t for t in per_run)
    }

    def med(key: str) -> float | None:
        return timings[key].median_s if key in timings else None

    e2e = med("e2e")
    rows = [
        {
            "stage": key,
            "median_s": t.median_s,
            "min_s": t.min_s,
            "p90_s": t.p90_s,
            "share_of_e2e": t.median_s / e2e,
        }
        for key, t in timings.items()
    ]
    result["rows"] = rows
    model_s = med("model")
    result["summary"] = {
        "backend": reg.backend,
        "precision": reg.precision,
        "grid": list(reg.grid_shape),
        "native_shape": qc_last.get("fixed_shape"),
        "model": desc,
        "case": f"{label}, grid {C.fmt_size(reg.grid_shape)}",
        "model_median_s": model_s,
        "e2e_median_s": e2e,
        "e2e_no_write_median_s": med("e2e_no_write"),
        "e2e_over_model": C.ratio(e2e, model_s),
        "e2e_no_write_over_model": C.ratio(med("e2e_no_write"), model_s),
        "target_e2e_over_model": 1.3,
    }
    result["notes"] += [
        f"native grid {qc_last.get('fixed_shape')} (1 mm MNI152) → model grid {C.fmt_size(reg.grid_shape)}; "
        "load = gzip decode + validation of fixed, moving and labels; write = gzip of 3 NIfTI files + qc.json"
        + (" + qc.png" if args.png else ""),
        "model = the runner's own forward time; infer = model + feed validation + the lock",
    ]
    body = C.md_table(
        ["stage", "median s", "min s", "p90 s", "share of e2e"],
        [
            (
                r["stage"],
                C.fmt(r["median_s"], ".3f"),
                C.fmt(r["min_s"], ".3f"),
                C.fmt(r["p90_s"], ".3f"),
                C.fmt(100 * r["share_of_e2e"], ".1f") + " %",
            )
            for r in rows
        ],
    )
    s = result["summary"]
    body += (
        f"\n\nEnd-to-end / model forward: **{C.fmt(s['e2e_over_model'], '.2f')}×** with writing, "
        f"**{C.fmt(s['e2e_no_write_over_model'], '.2f')}×** without (target ≤ 1.3×).\n"
    )
    C.finalize(result)
    paths = C.write_results(
        result, args.out, C.markdown_document(result, "Registration end to end", body), force=args.force
    )
    print(body)
    C.log(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
