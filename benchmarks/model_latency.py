"""Model-only latency per backend, option set and precision, against the compute bound.

For each grid (default 160×192×224 and the default model's 80×96×112) one held-out MNI152 template pair is fed
to every configuration; each configuration runs in a fresh subprocess (``--isolate process``, default; no
thread-pool or allocator state shared between rows) with ``--threads`` threads: ``--warmup`` warm-up runs,
then the median (min, p90) of ``--runs`` timed runs. Model only: inputs already on the model grid, no I/O.

Rows
* torch eager, the model as written (reference ops, ``EMORPH_FAST_PATH=0``; ``inference_mode``, grid_sample
  warp) — the baseline of every speed-up and Δflow; then emorph's eager CPU fast path (the default) and its
  variants: ``no_grad``, gather warp,
  ``channels_last_3d``, ``torch.backends.mkldnn.enabled=False``, ``torch.jit.trace`` + ``torch.jit.freeze``
  (with/without ``optimize_for_inference``), ``torch.compile`` (inductor; with/without
  ``torch._inductor.config.freezing``; first-call compile time reported separately);
* ONNX Runtime CPU fp32 with the native 5D GridSample (opset 20) and the gather warp (opset 17): the runner's
  default session, then one option changed at a time (graph optimisation basic/extended, CPU memory arena off,
  parallel execution mode, no intra-op spinning, one intra-op thread); the best native option set is also
  applied to the gather graph;
* fp16 (Model Optimizer AutoCast) and int8 (QDQ, synthetic calibration) graphs in ONNX Runtime CPU — accuracy
  checks (flow difference vs fp32), not speed-ups: ONNX Runtime's CPU provider has few fp16/int8 3D kernels;
* TensorRT fp32/fp16 engines when a CUDA GPU is present (skipped with the reason otherwise).

Every row: median/min/p90, ``× bound`` (median / compute bound from ``compute_bound.py``'s method), speed-up
vs torch eager (reference ops), max/mean |Δflow| vs it (voxels), load and first-call seconds, peak RSS of its
process.
Targets at 160×192×224: fastest CPU fp32 path ≤ 1.5× bound and ≥ 1.6× faster than torch eager.

    python benchmarks/model_latency.py [--quick] [--threads 2] [--runs 5] [--grids 160x192x224,80x96x112]
        [--model CHECKPOINT] [--only REGEX] [--skip REGEX] [--no-compile] [--profile] [--force]
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

NAME = "model_latency"
#: held-out pair seed: training uses (seed, epoch, index) tuples with seed 0 / 104729; this is neither
HELDOUT_SEED = (8, 2026, 1)
TARGET_X_BOUND = 1.5
TARGET_SPEEDUP = 1.6

ORT_DEFAULT = {
    "opt_level": "all",
    "arena": True,
    "mem_pattern": False,  # the runner's setting (peak RSS 2.96 → 1.76 GiB at 160×192×224)
    "execution_mode": "sequential",
    "inter_op": 1,
    "spinning": True,
}
#: one option changed at a time from ORT_DEFAULT (the runner's session)
ORT_SWEEP: dict[str, dict[str, Any]] = {
    "default": {},
    "sysmem": {"malloc": "system"},  # glibc's default allocator instead of emorph's keep_freed_memory
    "opt-basic": {"opt_level": "basic"},
    "opt-extended": {"opt_level": "extended"},
    "arena-off": {"arena": False},
    "mem-pattern-on": {"mem_pattern": True},
    "parallel": {"execution_mode": "parallel", "inter_op": "threads"},  # inter-op pool = --threads
    "no-spin": {"spinning": False},
    "intra-1": {"intra_op": 1},  # thread scaling: one intra-op thread (skipped when --threads 1)
}


# ================================================================================================ worker side
def _torch_callable(spec: dict[str, Any], moving, fixed):
    import torch

    from emorph_deploy.export.loaders import set_sampler
    from emorph_deploy.models.layers.fastpath import set_fast_path
    from emorph_deploy.train.checkpoint import load_checkpoint

    o = spec["options"]
    torch.set_num_threads(spec["threads"])
    set_fast_path(bool(o.get("fast_path", True)))
    torch.backends.mkldnn.enabled = bool(o.get("mkldnn", True))
    model, _ = load_checkpoint(spec["artifact"])
    model.eval()
    set_sampler(model, o.get("sampler", "grid_sample"))
    m = torch.from_numpy(moving)
    f = torch.from_numpy(fixed)
    if o.get("channels_last"):  # 5D weights only (Module.to(memory_format=...) rejects the 4D ones)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 5:
                    p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
        m = m.contiguous(memory_format=torch.channels_last_3d)
        f = f.contiguous(memory_format=torch.channels_last_3d)
    grad_ctx = torch.inference_mode if o.get("grad", "inference_mode") == "inference_mode" else torch.no_grad
    fn: Any = model
    info: dict[str, Any] = {}
    jit = o.get("jit", "none")
    if jit != "none":
        t0 = time.perf_counter()
        with torch.no_grad():
            traced = torch.jit.trace(model, (m, f), check_trace=False)
            fn = torch.jit.freeze(traced.eval())
            if jit == "freeze_ofi":
                fn = torch.jit.optimize_for_inference(fn)
        info["jit_prepare_s"] = time.perf_counter() - t0
    comp = o.get("compile", "none")
    if comp != "none":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = comp == "freezing"
        torch._dynamo.reset()  # inline mode: never reuse another row's compiled graph
        fn = torch.compile(model, mode=o.get("compile_mode", "default"))

    def call():
        with grad_ctx():
            _, flow = fn(m, f)
        return flow.contiguous().numpy()

    return call, info


def _ort_callable(spec: dict[str, Any], moving, fixed):
    import onnxruntime as ort

    o = {**ORT_DEFAULT, **spec["options"]}
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[o["opt_level"]]
    so.intra_op_num_threads = int(o.get("intra_op") or spec["threads"])
    so.inter_op_num_threads = int(spec["threads"] if o["inter_op"] == "threads" else o["inter_op"])
    so.enable_cpu_mem_arena = bool(o["arena"])
    so.enable_mem_pattern = bool(o["mem_pattern"])
    so.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL
        if o["execution_mode"] == "parallel"
        else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    if not o["spinning"]:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    if spec.get("profile_prefix"):
        so.enable_profiling = True
        so.profile_file_prefix = spec["profile_prefix"]
    sess = ort.InferenceSession(spec["artifact"], sess_options=so, providers=["CPUExecutionProvider"])
    names = [o_.name for o_ in sess.get_outputs()]
    flow_i = names.index("flow")
    feed = {"moving": moving, "fixed": fixed}

    def call():
        return sess.run(names, feed)[flow_i]  # all outputs (flow + warped), as the runner does

    info = {"providers": sess.get_providers(), "session_options": o}
    if spec.get("profile_prefix"):
        info["_session"] = sess
    return call, info


def _trt_callable(spec: dict[str, Any], moving, fixed):
    from emorph_deploy.runners import load_runner

    runner = load_runner(spec["artifact"], backend="tensorrt")
    feed = {"moving": moving, "fixed": fixed}

    def call():
        return runner.infer(feed)["flow"]

    return call, {"backend": runner.meta.get("backend")}


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one configuration, warm it up, time it, save its flow; return timings (never raises)."""
    import numpy as np

    res: dict[str, Any] = {"id": spec["id"]}
    try:
        res["allocator"] = C.use_allocator(spec["options"].get("malloc", "heap"))
        moving = np.load(spec["moving"])
        fixed = np.load(spec["fixed"])
        t0 = time.perf_counter()
        maker = {"torch": _torch_callable, "onnxruntime": _ort_callable, "tensorrt": _trt_callable}[
            spec["kind"]
        ]
        call, info = maker(spec, moving, fixed)
        res["load_s"] = time.perf_counter() - t0
        box: dict[str, Any] = {}

        def fn() -> None:
            box["flow"] = call()

        timing = C.time_call(fn, runs=spec["runs"], warmup=spec["warmup"])
        res["timing"] = timing.to_dict()
        res["first_call_s"] = timing.warmup_s[0] if timing.warmup_s else None
        # the machine's matmul peak drifts within minutes on a shared VM: measure it again
        # here, right after this row's timed runs, so its × bound can also be read against the same conditions
        res["peak_local"] = C.matmul_peak(threads=spec["threads"])
        sess = info.pop("_session", None)
        if sess is not None:
            res["profile_file"] = sess.end_profiling()
        res["info"] = info
        np.save(spec["flow_out"], np.asarray(box["flow"], dtype=np.float32))
        res["ok"] = True
    except Exception as exc:  # a failing configuration is a row with its error, not a crash
        res["ok"] = False
        res["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
    return res


# ================================================================================================ parent side
def _specs_for_grid(grid_tag: str, paths: dict[str, Any], args: Any) -> list[dict[str, Any]]:
    """All row specs of one grid (ORT 'tuned gather' is added later, after the native sweep)."""
    ck = str(paths["checkpoint"])
    specs: list[dict[str, Any]] = []

    def torch_row(rid: str, label: str, **options: Any) -> None:
        specs.append(
            {
                "id": f"{grid_tag}/{rid}",
                "row": rid,
                "kind": "torch",
                "label": label,
                "artifact": ck,
                "precision": "fp32",
                "options": options,
            }
        )

    torch_row(
        "torch-eager",
        "torch eager, the model as written (reference ops: MatMul/Softmax attention, nn.Conv3d, NCDHW "
        "decoder), glibc's default allocator; inference_mode, grid_sample warp — reference",
        fast_path=False,
        malloc="system",
    )
    torch_row(
        "torch-eager-heapmem",
        "torch eager, reference ops, freed memory kept for reuse (emorph.runtime.keep_freed_memory)",
        fast_path=False,
    )
    torch_row(
        "torch-eager-fast-sysmem",
        "torch eager, emorph's CPU fast path (SDPA, direct oneDNN convs, channels-last decoder), glibc's "
        "default allocator",
        malloc="system",
    )
    torch_row(
        "torch-eager-fast",
        "torch eager, emorph's fast path + freed memory kept for reuse — emorph's default torch path",
    )
    torch_row("torch-eager-no_grad", "torch eager, no_grad instead of inference_mode", grad="no_grad")
    torch_row("torch-eager-gather", "torch eager, gather warp", sampler="gather")
    torch_row("torch-channels_last_3d", "torch eager, channels_last_3d weights/inputs", channels_last=True)
    torch_row("torch-mkldnn-off", "torch eager, torch.backends.mkldnn.enabled=False", mkldnn=False)
    torch_row("torch-jit-freeze", "torch.jit.trace + torch.jit.freeze", jit="freeze", grad="no_grad")
    torch_row(
        "torch-jit-freeze-ofi",
        "torch.jit.freeze + optimize_for_inference (oneDNN)",
        jit="freeze_ofi",
        grad="no_grad",
    )
    if args.compile:
        torch_row("torch-compile", "torch.compile (inductor, default mode)", compile="default")
        torch_row(
            "torch-compile-freezing",
            "torch.compile + inductor freezing (oneDNN weight prepack)",
            compile="freezing",
        )
    for warp in ("native", "gather"):
        if paths.get(f"onnx_{warp}") is None:
            continue
        sweep = ORT_SWEEP if warp == "native" else {"default": {}}
        if args.threads == 1:
            sweep = {k: v for k, v in sweep.items() if k != "intra-1"}
        for key, opts in sweep.items():
            desc = ", ".join(f"{k}={v}" for k, v in opts.items()) or (
                "runner default (all, arena, no mem pattern, sequential)"
            )
            specs.append(
                {
                    "id": f"{grid_tag}/ort-{warp}-{key}",
                    "row": f"ort-{warp}-{key}",
                    "kind": "onnxruntime",
                    "label": f"ONNX Runtime CPU fp32, {warp} warp: {desc}",
                    "artifact": str(paths[f"onnx_{warp}"]),
                    "precision": "fp32",
                    "options": dict(opts),
                    "sweep_key": key,
                    "warp": warp,
                }
            )
    for prec in ("fp16", "int8"):
        if paths.get(f"onnx_{prec}"):
            specs.append(
                {
                    "id": f"{grid_tag}/ort-{prec}",
                    "row": f"ort-{prec}",
                    "kind": "onnxruntime",
                    "label": f"ONNX Runtime CPU {prec} graph (gather warp) — accuracy check, not a speed-up",
                    "artifact": str(paths[f"onnx_{prec}"]),
                    "precision": prec,
                    "options": {},
                    "accuracy_check": True,
                }
            )
    for prec, engine in (paths.get("engines") or {}).items():
        specs.append(
            {
                "id": f"{grid_tag}/tensorrt-{prec}",
                "row": f"tensorrt-{prec}",
                "kind": "tensorrt",
                "label": f"TensorRT {prec} engine (gather warp)",
                "artifact": str(engine),
                "precision": prec,
                "options": {},
            }
        )
    return specs


def _selected(row: str, args: Any) -> bool:
    if args.only and not re.search(args.only, row):
        return False
    return not (args.skip and re.search(args.skip, row))


def _execute(spec: dict[str, Any], args: Any) -> dict[str, Any]:
    if args.isolate == "inline":
        res = run_worker(spec)
        res["peak_rss_bytes"] = None
        return res
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    m = C.run_measured(cmd, env=C.thread_env(spec["threads"]), timeout=args.timeout)
    res = m.report or {"id": spec["id"], "ok": False, "error": f"worker died: {m.error_line()}"}
    res["peak_rss_bytes"] = m.peak_rss_bytes
    res["process_wall_s"] = m.wall_s
    return res


def _rms(a) -> float:
    import numpy as np

    return float(np.sqrt((a.astype(np.float64) ** 2).mean()))


def _flow_diff(flow, ref, ref_rms: float) -> dict[str, float]:
    import numpy as np

    d, out = C.flow_diff(flow, ref)
    out["rel_rms_dflow"] = float(np.sqrt((d * d).mean()) / max(ref_rms, 1e-12))
    return out


def _prepare_grid(grid: tuple[int, int, int], tmp: Path, args: Any, res: dict[str, Any]) -> dict[str, Any]:
    """Checkpoint, input pair, ONNX exports (native, gather), fp16/int8 graphs, TensorRT engines."""
    import numpy as np

    from emorph_deploy.data.synthetic import template_pair

    tag = "x".join(map(str, grid))
    folder = tmp / tag
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {}
    t0 = time.perf_counter()
    ck, desc = C.make_checkpoint(
        folder,
        grid,
        source=args.model,
        overrides=C.QUICK_OVERRIDES if args.quick and not args.model else None,
    )
    paths["checkpoint"], paths["weights"] = ck, desc
    pair = template_pair(grid, seed=HELDOUT_SEED, augment=False)
    for k in ("moving", "fixed"):
        paths[k] = folder / f"{k}.npy"
        np.save(paths[k], np.ascontiguousarray(getattr(pair, k), dtype=np.float32)[None, None])
    C.log(f"[{tag}] checkpoint + template pair in {time.perf_counter() - t0:.1f} s ({desc})")

    from emorph_deploy.export import onnx_from_checkpoint

    for warp in ("native", "gather"):
        if not any(_selected(f"ort-{warp}-{k}", args) for k in ORT_SWEEP) and not (
            warp == "gather" and any(_selected(f"ort-{p}", args) for p in ("fp16", "int8"))
        ):
            continue
        try:
            t0 = time.perf_counter()
            paths[f"onnx_{warp}"] = onnx_from_checkpoint(
                ck, folder / f"model-{warp}.onnx", grid_sample=warp, target="onnxruntime", force=True
            )
            C.log(f"[{tag}] exported {warp} ONNX in {time.perf_counter() - t0:.1f} s")
        except Exception as exc:
            res["notes"].append(f"{tag}: ONNX export ({warp}) failed: {type(exc).__name__}: {exc}")
            paths[f"onnx_{warp}"] = None
    gather = paths.get("onnx_gather")
    if gather and args.fp16 and _selected("ort-fp16", args):
        try:
            import onnx

            from emorph_deploy.engines import convert_fp16

            t0 = time.perf_counter()
            proto, _summary = convert_fp16(gather)
            paths["onnx_fp16"] = folder / "model-fp16.onnx"
            onnx.save(proto, str(paths["onnx_fp16"]))
            C.log(f"[{tag}] fp16 graph (AutoCast) in {time.perf_counter() - t0:.1f} s")
        except Exception as exc:
            res["notes"].append(f"{tag}: fp16 graph skipped: {type(exc).__name__}: {str(exc)[:200]}")
    if gather and args.int8 and _selected("ort-int8", args):
        try:
            from emorph_deploy.calibration import calibrate

            t0 = time.perf_counter()
            cal = calibrate(
                gather,
                synthetic=args.calib_pairs,
                out_dir=folder / "calib",
                force=True,
                progress=False,
                seed=1,
            )
            paths["onnx_int8"] = cal.qdq_onnx
            C.log(
                f"[{tag}] int8 QDQ graph ({args.calib_pairs} synthetic calibration pairs) in "
                f"{time.perf_counter() - t0:.1f} s"
            )
        except Exception as exc:
            res["notes"].append(f"{tag}: int8 graph skipped: {type(exc).__name__}: {str(exc)[:200]}")
    paths["engines"] = {}
    gpu = res["machine"].get("gpu") or {}
    if not any(_selected(f"tensorrt-{p}", args) for p in ("fp32", "fp16")):
        pass
    elif not gpu.get("available"):
        res["summary"].setdefault("skipped", {})["tensorrt"] = f"no CUDA GPU ({gpu.get('reason')})"
    elif gather:
        try:
            from emorph_deploy.engines import BuildOptions, build_engine

            for prec in ("fp32", "fp16"):
                r = build_engine(
                    gather, BuildOptions(precision=prec, out_dir=str(folder / "engines"), force=True)
                )
                paths["engines"][prec] = r.engine
        except Exception as exc:
            res["notes"].append(f"{tag}: TensorRT engines skipped: {type(exc).__name__}: {str(exc)[:200]}")
    return paths


def _summarise_grid(rows: list[dict[str, Any]], bound_s: float | None) -> dict[str, Any]:
    ok = [r for r in rows if r.get("ok")]
    eager = next((r for r in ok if r["row"] == "torch-eager"), None)
    cpu_fp32 = [r for r in ok if r["precision"] == "fp32" and r["kind"] != "tensorrt"]
    best = min(cpu_fp32, key=lambda r: r["median_s"], default=None)
    out: dict[str, Any] = {
        "bound_s": bound_s,
        "torch_eager_median_s": eager["median_s"] if eager else None,
        "fastest_cpu": best["row"] if best else None,
        "fastest_cpu_median_s": best["median_s"] if best else None,
    }
    out["fastest_x_bound"] = C.ratio(out["fastest_cpu_median_s"], bound_s)
    out["fastest_x_bound_local"] = best.get("x_bound_local") if best else None
    out["fastest_peak_local_gflops"] = best.get("peak_local_gflops") if best else None
    out["fastest_speedup_vs_eager"] = C.ratio(out["torch_eager_median_s"], out["fastest_cpu_median_s"])
    fast = next((r for r in ok if r["row"] == "torch-eager-fast"), None)
    out["torch_eager_fast_median_s"] = fast["median_s"] if fast else None
    out["fastest_speedup_vs_eager_fast"] = C.ratio(
        out["torch_eager_fast_median_s"], out["fastest_cpu_median_s"]
    )
    return out


def _markdown(res: dict[str, Any]) -> str:
    s = res["summary"]
    body: list[str] = [
        f"Matmul peak ({s['peak']['n']}³ fp32, {s['peak']['threads']} threads, median): "
        f"**{s['peak_gflops']:.1f} GFLOP/s**. Latency = median of {res['params']['runs']} runs after "
        f"{res['params']['warmup']} warm-up run(s), model only; each row in "
        f"{'its own process' if res['params']['isolate'] == 'process' else 'this process'}. "
        "× bound = median / (model GFLOP / matmul peak); × own-process peak uses the matmul peak measured "
        "again in the row's process right after its timed runs (the peak drifts on this VM). Speed-up and "
        "Δflow are vs torch eager running the model as written (`torch-eager`: reference ops, emorph's fast "
        "path off); `torch-eager-fast` is emorph's default eager path.",
        "",
    ]
    targets = s.get("targets")
    if targets:
        body += [
            "## Targets (issue 8)",
            "",
            C.md_table(
                ["target", "measured", "goal", "met"],
                [
                    [
                        f"fastest CPU path vs compute bound at {targets['grid']} ({targets['fastest_cpu']})",
                        f"{C.fmt(targets['x_bound'], '.2f')}× bound"
                        + (
                            f" ({C.fmt(targets['x_bound_local'], '.2f')}× against the "
                            f"{C.fmt(targets.get('peak_local_gflops'), '.1f')} GFLOP/s measured in its "
                            "own process)"
                            if targets.get("x_bound_local")
                            else ""
                        ),
                        f"≤ {TARGET_X_BOUND}×",
                        _yes(targets["x_bound_met"]),
                    ],
                    [
                        "fastest CPU path vs torch eager (reference ops)",
                        f"{C.fmt(targets['speedup'], '.2f')}× faster",
                        f"≥ {TARGET_SPEEDUP}×",
                        _yes(targets["speedup_met"]),
                    ],
                ],
            ),
            "",
        ]
    for grid_tag, g in s["grids"].items():
        body += [f"## {grid_tag}: {g['gflop']:.4g} GFLOP/forward, bound {C.fmt(g['bound_s'], '.3g')} s", ""]
        table = []
        for r in [r for r in res["rows"] if r["grid"] == grid_tag]:
            if not r.get("ok"):
                table.append(
                    [
                        r["row"],
                        r["label"],
                        r["precision"],
                        "failed: " + r.get("error", "?")[:120],
                        "",
                        "",
                        "",
                        "",
                        "",
                        "",
                        "",
                        "",
                    ]
                )
                continue
            table.append(
                [
                    r["row"] + (" *" if r.get("accuracy_check") else ""),
                    r["label"],
                    r["precision"],
                    f"{r['median_s']:.3g}",
                    f"{r['min_s']:.3g} / {r['p90_s']:.3g}",
                    C.fmt(r.get("x_bound"), ".2f"),
                    C.fmt(r.get("x_bound_local"), ".2f"),
                    C.fmt(r.get("speedup_vs_eager"), ".2f"),
                    C.fmt(r.get("max_dflow_voxel"), ".2g"),
                    C.fmt(r.get("load_s"), ".1f"),
                    C.fmt(r.get("first_call_s"), ".3g"),
                    C.fmt(C.gib(r.get("peak_rss_bytes")), ".2f"),
                ]
            )
        body += [
            C.md_table(
                [
                    "row",
                    "configuration",
                    "precision",
                    "median (s)",
                    "min / p90 (s)",
                    "× bound",
                    "× own-process peak",
                    "speed-up vs reference eager",
                    "max \\|Δflow\\| (vox)",
                    "load (s)",
                    "first call (s)",
                    "peak RSS (GiB)",
                ],
                table,
            ),
            "",
        ]
        body += [
            f"Fastest CPU fp32 path: **{g.get('fastest_cpu')}** — "
            f"{C.fmt(g.get('fastest_cpu_median_s'), '.3g')} s"
            f" = {C.fmt(g.get('fastest_x_bound'), '.2f')}× bound, "
            f"{C.fmt(g.get('fastest_speedup_vs_eager'), '.2f')}× torch eager (reference ops), "
            f"{C.fmt(g.get('fastest_speedup_vs_eager_fast'), '.2f')}× emorph's eager fast path.",
            "",
        ]
    body += [
        "\\* accuracy check: fp16/int8 graphs on the ONNX Runtime CPU provider are not expected to be faster "
        "(few fp16/int8 3D kernels, casts and Q/DQ around them); they show the flow error of the reduced "
        "precision graph that a GPU engine would run.",
        "",
    ]
    for k, v in (s.get("skipped") or {}).items():
        body.append(f"Skipped {k}: {v}.")
    return C.markdown_document(res, "Model-only latency", "\n".join(body))


def _yes(v: bool | None) -> str:
    return "n/a" if v is None else ("yes" if v else "**no**")


def _ort_profile_summary(path: str | Path) -> dict[str, Any]:
    """Kernel time per op type and per node from an ONNX Runtime profile, over the runs after the first
    (the first ``model_run`` is the warm-up: allocations, first-touch)."""
    events = json.loads(Path(path).read_text())
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in model_runs[1:]] or [(-1, float("inf"))]
    per_op: dict[str, float] = {}
    per_node: dict[str, float] = {}
    total = 0.0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in windows):
            continue
        op = e.get("args", {}).get("op_name", "?")
        dur = float(e.get("dur", 0)) / 1e6
        per_op[op] = per_op.get(op, 0.0) + dur
        node = e["name"][: -len("_kernel_time")]
        per_node[node] = per_node.get(node, 0.0) + dur
        total += dur
    runs = max(1, len(model_runs) - 1)
    run_s = [e["dur"] / 1e6 for e in model_runs[1:]]
    return {
        "profiled_runs": runs,
        "model_run_s": run_s,
        "kernel_s_per_run": total / runs,
        "by_op_type": sorted(
            ([k, v / runs, v / max(total, 1e-12)] for k, v in per_op.items()), key=lambda x: -x[1]
        ),
        "top_nodes": sorted(([k, v / runs] for k, v in per_node.items()), key=lambda x: -x[1])[:15],
    }


