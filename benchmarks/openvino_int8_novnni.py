"""What refusing int8 forgoes on a CPU without VNNI/AMX: OpenVINO int8 (NNCF) vs fp32, outside the runner.

The runner refuses OpenVINO int8 on CPUs without an int8 dot product (AVX512-VNNI, AVX-VNNI, AMX-INT8): their
8-bit kernels sum pairs of products in 16 bits (``vpmaddubsw``), which can saturate. NNCF's ``overflow_fix``
works around it by quantising weights to 7 bits (``enable``: every layer; ``first_layer_only``, NNCF's
default; ``disable``). This script compiles the flow-only gather export of the checkpoint with OpenVINO
directly (no emorph runner, so no CPU guard), quantises it with NNCF on ``--calib-pairs`` synthetic pairs in
each ``overflow_fix`` mode, and reports per row: median (min) of ``--runs`` timed inferences after
``--warmup``, speed against fp32, and max / mean per-voxel |Δflow| (voxels) against OpenVINO fp32 over
``--pairs`` held-out synthetic pairs. On a CPU with VNNI/AMX it measures the same rows (there the runner
allows int8; ``openvino_latency.py`` is the full comparison).

    python benchmarks/openvino_int8_novnni.py [--quick] [--threads 2] [--runs 5] [--grid 80x96x112]
        [--calib-pairs 4] [--pairs 2]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

NAME = "openvino_int8_novnni"
QUICK_GRID = (16, 24, 32)
MODES = ("disable", "first_layer_only", "enable")


def _args(argv: list[str] | None) -> Any:
    ap = C.base_parser(__doc__ or NAME)
    ap.add_argument("--grid", default=None, help="DxHxW (default 80x96x112, the default model's grid)")
    ap.add_argument("--calib-pairs", type=int, default=4, help="synthetic pairs for NNCF calibration")
    ap.add_argument("--pairs", type=int, default=2, help="held-out synthetic pairs for |Δflow|")
    ap.add_argument("--note", action="append", default=[], help="a note for the results (e.g. machine load)")
    args = C.finish_args(ap.parse_args(argv), NAME)
    args.grid = C.parse_size(args.grid or C.fmt_size(QUICK_GRID if args.quick else C.DEFAULT_GRID))
    if args.pairs < 1 or args.calib_pairs < 1:
        ap.error(f"--pairs and --calib-pairs: expected 1 or more, got {args.pairs} and {args.calib_pairs}")
    return args


def _export(grid: tuple[int, int, int], tmp: Path, quick: bool) -> Path:
    from emorph_deploy.export import onnx_from_checkpoint

    ckpt, _ = C.grid_checkpoint(tmp, grid, quick)
    return Path(onnx_from_checkpoint(ckpt, tmp / "m.onnx", outputs="flow"))


def _quantised(model: Any, mode: str, calib_feeds: list[dict[str, Any]]) -> Any:
    """``model`` (an ``openvino.Model``) quantised by NNCF with ``overflow_fix`` = ``mode``."""
    import nncf

    params = nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix(mode))
    data = nncf.Dataset(calib_feeds)
    return nncf.quantize(model, data, subset_size=len(calib_feeds), advanced_parameters=params)


def _measure(core: Any, model: Any, feeds: list[dict[str, Any]], args: Any) -> tuple[C.Timing, list[Any]]:
    compiled = core.compile_model(
        model,
        "CPU",
        {
            "INFERENCE_NUM_THREADS": args.threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
        },
    )
    req = compiled.create_infer_request()
    flows = []
    for feed in feeds:
        req.infer(feed)
        flows.append(req.get_output_tensor(0).data.copy())
    timing = C.time_call(lambda: req.infer(feeds[0]), runs=args.runs, warmup=args.warmup)
    return timing, flows


def _run(args: Any, tmp: Path) -> list[dict[str, Any]]:
    import numpy as np
    import openvino as ov

    from emorph_deploy.calibration.pairs import CalibrationSet
    from emorph_deploy.check import synthetic_pairs

    onnx = _export(args.grid, tmp, args.quick)
    core = ov.Core()
    calib_feeds = list(CalibrationSet.synthetic(args.calib_pairs, args.grid, progress=False).feeds)
    feeds = [
        {k: getattr(p, k)[None, None].astype(np.float32) for k in ("moving", "fixed")}
        for p in synthetic_pairs(args.pairs, args.grid, seed=1000)
    ]
    rows: list[dict[str, Any]] = []
    ref: list[Any] = []
    for rid, mode in [("ov-fp32", None)] + [(f"ov-int8-nncf-{m}", m) for m in MODES]:
        C.log(f"  {rid}")
        model = core.read_model(str(onnx))  # fresh per row: NNCF transforms the model it is given
        if mode is not None:
            model = _quantised(model, mode, calib_feeds)
        timing, flows = _measure(core, model, feeds, args)
        ref = ref or flows
        diffs = [C.flow_diff(f, r)[1] for f, r in zip(flows, ref, strict=True)]
        rows.append(
            {
                "id": rid,
                "overflow_fix": mode,
                **timing.to_dict(),
                "max_flow_voxel": max(d["max_dflow_voxel"] for d in diffs),
                "mean_flow_voxel": sum(d["mean_dflow_voxel"] for d in diffs) / len(diffs),
            }
        )
    base = rows[0]["median_s"]
    for r in rows:
        r["vs_fp32"] = base / r["median_s"]
    return rows


def _markdown(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = [
        f"Grid {s['grid']}; this CPU has an int8 dot product (VNNI/AMX): **{s['int8_dot']}** "
        f"(the runner {'allows' if s['int8_dot'] else 'refuses'} OpenVINO int8 here). OpenVINO "
        f"{res['machine'].get('openvino')}, NNCF {res['machine'].get('nncf')}; compiled directly, "
        "inference precision f32 (int8 layers run int8).",
        "",
        C.md_table(
            [
                "row",
                "NNCF overflow_fix",
                "median s",
                "min s",
                "speed vs fp32",
                "max |Δflow| vox",
                "mean |Δflow| vox",
            ],
            [
                [
                    r["id"],
                    r["overflow_fix"] or "-",
                    C.fmt(r["median_s"], ".3f"),
                    C.fmt(r["min_s"], ".3f"),
                    C.fmt(r["vs_fp32"], ".2f"),
                    C.fmt(r["max_flow_voxel"]),
                    C.fmt(r["mean_flow_voxel"]),
                ]
                for r in res["rows"]
            ],
        ),
    ]
    return C.markdown_document(
        res, "OpenVINO int8 without VNNI: what the runner's refusal forgoes", "\n".join(lines)
    )


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    C.check_outputs_writable(args.out, args.force)
    from emorph_deploy.errors import require
    from emorph_deploy.runtime import cpu_has_int8_dot

    ov = require("openvino", "cpu")
    require("nncf", "cpu")
    res = C.new_result(NAME, args, argv)
    res["machine"]["openvino"] = ov.__version__
    res["machine"]["nncf"] = C._version("nncf")
    res["notes"] += list(args.note)
    with tempfile.TemporaryDirectory(prefix="emorph-ovint8-") as tmp:
        res["rows"] = _run(args, Path(tmp))
    res["summary"] = {"grid": C.fmt_size(args.grid), "int8_dot": cpu_has_int8_dot()}
    C.publish(res, _markdown, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
