"""``emorph calibrate``: ONNX (FP32) + calibration pairs -> QDQ (INT8) ONNX and its records under
``calibration/``.

Writes ``<name>-int8.onnx`` (QDQ graph), ``<name>-int8.json`` (its ONNX manifest: precision int8 plus a
``calibration`` section), ``<name>-int8-pairs.csv`` (the pairs used), ``<name>-int8-stats.json`` (activation
scales and amax per tensor, per-channel weight info, what was excluded) and ``<name>-int8.cache`` (the
activation scales in TensorRT calibration-cache text form). All outputs are checked before work starts and
written atomically.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emorph_deploy.calibration.pairs import CalibrationSet, make_reader
from emorph_deploy.calibration.quantize import QuantizeOptions, quantize_qdq, trt_calibration_cache
from emorph_deploy.choices import CalibrationKind
from emorph_deploy.errors import ConfigMismatchError, InputError
from emorph_deploy.export.manifest import PATH_KEYS, manifest_path_for
from emorph_deploy.fileio import check_writable, write_bytes_atomic, write_json_atomic, write_manifest_atomic


@dataclass
class CalibrationResult:
    qdq_onnx: Path
    manifest_path: Path
    files: list[Path]
    report: dict[str, Any]


def output_paths(name: str, out_dir: str | os.PathLike) -> dict[str, Path]:
    out = Path(out_dir)
    base = f"{name}-int8"
    return {
        "onnx": out / f"{base}.onnx",
        "manifest": out / f"{base}.json",
        "pairs": out / f"{base}-pairs.csv",
        "stats": out / f"{base}-stats.json",
        "cache": out / f"{base}.cache",
    }


def _graph_grid(model: Any) -> tuple[int, int, int]:
    for vi in model.graph.input:
        if vi.name == "moving":
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            if len(dims) == 5 and all(d > 0 for d in dims[2:]):
                return tuple(dims[2:])  # type: ignore[return-value]
    raise InputError(
        "ONNX: expected an input 'moving' of static shape (1, 1, D, H, W); fix: re-run 'emorph export'"
    )


def calibrate(
    onnx_path: str | os.PathLike,
    *,
    pairs: str | os.PathLike | None = None,
    synthetic: int | None = None,
    options: QuantizeOptions = QuantizeOptions(),
    out_dir: str | os.PathLike = "calibration",
    seed: int = 0,
    synthetic_kind: CalibrationKind | str = CalibrationKind.template,
    limit: int | None = None,
    force: bool = False,
    progress: bool = True,
    say: Any = None,
) -> CalibrationResult:
    """Calibrate ``onnx_path`` on ``pairs`` (CSV) or ``synthetic`` generated pairs and write the QDQ graph."""
    from emorph_deploy.export.onnx_io import graph_precision, load_onnx_hashed, read_onnx_manifest

    say = say or (lambda _m: None)
    onnx_path = Path(onnx_path)
    if (pairs is None) == (synthetic is None):
        raise InputError(
            "calibrate: expected exactly one of --pairs CSV or --synthetic N, got "
            f"{'both' if pairs is not None else 'neither'}; fix: pass one of them"
        )
    model, source_sha = load_onnx_hashed(onnx_path)  # the only read of the source graph
    precision = graph_precision(model)
    if precision != "fp32":
        raise InputError(
            f"calibrate: expected the FP32 export, got a {precision} graph {onnx_path}; "
            "fix: calibrate the ONNX written by 'emorph export'"
        )
    meta = read_onnx_manifest(onnx_path, model)
    grid = _graph_grid(model)
    name = str((meta or {}).get("name") or onnx_path.stem)
    paths = output_paths(name, out_dir)
    for p in paths.values():
        check_writable(p, force=force)
    pre = None
    if meta and meta.get("preprocessing"):
        from emorph_deploy.data.preprocess import Preprocessing

        pre = Preprocessing.from_dict(meta["preprocessing"])
        if tuple(pre.grid_shape) != tuple(grid):
            raise ConfigMismatchError(
                f"ONNX manifest {manifest_path_for(onnx_path)}: expected preprocessing grid "
                f"equal to the graph's {grid}, got {tuple(pre.grid_shape)}; fix: re-run "
                "'emorph export'"
            )
    t0 = time.perf_counter()
    if pairs is not None:
        if pre is None:
            raise InputError(
                f"calibrate --pairs: expected the ONNX manifest {manifest_path_for(onnx_path)} "
                "(its preprocessing defines the model grid), got none; fix: re-run 'emorph export' or "
                "use --synthetic N"
            )
        say(f"loading and preprocessing pairs from {pairs}")
        calib = CalibrationSet.from_csv(pairs, pre, grid, limit=limit, progress=progress)
    else:
        say(f"synthesising {synthetic} {synthetic_kind} pairs on the grid {grid}")
        calib = CalibrationSet.synthetic(
            int(synthetic), grid, seed=seed, kind=synthetic_kind, progress=progress
        )
    prep_s = time.perf_counter() - t0
    say(f"calibrating ({options.method}) and inserting Q/DQ on {','.join(options.op_types)}")
    t1 = time.perf_counter()
    qdq, report = quantize_qdq(model, make_reader(calib, progress=progress), options, label=str(onnx_path))
    calib_s = time.perf_counter() - t1
    scales = report["activation_scales"]
    stats = {
        "format": "emorph-calibration/1",
        "name": name,
        "source_onnx": str(onnx_path.resolve()),
        "source_sha256": source_sha,
        "n_pairs": len(calib),
        "pairs_source": str(Path(pairs).resolve())
        if pairs is not None
        else f"synthetic:{synthetic_kind}:seed={seed}",
        "options": report["options"],
        "quantizer": report["quantizer"],
        "quantized_nodes": report["quantized_nodes"],
        "excluded": report["excluded"],
        "n_quantize": report["n_quantize"],
        "n_dequantize": report["n_dequantize"],
        "activations": {k: {"scale": s, "amax": s * 127.0} for k, s in sorted(scales.items())},
        "weights": report["weights"],
        "seconds": {"preprocess": round(prep_s, 3), "calibrate": round(calib_s, 3)},
    }
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["moving", "fixed"])
    for src in calib.sources:
        w.writerow([src.moving, src.fixed])
    from emorph_deploy import __version__
    from emorph_deploy.export.onnx_io import derived_onnx_manifest, embed_metadata

    if meta:  # the QDQ graph carries the source's model config and preprocessing too
        embed_metadata(qdq, meta)
    qdq_bytes = qdq.SerializeToString()

    manifest = derived_onnx_manifest(
        meta,
        model,
        name=name,
        precision="int8",
        graph_sha=hashlib.sha256(qdq_bytes).hexdigest(),
        source=onnx_path,
        source_sha=stats["source_sha256"],
        calibration={
            "method": options.method,
            "op_types": list(options.op_types),
            "quantizer": report["quantizer"],
            "n_pairs": len(calib),
            "pairs": str(paths["pairs"].resolve()),
            "stats": str(paths["stats"].resolve()),
            "cache": str(paths["cache"].resolve()),
            "excluded": report["excluded"],
            "package_version": __version__,
        },
    )
    write_bytes_atomic(paths["pairs"], buf.getvalue().encode(), force=force)
    write_json_atomic(paths["stats"], stats, force=force)
    write_bytes_atomic(paths["cache"], trt_calibration_cache(scales).encode(), force=force)
    write_bytes_atomic(paths["onnx"], qdq_bytes, force=force)
    write_manifest_atomic(paths["manifest"], manifest, PATH_KEYS, force=force)
    return CalibrationResult(paths["onnx"], paths["manifest"], list(paths.values()), stats)