def _profile(
    grid_tag: str, paths: dict[str, Any], args: Any, best_ort: dict[str, Any] | None, tmp: Path
) -> dict[str, Any]:
    """ONNX Runtime per-op-type time (profiling JSON) and torch.profiler top ops for eager, one grid."""
    import numpy as np

    out: dict[str, Any] = {"grid": grid_tag}
    if best_ort is not None:
        spec = {
            **best_ort,
            "id": f"{grid_tag}/profile-ort",
            "runs": 2,
            "warmup": 1,
            "threads": args.threads,
            "moving": str(paths["moving"]),
            "fixed": str(paths["fixed"]),
            "flow_out": str(tmp / "profile_flow.npy"),
            "profile_prefix": str(tmp / "ort_profile"),
        }
        r = run_worker(spec)
        if r.get("ok") and r.get("profile_file"):
            out["ort"] = {"row": best_ort["row"], **_ort_profile_summary(r["profile_file"])}
        else:
            out["ort"] = {"error": r.get("error", "no profile file")}
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile

        from emorph_deploy.train.checkpoint import load_checkpoint

        torch.set_num_threads(args.threads)
        model, _ = load_checkpoint(paths["checkpoint"])
        m = torch.from_numpy(np.load(paths["moving"]))
        f = torch.from_numpy(np.load(paths["fixed"]))
        with torch.inference_mode():
            model(m, f)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                model(m, f)
        ka = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ka) / 1e6
        out["torch_eager"] = {
            "self_cpu_s_total": total,
            "top_ops": [
                [e.key, e.self_cpu_time_total / 1e6, e.count]
                for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:20]
            ],
        }
    except Exception as exc:
        out["torch_eager"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _profile_markdown(res: dict[str, Any], prof: dict[str, Any]) -> str:
    body = [
        f"Grid {prof['grid']}. Per-op-type kernel time from ONNX Runtime profiling of "
        f"`{prof.get('ort', {}).get('row')}` (runs after the first) and torch.profiler self CPU time of "
        "torch eager (one run after a warm-up).",
        "",
    ]
    o = prof.get("ort") or {}
    if "by_op_type" in o:
        body += [
            f"### ONNX Runtime ({o['kernel_s_per_run']:.3g} s of kernels per run)",
            "",
            C.md_table(
                ["op type", "s / run", "share"],
                [[k, f"{s:.3g}", f"{100 * p:.1f} %"] for k, s, p in o["by_op_type"][:20]],
            ),
            "",
            C.md_table(["node", "s / run"], [[k, f"{s:.3g}"] for k, s in o["top_nodes"]]),
            "",
        ]
    elif o:
        body += [f"ONNX Runtime profile failed: {o.get('error')}", ""]
    t = prof.get("torch_eager") or {}
    if "top_ops" in t:
        body += [
            f"### torch eager ({t['self_cpu_s_total']:.3g} s self CPU)",
            "",
            C.md_table(["op", "self CPU (s)", "calls"], [[k, f"{s:.3g}", n] for k, s, n in t["top_ops"]]),
            "",
        ]
    elif t:
        body += [f"torch profile failed: {t.get('error')}", ""]
    return C.markdown_document(res, "Where the time goes (profiles)", "\n".join(body))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_worker"]:  # internal: one configuration in a fresh process
        C.child_report(run_worker(json.loads(argv[1])))
        return 0
    ap = C.base_parser(__doc__.split("\n\n")[0])
    ap.add_argument(
        "--grids",
        default=None,
        help="comma list of DxHxW (default 160x192x224,80x96x112; --quick 32x32x32,16x24x32)",
    )
    ap.add_argument(
        "--model",
        default=None,
        help="trained checkpoint (.json/.safetensors); its weights are used at every grid "
        "(default: seeded random init of em-23-hires with a realistic flow magnitude)",
    )
    ap.add_argument("--only", default=None, help="regex: run only rows whose id matches (e.g. 'ort-native')")
    ap.add_argument("--skip", default=None, help="regex: skip rows whose id matches")
    ap.add_argument(
        "--isolate",
        choices=("process", "inline"),
        default=None,
        help="each row in a fresh subprocess (default) or in this process (default with --quick)",
    )
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="include torch.compile rows (default: on; off with --quick)",
    )
    ap.add_argument(
        "--fp16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the fp16 graph (accuracy check)",
    )
    ap.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the int8 QDQ graph (accuracy check)",
    )
    ap.add_argument("--calib-pairs", type=int, default=None, help="synthetic calibration pairs (default 2)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per row (process mode)")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also profile ONNX Runtime (best fp32 row) and torch eager on the first grid: "
        "<out>_profile.json/.md",
    )
    args = C.finish_args(ap.parse_args(argv), NAME)
    if args.isolate is None:
        args.isolate = "inline" if args.quick else "process"
    if args.compile is None:
        args.compile = not args.quick
    if args.calib_pairs is None:
        args.calib_pairs = 1 if args.quick else 2
    grids = (
        [C.parse_size(g) for g in args.grids.split(",")]
        if args.grids
        else list(C.QUICK_GRIDS if args.quick else (C.FULL_GRID, C.DEFAULT_GRID))
    )
    C.check_outputs_writable(args.out, args.force)
    if args.profile:
        C.check_outputs_writable(args.out + "_profile", args.force)

    import compute_bound
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    res = C.new_result(NAME, args, argv)
    C.log(f"matmul peak with {args.threads} threads ...")
    cb = compute_bound.compute(
        "em-23-hires",
        grids,
        512 if args.quick else 2048,
        args.threads,
        max(args.runs, 5),
        2,
        overrides=C.QUICK_OVERRIDES if args.quick and not args.model else None,
        checkpoint=args.model,
    )
    res["summary"].update({"peak": cb["peak"], "peak_gflops": cb["peak"]["gflops_median"], "grids": {}})
    C.log(f"peak {cb['peak']['gflops_median']:.1f} GFLOP/s")
    profile_out = None
    with tempfile.TemporaryDirectory(prefix="emorph-latency-") as tmp_s:
        tmp = Path(tmp_s)
        for gi, grid in enumerate(grids):
            tag = "x".join(map(str, grid))
            grid_tag = C.fmt_size(grid)
            brow = next(r for r in cb["rows"] if tuple(r["grid"]) == tuple(grid))
            paths = _prepare_grid(grid, tmp, args, res)
            res["summary"]["grids"][grid_tag] = {
                "gflop": brow["gflop"],
                "bound_s": brow["bound_s"],
                "weights": paths["weights"],
            }
            specs = [s for s in _specs_for_grid(tag, paths, args) if _selected(s["row"], args)]
            ref = None
            ref_rms = 0.0  # of the reference flow, computed once
            rows: list[dict[str, Any]] = []

            def run_spec(
                spec: dict[str, Any],
                grid_tag: str = grid_tag,
                brow: dict = brow,
                tmp: Path = tmp,
                tag: str = tag,
                rows: list = rows,
                paths: dict = paths,
            ) -> dict[str, Any]:
                nonlocal ref, ref_rms
                spec = {
                    **spec,
                    "threads": args.threads,
                    "runs": args.runs,
                    "warmup": args.warmup,
                    "moving": str(paths["moving"]),
                    "fixed": str(paths["fixed"]),
                    "flow_out": str(tmp / f"{tag}-{spec['row']}-flow.npy"),
                }
                C.log(f"[{tag}] {spec['row']} ...")
                r = _execute(spec, args)
                row = {k: v for k, v in spec.items() if k not in ("moving", "fixed", "flow_out", "artifact")}
                row.update({"grid": grid_tag, **{k: v for k, v in r.items() if k != "id"}})
                if r.get("ok"):
                    t = r["timing"]
                    row.update(
                        {
                            "median_s": t["median_s"],
                            "min_s": t["min_s"],
                            "p90_s": t["p90_s"],
                            "x_bound": C.ratio(t["median_s"], brow["bound_s"]),
                            "fraction_of_peak": C.ratio(brow["bound_s"], t["median_s"]),
                        }
                    )
                    local = (r.get("peak_local") or {}).get("gflops_median")
                    if local:
                        row["peak_local_gflops"] = local
                        row["x_bound_local"] = C.ratio(t["median_s"], brow["gflop"] / local)
                    flow = np.load(spec["flow_out"])
                    Path(spec["flow_out"]).unlink()
                    if spec["row"] == "torch-eager":
                        ref, ref_rms = flow, _rms(flow)
                    if ref is not None:
                        row.update(_flow_diff(flow, ref, ref_rms))
                    del flow
                    C.log(
                        f"[{tag}] {spec['row']}: median {t['median_s']:.3g} s ({row['x_bound']:.2f}× bound)"
                    )
                else:
                    C.log(f"[{tag}] {spec['row']}: FAILED {r.get('error')}")
                gc.collect()
                rows.append(row)
                return row

            for spec in specs:
                run_spec(spec)
            # the best native option set applied to the gather graph
            native = [r for r in rows if r.get("ok") and r.get("warp") == "native"]
            if native and paths.get("onnx_gather") and _selected("ort-gather-tuned", args):
                best = min(native, key=lambda r: r["median_s"])
                if best["sweep_key"] != "default":
                    run_spec(
                        {
                            "id": f"{tag}/ort-gather-tuned",
                            "row": "ort-gather-tuned",
                            "kind": "onnxruntime",
                            "label": "ONNX Runtime CPU fp32, gather warp, best native options "
                            f"({best['sweep_key']})",
                            "artifact": str(paths["onnx_gather"]),
                            "precision": "fp32",
                            "options": dict(best["options"]),
                            "warp": "gather",
                            "sweep_key": best["sweep_key"],
                        }
                    )
            eager = next((r for r in rows if r.get("ok") and r["row"] == "torch-eager"), None)
            for r in rows:
                if r.get("ok") and eager:
                    r["speedup_vs_eager"] = C.ratio(eager["median_s"], r["median_s"])
            res["rows"].extend(rows)
            res["summary"]["grids"][grid_tag].update(_summarise_grid(rows, brow["bound_s"]))
            if args.profile and gi == 0:
                ort_rows = [
                    r for r in rows if r.get("ok") and r["kind"] == "onnxruntime" and r["precision"] == "fp32"
                ]
                best_ort = min(ort_rows, key=lambda r: r["median_s"], default=None)
                if best_ort is not None:
                    best_ort = {**best_ort, "artifact": str(paths[f"onnx_{best_ort.get('warp', 'native')}"])}
                C.log(f"[{tag}] profiling ...")
                profile_out = _profile(grid_tag, paths, args, best_ort, tmp)
    first = C.fmt_size(grids[0])
    g0 = res["summary"]["grids"].get(first, {})
    if g0.get("fastest_cpu"):
        t = {
            "grid": first,
            "fastest_cpu": g0["fastest_cpu"],
            "x_bound": g0.get("fastest_x_bound"),
            "x_bound_local": g0.get("fastest_x_bound_local"),
            "peak_local_gflops": g0.get("fastest_peak_local_gflops"),
            "speedup": g0.get("fastest_speedup_vs_eager"),
        }
        t["x_bound_met"] = None if t["x_bound"] is None else t["x_bound"] <= TARGET_X_BOUND
        t["speedup_met"] = None if t["speedup"] is None else t["speedup"] >= TARGET_SPEEDUP
        res["summary"]["targets"] = t
        if (t["x_bound_met"] is False or t["speedup_met"] is False) and not args.quick:
            res["notes"].append(
                "A target is missed: see benchmarks/results/profile_notes.md (where the time goes; "
                "run with --profile for the op-level tables)."
            )
    if args.quick:
        res["notes"].append(
            f"--quick: a narrow em-23-hires ({C.QUICK_OVERRIDES}) on tiny grids; "
            "timings only exercise the script."
        )
    res["notes"].append(
        f"Input: held-out MNI152 template pair (template_pair seed {HELDOUT_SEED}, no intensity "
        "augmentation); the same arrays for every row."
    )
    C.publish(res, _markdown, args)
    if profile_out is not None:
        pres = {**res, "benchmark": NAME + "_profile", "rows": [], "summary": {"profile": profile_out}}
        pmd = _profile_markdown(pres, profile_out)
        pp = C.write_results(pres, args.out + "_profile", pmd, force=args.force)
        C.log(f"wrote {pp[0]} and {pp[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
