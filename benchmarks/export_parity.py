"""Export parity benchmark: PyTorch eager vs ONNX Runtime fp32, gather vs native GridSample.

Default: the default model (``em-23-hires``) at 160×192×224. Without ``--checkpoint`` the weights are a
seeded random init whose flow head is rescaled so the flow has an RMS of ``--flow-rms`` voxels (a real
warp, not ~0: the untrained head is initialised at N(0, 1e-5)). One synthetic pair (emorph_deploy.data)
is fed to every backend. Reported per backend: max/mean per-voxel |Δflow| (voxels) and max |Δwarped| vs
torch eager, and the median latency of ``--runs`` runs after ``--warmup`` warm-up runs, with the thread
count used. Writes ``<out>.json`` and ``<out>.md`` (default benchmarks/results/export_parity).

    python benchmarks/export_parity.py [--size 160x192x224] [--runs 5] [--threads 2] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C


def _timed(
    runner, feed: dict[str, np.ndarray], warmup: int, runs: int
) -> tuple[dict[str, np.ndarray], C.Timing]:
    """Last output and the runner's own latencies of ``runs`` calls after ``warmup`` calls."""
    box: dict[str, Any] = {}
    t = C.time_call(
        lambda: box.update(out=runner.infer(feed)), runs, warmup, timer=lambda: runner.last_latency_s
    )
    return box["out"], t


