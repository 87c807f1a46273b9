"""``emorph build --target openvino``: an OpenVINO IR (``.xml`` + ``.bin``) and its manifest (format
``emorph-openvino/1``) under ``engines/``.

The IR is the source graph as OpenVINO reads it (fp32 and bf16 share the float graph; the precision is
recorded and applied at compile time), or for int8 the QDQ graph from ``emorph calibrate``, or the float
graph quantised by NNCF post-training quantisation on synthetic pairs. The manifest records the OpenVINO
version, the CPU model and SIMD flags it was built on, the CPU flags the precision needs, the source graph's
path and sha256 and the IR's sha256. :func:`check_ir` refuses an IR built by another OpenVINO version, one
modified after the build, or one whose source graph has changed since (stale), each with the ``emorph build``
command that rebuilds it.
"""

from __future__ import annotations

import shlex
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emorph_deploy.errors import ConfigMismatchError, InputError, ProcessingError, require

OPENVINO_FORMAT = "emorph-openvino/1"
REQUIRED = (
    "format",
    "name",
    "precision",
    "openvino",
    "cpu",
    "source",
    "ir",
    "grid_shape",
    "inputs",
    "outputs",
)
PRECISIONS = ("fp32", "bf16", "int8")
#: keys copied from the source graph's ONNX manifest (the runner and ``emorph check`` read them)
_FROM_ONNX_MANIFEST = (
    "model",
    "preprocessing",
    "spacing_mm",
    "orientation",
    "source_checkpoint",
    "grid_shape",
)


#: Paths an IR manifest records, stored relative to its folder (read back absolute; older manifests store
#: absolute paths).
IR_PATH_KEYS = (("source", "onnx"), ("source_checkpoint",), ("out_dir",))


@dataclass(frozen=True)
class OpenVinoBuild:
    """What ``emorph build --target openvino`` wrote."""

    xml: Path
    bin: Path
    manifest_path: Path
    manifest: dict[str, Any]


def ir_paths(name: str, precision: str, version: str, out_dir: str | Path) -> tuple[Path, Path, Path]:
    """(``.xml``, ``.bin``, ``.json``) of ``<out>/<name>-<precision>-openvino<version>``."""
    stem = Path(out_dir) / f"{name}-{precision}-openvino{version.split('-')[0]}"
    return stem.with_suffix(".xml"), stem.with_suffix(".bin"), stem.with_suffix(".json")


def rebuild_command(meta: dict[str, Any]) -> str:
    """The ``emorph build`` command that rebuilds this IR on the machine that runs it."""
    src = meta.get("source", {}).get("onnx") or "<model>.onnx"
    args = ["emorph", "build", str(src), "--target", "openvino", "--precision", str(meta.get("precision"))]
    if meta.get("quantizer") == "nncf":
        args += ["--nncf", "--calibrate-synthetic", str(meta.get("calibration_pairs", 8))]
    if meta.get("out_dir"):
        args += ["--out", str(meta["out_dir"])]
    return shlex.join([*args, "--force"])


def read_ir_manifest(path: str | Path) -> dict[str, Any]:
    from emorph_deploy.fileio import read_manifest_json

    return read_manifest_json(
        path,
        kind="OpenVINO manifest",
        fmt=OPENVINO_FORMAT,
        required=REQUIRED,
        fix="rebuild with 'emorph build ONNX --target openvino'",
        path_keys=IR_PATH_KEYS,
    )


