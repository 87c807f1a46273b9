"""Peak memory (RSS) of inference at 160×192×224 and of one training step at the default grid (80×96×112).

Each measurement runs in a fresh subprocess that reports its own ``VmHWM`` (peak resident set of its address
space, /proc/self/status): the kernel's high-water mark, so short peaks are not missed by polling. Rows:

* ``infer-torch``: torch eager, ``inference_mode``, one forward (after one warm-up forward);
* ``infer-ort-native`` / ``infer-ort-gather``: ONNX Runtime CPU fp32 session (runner defaults) + two runs;
  ``infer-ort-native-arena-off``: the same with ``enable_cpu_mem_arena=False``;
* ``train-step``: ``emorph_deploy.train.loop.Trainer`` with the default TrainConfig at the 2 mm grid, one
  ``train_iteration`` (both directions, one Adam step each, NCC + diffusion + Dice as in ``emorph train``);
* ``*-cuda``: peak ``torch.cuda.max_memory_allocated`` as well, when a CUDA GPU is present.

Every worker runs with emorph's allocator setting (:func:`emorph_deploy.runtime.keep_freed_memory`, as the
CLI and ``load_runner`` do) and ONNX Runtime rows with the runner's session options (no memory pattern).
Each row also gives the RSS before the measured work (imports, weights, inputs) so the working set is
visible.
Target: inference peak RSS ≤ 3 GB at 160×192×224.

    python benchmarks/memory.py [--quick] [--threads 2] [--model CHECKPOINT] [--only REGEX] [--force]
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

NAME = "memory"
TARGET_INFER_BYTES = 3e9  # "3 GB"


# ================================================================================================ worker side
def _rss() -> int | None:
    return C.current_rss_bytes()


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    out: dict[str, Any] = {"id": spec["row"]}
    kind = spec["kind"]
    out["allocator"] = C.use_allocator()  # emorph's default in the CLI and load_runner (reuses freed blocks)
    grid = tuple(spec["grid"])
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    if kind == "torch":
        import torch

        from emorph_deploy.train.checkpoint import load_checkpoint

        torch.set_num_threads(spec["threads"])
        device = spec.get("device", "cpu")
        model, _ = load_checkpoint(spec["artifact"], map_location=device)
        x = torch.from_numpy(rng.random((1, 1, *grid), dtype=np.float32)).to(device)
        y = torch.from_numpy(rng.random((1, 1, *grid), dtype=np.float32)).to(device)
        out["rss_before_bytes"] = _rss()
        out["hwm_before_bytes"] = C.self_peak_rss_bytes()
        with torch.inference_mode():
            for _ in range(2):
                warped, flow = model(x, y)
                del warped, flow
        if device != "cpu":
            out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    elif kind == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = spec["threads"]
        so.inter_op_num_threads = 1
        so.enable_cpu_mem_arena = bool(spec.get("arena", True))
        so.enable_mem_pattern = bool(spec.get("mem_pattern", False))  # the runner's setting
        so.log_severity_level = 3
        sess = ort.InferenceSession(spec["artifact"], sess_options=so, providers=["CPUExecutionProvider"])
        feed = {
            "moving": rng.random((1, 1, *grid), dtype=np.float32),
            "fixed": rng.random((1, 1, *grid), dtype=np.float32),
        }
        names = [o.name for o in sess.get_outputs()]
        out["rss_before_bytes"] = _rss()
        out["hwm_before_bytes"] = C.self_peak_rss_bytes()
        for _ in range(2):
            res = sess.run(names, feed)
            del res
    elif kind == "train":
        import torch

        from emorph_deploy.train.config import TrainConfig
        from emorph_deploy.train.loop import Trainer

        torch.set_num_threads(spec["threads"])
        cfg_kw: dict[str, Any] = {
            "grid": "2mm",
            "out": spec["tmp"],
            "workers": 0,
            "device": spec.get("device", "cpu"),
        }
        if spec.get("grid_shape"):
            cfg_kw["grid_shape"] = tuple(spec["grid_shape"])
        if spec.get("model_overrides"):
            cfg_kw["model_overrides"] = dict(spec["model_overrides"])
        if spec.get("model"):
            cfg_kw["model"] = spec["model"]
        trainer = Trainer(TrainConfig(**cfg_kw), echo=lambda _m: None)
        trainer.model.train()
        batch = torch.utils.data.default_collate([trainer.train_ds[0]])
        out["train_config"] = {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg_kw.items() if k != "out"
        }
        out["grid"] = list(trainer.pre.grid_shape)
        out["rss_before_bytes"] = _rss()
        out["hwm_before_bytes"] = C.self_peak_rss_bytes()
        t1 = time.perf_counter()
        parts = trainer.train_iteration(batch)
        out["step_s"] = time.perf_counter() - t1
        out["loss"] = float(parts.get("loss", float("nan")))
        out["bidirectional"] = bool(trainer.cfg.bidirectional)
        if spec.get("device", "cpu") != "cpu":
            out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    else:
        raise ValueError(kind)
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_bytes"] = C.self_peak_rss_bytes()
    out["ok"] = True
    return out


def _run_worker_safe(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        return _worker(spec)
    except Exception as exc:
        return {
            "id": spec["row"],
            "ok": False,
            "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}",
        }


# ================================================================================================ parent side
def _markdown(res: dict[str, Any]) -> str:
    rows = []
    for r in res["rows"]:
        if not r.get("ok"):
            rows.append(
                [
                    r["row"],
                    r["what"],
                    C.fmt_size(r["grid"]),
                    "failed: " + r.get("error", "?")[:150],
                    "",
                    "",
                    "",
                ]
            )
            continue
        rows.append(
            [
                r["row"],
                r["what"],
                C.fmt_size(r["grid"]),
                f"{r['peak_rss_bytes'] / 1e9:.2f} GB ({r['peak_rss_bytes'] / 2**30:.2f} GiB)",
                C.fmt(C.gib(r.get("rss_before_bytes")), ".2f"),
                C.fmt(
                    None
                    if r.get("cuda_max_allocated_bytes") is None
                    else r["cuda_max_allocated_bytes"] / 2**30,
                    ".2f",
                ),
                C.fmt(r.get("seconds"), ".3g"),
            ]
        )
    body = [
        C.md_table(
            ["row", "what", "grid", "peak RSS", "RSS before the work (GiB)", "GPU peak (GiB)", "seconds"],
            rows,
        ),
        "",
    ]
    t = res["summary"].get("target")
    if t:
        body += [
            f"Target: inference peak RSS ≤ 3 GB at {t['grid']}: largest inference row **{t['row']}** "
            f"{t['peak_gb']:.2f} GB → {'met' if t['met'] else '**missed**'} "
            f"({t['peak_gb'] / 3.0:.2f}× the budget).",
            "",
        ]
    body += [
        "Peak RSS = the subprocess's own VmHWM (kernel high-water mark of its resident set), including the "
        "Python interpreter, torch/onnxruntime libraries and weights; 'RSS before' is the resident set after "
        "imports, weights and inputs, just before the measured work."
    ]
    return C.markdown_document(res, "Peak memory", "\n".join(body))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_worker"]:
        C.child_report(_run_worker_safe(json.loads(argv[1])))
        return 0
    ap = C.base_parser(__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", default=None, help="trained checkpoint (its weights/config); default random init"
    )
    ap.add_argument(
        "--infer-grid", default=None, help="inference grid (default 160x192x224; --quick 32x32x32)"
    )
    ap.add_argument("--only", default=None, help="regex on row names")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per row")
    args = C.finish_args(ap.parse_args(argv), NAME)
    grid = C.parse_size(args.infer_grid) if args.infer_grid else ((32, 32, 32) if args.quick else C.FULL_GRID)
    C.check_outputs_writable(args.out, args.force)
    res = C.new_result(NAME, args, argv)
    gpu = res["machine"].get("gpu") or {}
    overrides = C.QUICK_OVERRIDES if args.quick and not args.model else None
    train_grid = (24, 32, 32) if args.quick else C.DEFAULT_GRID
    with tempfile.TemporaryDirectory(prefix="emorph-memory-") as tmp_s:
        tmp = Path(tmp_s)
        specs: list[dict[str, Any]] = []
        want = [
            n
            for n in (
                "infer-torch",
                "infer-ort-native",
                "infer-ort-gather",
                "infer-ort-native-arena-off",
                "train-step",
                "infer-torch-cuda",
                "train-step-cuda",
            )
            if not args.only or re.search(args.only, n)
        ]
        ck = onnx = None
        if any(n.startswith("infer") for n in want):
            t0 = time.perf_counter()
            ck, desc = C.make_checkpoint(tmp, grid, source=args.model, overrides=overrides, flow_rms=0.0)
            res["summary"]["weights"] = desc
            C.log(f"checkpoint at {C.fmt_size(grid)} in {time.perf_counter() - t0:.1f} s")
        onnx: dict[str, Path | None] = {}
        for warp in ("native", "gather"):
            if ck and any(n.startswith(f"infer-ort-{warp}") for n in want):
                from emorph_deploy.export import onnx_from_checkpoint

                t0 = time.perf_counter()
                try:
                    onnx[warp] = onnx_from_checkpoint(
                        ck, tmp / f"m-{warp}.onnx", grid_sample=warp, target="onnxruntime", force=True
                    )
                    C.log(f"exported {warp} ONNX in {time.perf_counter() - t0:.1f} s")
                except Exception as exc:
                    res["notes"].append(f"ONNX export ({warp}) failed: {type(exc).__name__}: {exc}")
        base = {"threads": args.threads, "tmp": str(tmp / "train")}
        for n in want:
            if n == "infer-torch":
                specs.append(
                    {
                        **base,
                        "row": n,
                        "kind": "torch",
                        "artifact": str(ck),
                        "grid": list(grid),
                        "what": "inference, torch eager (inference_mode)",
                    }
                )
            elif n.startswith("infer-ort") and onnx.get("gather" if "gather" in n else "native"):
                warp = "gather" if "gather" in n else "native"
                specs.append(
                    {
                        **base,
                        "row": n,
                        "kind": "onnxruntime",
                        "artifact": str(onnx[warp]),
                        "grid": list(grid),
                        "arena": "arena-off" not in n,
                        "what": f"inference, ONNX Runtime CPU fp32 ({warp} warp"
                        + (", arena off)" if "arena-off" in n else ")"),
                    }
                )
            elif n == "train-step":
                spec = {
                    **base,
                    "row": n,
                    "kind": "train",
                    "grid": list(train_grid),
                    "what": "one training iteration (both directions, Adam), default TrainConfig",
                }
                if args.quick:
                    spec["grid_shape"] = list(train_grid)
                if overrides:
                    spec["model_overrides"] = {
                        k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()
                    }
                specs.append(spec)
            elif n.endswith("-cuda"):
                if not gpu.get("available"):
                    res["summary"].setdefault("skipped", {})[n] = f"no CUDA GPU ({gpu.get('reason')})"
                elif n == "infer-torch-cuda" and ck:
                    specs.append(
                        {
                            **base,
                            "row": n,
                            "kind": "torch",
                            "artifact": str(ck),
                            "grid": list(grid),
                            "device": "cuda",
                            "what": "inference, torch eager on the GPU",
                        }
                    )
                elif n == "train-step-cuda":
                    specs.append(
                        {
                            **base,
                            "row": n,
                            "kind": "train",
                            "grid": list(train_grid),
                            "device": "cuda",
                            "what": "one training iteration on the GPU",
                            **({"grid_shape": list(train_grid)} if args.quick else {}),
                        }
                    )
        for spec in specs:
            C.log(f"{spec['row']} ...")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
            m = C.run_measured(cmd, env=C.thread_env(args.threads), timeout=args.timeout)
            r = m.report or {"ok": False, "error": f"worker died: {m.error_line()}"}
            row = {
                "row": spec["row"],
                "what": spec["what"],
                "grid": r.get("grid", spec["grid"]),
                **{k: v for k, v in r.items() if k not in ("id", "grid")},
                "rusage_maxrss_bytes": m.rusage_maxrss_bytes,
                "process_wall_s": m.wall_s,
            }
            if r.get("ok"):
                C.log(f"{spec['row']}: peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")
            else:
                C.log(f"{spec['row']}: FAILED {r.get('error')}")
            res["rows"].append(row)
    infer = [
        r for r in res["rows"] if r.get("ok") and r["row"].startswith("infer") and "cuda" not in r["row"]
    ]
    if infer:
        worst = max(infer, key=lambda r: r["peak_rss_bytes"])
        res["summary"]["target"] = {
            "grid": C.fmt_size(grid),
            "row": worst["row"],
            "peak_gb": worst["peak_rss_bytes"] / 1e9,
            "met": worst["peak_rss_bytes"] <= TARGET_INFER_BYTES,
        }
        res["summary"]["infer_peak_rss_gb"] = {r["row"]: r["peak_rss_bytes"] / 1e9 for r in infer}
    train = next((r for r in res["rows"] if r.get("ok") and r["row"] == "train-step"), None)
    if train:
        res["summary"]["train_step_peak_rss_gb"] = train["peak_rss_bytes"] / 1e9
    if args.quick:
        res["notes"].append(
            f"--quick: narrow model ({C.QUICK_OVERRIDES}), tiny grids — not the real footprint."
        )
    for k, v in (res["summary"].get("skipped") or {}).items():
        res["notes"].append(f"skipped {k}: {v}")
    C.publish(res, _markdown, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