def _diff(a: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    d, out = C.flow_diff(a["flow"], ref["flow"])  # d: (3, D, H, W)
    out["max_abs_dflow_component_voxel"] = float(np.abs(d).max())
    if "warped" in a and "warped" in ref:
        out["max_dwarped"] = float(np.abs(a["warped"].astype(np.float64) - ref["warped"]).max())
    return out


def _make_checkpoint(size: tuple[int, int, int], flow_rms: float, folder: Path, threads: int) -> Path:
    import torch

    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.models import create_model
    from emorph_deploy.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = create_model("em-23-hires", img_size=size).eval()
    if flow_rms > 0:
        gen = torch.Generator().manual_seed(1)
        x = (torch.rand((1, 1, *size), generator=gen), torch.rand((1, 1, *size), generator=gen))
        with torch.inference_mode():
            _, flow = model(*x)
        rms = float(flow.pow(2).mean().sqrt())
        head = model.flow_head
        with torch.no_grad():
            for p in head.parameters():
                p.mul_(flow_rms / max(rms, 1e-12))
    stem = folder / "em-23-hires-random"
    pre = Preprocessing(grid_shape=size, spacing_mm=(1.0, 1.0, 1.0))
    note = {"note": "random init, benchmark only"}
    save_checkpoint(model, stem, preprocessing=pre, training=note, force=True)
    return stem.with_suffix(".json")


def _markdown(res: dict[str, Any]) -> str:
    env = res["environment"]
    lines = [
        "# Export parity: PyTorch eager vs ONNX Runtime (fp32)",
        "",
        f"Model `{res['model']}` at {'×'.join(map(str, res['grid_shape']))}, weights: {res['weights']}.",
        f"Threads: torch {env['torch_threads']}, onnxruntime intra-op {env['ort_intra_op_threads']} "
        f"(machine: {env['cpu_count']} logical CPUs, {env['platform']}).",
        f"Latency: median of {res['runs']} runs after {res['warmup']} warm-up run(s), model only "
        "(no I/O, no preprocessing).",
        f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, onnx {env['onnx']}. "
        f"Reference flow: max |flow| {res['reference_flow_max_voxel']:.2f} voxels, "
        f"RMS {res['reference_flow_rms_voxel']:.2f}.",
        "",
        "| backend | grid sample | opset | max \\|Δflow\\| (vox) | mean \\|Δflow\\| (vox) "
        "| max \\|Δwarped\\| "
        "| median latency (s) | export (s) | ONNX MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict[str, Any], key: str, spec: str) -> str:
        return format(r[key], spec) if key in r else "-"

    for r in res["rows"]:
        lines.append(
            f"| {r['backend']} | {r.get('grid_sample', 'reference')} | {r.get('opset', '-')} "
            f"| {cell(r, 'max_dflow_voxel', '.3g')} | {cell(r, 'mean_dflow_voxel', '.3g')} "
            f"| {cell(r, 'max_dwarped', '.3g')} | {r['latency_median_s']:.2f} "
            f"| {cell(r, 'export_s', '.1f')} | {cell(r, 'onnx_mb', '.1f')} |"
        )
    lines += [
        "",
        "|Δflow| is the per-voxel Euclidean norm of the flow difference vs torch eager (grid_sample warp);",
        "fp32 tolerance of `emorph check`: max |Δflow| ≤ 1e-3 voxel.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="160x192x224")
    ap.add_argument("--checkpoint", default=None, help="use this checkpoint instead of a random init")
    ap.add_argument("--flow-rms", type=float, default=2.0, help="random init: flow RMS in voxels")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default="benchmarks/results/export_parity")
    ap.add_argument("--force", action="store_true", help="overwrite existing results")
    args = ap.parse_args(argv)
    if args.runs < 5:
        print("note: fewer than 5 timed runs", file=sys.stderr)

    import onnx
    import onnxruntime
    import torch

    from emorph_deploy.data.synthetic import synth_pair
    from emorph_deploy.export import onnx_from_checkpoint
    from emorph_deploy.fileio import check_writable, write_bytes_atomic, write_json_atomic
    from emorph_deploy.runners import OnnxRuntimeRunner, TorchRunner

    out_json, out_md = Path(args.out).with_suffix(".json"), Path(args.out).with_suffix(".md")
    check_writable(out_json, args.force)
    check_writable(out_md, args.force)
    size = C.parse_size(args.size)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="emorph-parity-") as tmp:
        tmp_dir = Path(tmp)
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
            weights = f"checkpoint {ckpt}"
        else:
            t0 = time.perf_counter()
            ckpt = _make_checkpoint(size, args.flow_rms, tmp_dir, args.threads)
            weights = f"random init (seed 0), flow head rescaled to flow RMS {args.flow_rms} voxels"
            print(f"random checkpoint in {time.perf_counter() - t0:.1f} s", flush=True)

        pair = synth_pair(size, seed=0)
        feed = {
            "moving": np.ascontiguousarray(pair.moving, dtype=np.float32)[None, None],
            "fixed": np.ascontiguousarray(pair.fixed, dtype=np.float32)[None, None],
        }
        ref_runner = TorchRunner(ckpt, threads=args.threads)
        if tuple(ref_runner.grid_shape) != size:
            raise SystemExit(f"checkpoint grid {ref_runner.grid_shape} differs from --size {size}")
        ref, ref_t = _timed(ref_runner, feed, args.warmup, args.runs)
        print(f"torch eager: median {ref_t.median_s:.2f} s", flush=True)
        fr = ref["flow"][0].astype(np.float64)
        rows: list[dict[str, Any]] = [
            {
                "backend": f"torch {torch.__version__} eager (grid_sample warp)",
                "latency_median_s": ref_t.median_s,
                "latencies_s": ref_t.times_s,
            }
        ]
        for mode in ("gather", "native"):
            onnx_path = tmp_dir / f"parity-{mode}.onnx"
            t0 = time.perf_counter()
            onnx_from_checkpoint(ckpt, onnx_path, grid_sample=mode, target="onnxruntime", force=True)
            export_s = time.perf_counter() - t0
            meta = json.loads(onnx_path.with_suffix(".json").read_text())
            runner = OnnxRuntimeRunner(onnx_path, threads=args.threads, providers="cpu")
            out, t = _timed(runner, feed, args.warmup, args.runs)
            runner.close()
            row = {
                "backend": f"onnxruntime {onnxruntime.__version__} CPU",
                "grid_sample": mode,
                "opset": meta["opset"],
                "n_op_types": len(meta["ops"]),
                "tensorrt_parser_ok": meta["tensorrt_check"]["ok"],
                "export_s": export_s,
                "onnx_mb": onnx_path.stat().st_size / 1e6,
                "latency_median_s": t.median_s,
                "latencies_s": t.times_s,
                **_diff(out, ref),
            }
            rows.append(row)
            print(
                f"onnxruntime {mode}: max|Δflow| {row['max_dflow_voxel']:.3g} vox, "
                f"median {row['latency_median_s']:.2f} s (export {export_s:.1f} s)",
                flush=True,
            )

    res = {
        "benchmark": "export_parity",
        "model": "em-23-hires",
        "grid_shape": list(size),
        "weights": weights,
        "runs": args.runs,
        "warmup": args.warmup,
        "reference_flow_max_voxel": float(np.sqrt((fr * fr).sum(0)).max()),
        "reference_flow_rms_voxel": float(np.sqrt((fr * fr).mean())),
        "environment": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__,
            "torch_threads": torch.get_num_threads(),
            "ort_intra_op_threads": args.threads,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "rows": rows,
    }
    write_json_atomic(out_json, res, force=args.force)
    write_bytes_atomic(out_md, _markdown(res).encode(), force=args.force)
    print(_markdown(res))
    print(f"wrote {out_json} and {out_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