def check_ir(xml: Path, manifest: str | Path | None, version: str, *, verify: bool = True) -> dict[str, Any]:
    """The manifest of IR ``xml`` after checking it against the running OpenVINO ``version`` and (``verify``)
    the IR's and the source graph's sha256; ConfigMismatchError with the rebuild command otherwise."""
    from emorph_deploy.fileio import sha256_file

    if not xml.is_file() or not xml.with_suffix(".bin").is_file():
        raise InputError(
            f"OpenVINO IR {xml} (.xml + .bin) not found: expected the output of 'emorph build --target "
            "openvino'; fix: check the path"
        )
    meta = read_ir_manifest(manifest or xml.with_suffix(".json"))
    built = meta["openvino"].get("version")
    if built != version:
        raise ConfigMismatchError(
            f"OpenVINO IR {xml.name}: expected one built by the running OpenVINO {version}, got one built by "
            f"{built}; fix: rebuild it here with '{rebuild_command(meta)}'"
        )
    if not verify:
        return meta
    ir = meta["ir"]
    if sha256_file(xml) != ir.get("sha256_xml") or sha256_file(xml.with_suffix(".bin")) != ir.get(
        "sha256_bin"
    ):
        raise ConfigMismatchError(
            f"OpenVINO IR {xml.name}: expected the files its manifest hashes, got modified ones; fix: "
            f"rebuild with '{rebuild_command(meta)}'"
        )
    src = Path(meta["source"].get("onnx") or "")
    if src.is_file() and sha256_file(src) != meta["source"].get("sha256"):
        raise ConfigMismatchError(
            f"OpenVINO IR {xml.name} is stale: expected its source {src} as built (sha256 "
            f"{str(meta['source'].get('sha256'))[:12]}…), got a changed file; fix: rebuild with "
            f"'{rebuild_command(meta)}'"
        )
    return meta


def nncf_quantize(model: Any, grid: tuple[int, int, int], pairs: int, say: Callable[[str], None]) -> Any:
    """``model`` (an ``openvino.Model``) quantised by NNCF post-training quantisation on ``pairs`` synthetic
    template pairs at ``grid`` (D, H, W)."""
    nncf = require("nncf", "cpu")
    from emorph_deploy.calibration.pairs import CalibrationSet

    say(f"NNCF post-training quantisation on {pairs} synthetic pairs at {grid}")
    calib = CalibrationSet.synthetic(int(pairs), grid, progress=False)
    return nncf.quantize(model, nncf.Dataset(calib.feeds), subset_size=len(calib))


def check_bf16_warp(meta: dict[str, Any], artifact: Path) -> None:
    """ConfigMismatchError when an export (its manifest ``meta``) would run in bf16 a network that warps
    inside itself (:func:`~emorph_deploy.models.config.warps_inside`) without the gather sampler's integer
    indices (:data:`~emorph_deploy.models.warp.GATHER_INDICES`): the CPU plugin computes elementwise ops in
    bf16 under a bf16 hint, so float sampling coordinates or indices sample the wrong voxels (or past the
    image). Exports from before integer indices have no ``gather_indices``."""
    from emorph_deploy.models.config import warps_inside
    from emorph_deploy.models.warp import GATHER_INDICES

    safe = meta.get("grid_sample") == "gather" and meta.get("gather_indices") == GATHER_INDICES
    if warps_inside(meta.get("model")) and not safe:
        raise ConfigMismatchError(
            f"bf16: expected an export whose inner warp forms its indices in integers (the gather sampler "
            f"of this emorph, manifest gather_indices {GATHER_INDICES!r}), got {artifact.name} (grid_sample "
            f"{meta.get('grid_sample')!r}, gather_indices {meta.get('gather_indices')!r}), whose "
            "full-resolution stage warps inside; fix: re-export it with 'emorph export --grid-sample "
            "gather', or run it at fp32"
        )


def build_ir(
    onnx: Path,
    precision: str,
    *,
    out_dir: str | Path = "engines",
    nncf_pairs: int | None = None,
    force: bool = False,
    say: Callable[[str], None] | None = None,
) -> OpenVinoBuild:
    """Write the IR + manifest of ``onnx`` at ``precision`` (fp32 | bf16 | int8).

    int8 needs a QDQ graph (``onnx`` from ``emorph calibrate``) or ``nncf_pairs`` (NNCF on that many
    synthetic pairs, from the fp32 export). The IR is compiled once before it is written (fp32 hint, so the
    build also runs on a machine without the target's CPU features).
    """
    ov = require("openvino", "cpu")
    from emorph_deploy.export.onnx_io import graph_precision, io_spec, load_onnx_hashed, read_onnx_manifest
    from emorph_deploy.fileio import atomic_path, check_writable, sha256_file, write_manifest_atomic
    from emorph_deploy.runtime import PRECISION_CPU_FEATURES, cpu_flags, cpu_model

    say = say or (lambda _m: None)
    if precision not in PRECISIONS:
        raise InputError(
            f"--precision with --target openvino: expected one of {', '.join(PRECISIONS)}, got {precision}; "
            "fix: pick one"
        )
    proto, source_sha = load_onnx_hashed(onnx)
    src_precision = graph_precision(proto)
    if nncf_pairs is not None and (precision != "int8" or src_precision != "fp32"):
        raise InputError(
            f"--nncf: expected --precision int8 and the fp32 export, got {precision} and a {src_precision} "
            "graph; fix: emorph build export/<name>.onnx --target openvino --precision int8 --nncf"
        )
    want_src = "int8" if precision == "int8" and nncf_pairs is None else "fp32"
    if src_precision != want_src:
        fix = (
            "pass the QDQ graph of 'emorph calibrate', --calibration, or --nncf"
            if want_src == "int8"
            else "pass the fp32 export of 'emorph export'"
        )
        raise InputError(
            f"--target openvino --precision {precision}: expected a {want_src} graph, got a {src_precision} "
            f"graph {onnx}; fix: {fix}"
        )
    onnx_meta = read_onnx_manifest(onnx, proto) or {}
    if precision == "bf16":
        check_bf16_warp(onnx_meta, onnx)
    inputs, outputs = io_spec(proto)
    del proto
    name = str(onnx_meta.get("name") or onnx.stem)
    version = ov.__version__
    xml, bin_, man = ir_paths(name, precision, version, out_dir)
    for p in (xml, bin_, man):
        check_writable(p, force=force)
    t0 = time.perf_counter()
    core = ov.Core()
    model = core.read_model(str(onnx))
    grid = tuple(int(s) for s in inputs[0]["shape"][2:])
    if nncf_pairs is not None:
        model = nncf_quantize(model, grid, nncf_pairs, say)  # type: ignore[arg-type]
    say(f"compiling once on {cpu_model()} to check the IR")
    try:
        core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    except Exception as exc:
        raise ProcessingError(f"openvino cannot compile {onnx}: {str(exc).splitlines()[0]}") from exc
    xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="emorph-ov-", dir=xml.parent) as tmp:
        tmp_xml = Path(tmp) / xml.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        with atomic_path(bin_, force=force) as b, atomic_path(xml, force=force) as x:
            tmp_xml.with_suffix(".bin").replace(b)
            tmp_xml.replace(x)
    manifest = {
        **{k: onnx_meta[k] for k in _FROM_ONNX_MANIFEST if k in onnx_meta},
        "format": OPENVINO_FORMAT,
        "name": name,
        "precision": precision,
        "quantizer": "nncf" if nncf_pairs is not None else ("qdq" if precision == "int8" else None),
        "calibration_pairs": nncf_pairs,
        "openvino": {"version": version},
        "cpu": {
            "model": cpu_model(),
            "flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c"))),
            "requires_any": sorted(PRECISION_CPU_FEATURES.get(precision, ())),
        },
        "source": {"onnx": str(onnx.resolve()), "sha256": source_sha},
        "ir": {"xml": xml.name, "sha256_xml": sha256_file(xml), "sha256_bin": sha256_file(bin_)},
        "grid_shape": onnx_meta.get("grid_shape") or list(grid),
        "inputs": inputs,
        "outputs": outputs,
        "out_dir": str(Path(out_dir).resolve()),
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    write_manifest_atomic(man, manifest, IR_PATH_KEYS, force=force)
    return OpenVinoBuild(xml, bin_, man, manifest)
