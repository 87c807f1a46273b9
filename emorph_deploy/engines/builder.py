"""``emorph build``: ONNX -> serialized TensorRT engine + manifest, one code path for TensorRT and
TensorRT-RTX.

Precision comes from the graph (strongly typed networks: TensorRT >= 11 and TensorRT-RTX have no precision
flags):

* ``fp32``: the exported graph as is;
* ``fp16``: a mixed-precision graph (:mod:`emorph_deploy.engines.fp16`) written beside the engine as
  ``<name>-fp16.onnx`` + ONNX manifest, so ONNX Runtime and ``emorph check`` can run the exact graph that was
  built; on TensorRT 10.x (Jetson 10.3) ``fp16_mode="flag"`` instead builds the FP32 graph with
  ``BuilderFlag.FP16`` and per-layer FP32 constraints on the same nodes;
* ``int8``: an explicit-quantization (QDQ) graph from ``emorph calibrate`` (:mod:`emorph_deploy.calibration`).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emorph_deploy.engines.manifest import AOT_GPU, ENGINE_FORMAT, engine_stem, rebuild_command
from emorph_deploy.engines.trt import GpuInfo, TensorRT, detect_gpu, load_tensorrt
from emorph_deploy.errors import InputError, ProcessingError
from emorph_deploy.export.manifest import MANIFEST_FORMAT, manifest_path_for
from emorph_deploy.fileio import (
    check_writable,
    read_manifest_json,
    write_bytes_atomic,
    write_json_atomic,
)

PRECISIONS = ("fp32", "fp16", "int8")
FP16_MODES = ("graph", "flag")
#: TensorRT-RTX ahead-of-time targets (its documented defaults: Ampere, Ampere GA10x, Ada, Blackwell)
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0")


@dataclass(frozen=True)
class BuildOptions:
    """All ``emorph build`` defaults live here."""

    precision: str = "fp32"
    flavour: str = "auto"
    out_dir: str = "engines"
    workspace_mb: int | None = None  # None = TensorRT's default (the GPU's memory)
    fp16_mode: str = (
        "graph"  # "graph" (mixed-precision ONNX, strongly typed) | "flag" (BuilderFlag.FP16, TRT 10.x)
    )
    optimization_level: int | None = None  # builder optimization level 0..5 (None = TensorRT default, 3)
    rtx_targets: tuple[str, ...] = RTX_DEFAULT_TARGETS
    timing_cache: bool = True
    force: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(
                f"--precision: expected one of {PRECISIONS}, got {self.precision!r}; fix: pick one"
            )
        if self.fp16_mode not in FP16_MODES:
            raise InputError(
                f"--fp16-mode: expected one of {FP16_MODES}, got {self.fp16_mode!r}; fix: pick one"
            )
        if self.workspace_mb is not None and self.workspace_mb <= 0:
            raise InputError(
                f"--workspace-mb: expected a positive size in MiB, got {self.workspace_mb}; "
                "fix: e.g. --workspace-mb 2048"
            )
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise InputError(f"--opt-level: expected 0..5, got {self.optimization_level}; fix: e.g. 3")


@dataclass
class BuildResult:
    engine: Path
    manifest_path: Path
    manifest: dict[str, Any]
    graph: Path  # the ONNX graph actually built
    extra_files: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- logging
def make_logger(trt: Any, verbose: bool = False) -> Any:
    """A TensorRT ILogger that keeps every message (errors are reported in the one-line failure)."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[Any, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            self.messages.append((severity, msg))
            if verbose or severity in (trt.ILogger.INTERNAL_ERROR,):
                print(f"[{str(severity).rsplit('.', 1)[-1]}] {msg}")

        def errors(self) -> list[str]:
            bad = (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR)
            return [m for s, m in self.messages if s in bad]

    return _Logger()


# ---------------------------------------------------------------------------------------------- inputs
def read_onnx_manifest(onnx_path: Path) -> dict[str, Any] | None:
    """The ONNX manifest beside the graph (``x.onnx`` -> ``x.json``), or None when there is none."""
    path = manifest_path_for(onnx_path)
    if not path.is_file():
        return None
    return read_manifest_json(path, kind="ONNX manifest", fmt=MANIFEST_FORMAT, required=(),
                              fix="re-run 'emorph export'")


def load_onnx(path: Path) -> Any:
    """The ONNX model at ``path`` (external data beside it loaded); InputError if missing or unreadable."""
    return load_onnx_hashed(path)[0]


def load_onnx_hashed(path: Path) -> tuple[Any, str]:
    """(ModelProto, SHA-256 of the ``.onnx`` file) from one read of the file; external data beside it is
    loaded as ``onnx.load`` does (and is not part of the hash, as with ``sha256_file``)."""
    import hashlib

    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    if not path.is_file():
        raise InputError(f"ONNX {path} not found: expected a graph from 'emorph export'; fix: check the path")
    try:
        data = path.read_bytes()
        model = onnx.load_model_from_string(data)
        load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise InputError(
            f"ONNX {path} cannot be read: expected an ONNX model, got {type(exc).__name__}; "
            "fix: re-run 'emorph export'"
        ) from exc
    return model, hashlib.sha256(data).hexdigest()


def graph_precision(model: Any) -> str:
    """'int8' if the graph has Q/DQ nodes, 'fp16' if it has FP16 initializers or casts, else 'fp32'."""
    import onnx

    ops = {n.op_type for n in model.graph.node}
    if {"QuantizeLinear", "DequantizeLinear"} & ops:
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    for n in model.graph.node:
        if n.op_type == "Cast" and any(
            a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute
        ):
            return "fp16"
    return "fp32"


def io_spec(model: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import onnx

    def entry(vi: Any) -> dict[str, Any]:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or -1) for d in t.shape.dim]
        return {
            "name": vi.name,
            "shape": dims,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
        }

    init = {t.name for t in model.graph.initializer}
    return (
        [entry(v) for v in model.graph.input if v.name not in init],
        [entry(v) for v in model.graph.output],
    )


# ---------------------------------------------------------------------------------------------- parse
def parse_onnx(trt: TensorRT, network: Any, logger: Any, path: Path, label: str) -> None:
    """Parse into ``network``; on failure one line listing every rejected node (index, name, op, reason)."""
    parser = trt.module.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path))
    if ok and parser.num_errors == 0:
        return
    problems: list[str] = []
    ops: list[str] = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        op = _call(err, "node_operator") or "?"
        name = _call(err, "node_name") or ""
        node = _call(err, "node")
        code = str(_call(err, "code") or "").rsplit(".", 1)[-1]
        desc = " ".join(str(_call(err, "desc") or "").split())[:160]
        problems.append(f"node {node} '{name}' ({op}): {code} {desc}".strip())
        if op != "?":
            ops.append(op)
    if not problems:
        problems = [m.splitlines()[0] for m in logger.errors()[:3]] or ["unknown parser error"]
    unsupported = sorted(set(ops))
    fix = (
        f"re-export without {', '.join(unsupported)} (see the TensorRT ONNX operator list) or use another "
        f"--flavour"
        if unsupported
        else "re-export the model with 'emorph export'"
    )
    raise InputError(
        f"ONNX {label}: expected a graph {trt.flavour} {trt.version} can parse, got "
        f"{len(problems)} rejected node(s): {'; '.join(problems)}; fix: {fix}"
    )


def _call(obj: Any, name: str) -> Any:
    fn = getattr(obj, name, None)
    try:
        return fn() if callable(fn) else fn
    except Exception:  # pragma: no cover - parser error accessors differ slightly between versions
        return None


# ---------------------------------------------------------------------------------------------- build
def _set_rtx_targets(trt: TensorRT, config: Any, targets: tuple[str, ...]) -> list[str]:
    cc_enum = getattr(trt.module, "ComputeCapability", None)
    if cc_enum is None or not hasattr(config, "num_compute_capabilities"):
        return []
    members = []
    for t in targets:
        member = getattr(cc_enum, "SM" + t.replace(".", ""), None)
        if member is None:
            raise InputError(
                f"--rtx-targets: expected compute capabilities {sorted(cc_enum.__members__)}, got "
                f"{t}; fix: pick supported targets"
            )
        members.append(member)
    config.num_compute_capabilities = len(members)
    for i, m in enumerate(members):
        config.set_compute_capability(m, i)
    return list(targets)


def _apply_fp16_flag(
    trt: TensorRT, network: Any, config: Any, fp32_nodes: set[str], fp32_tensors: set[str]
) -> int:
    """TensorRT 10.x weakly typed FP16: BuilderFlag.FP16 plus FP32 constraints on the kept nodes' layers."""
    mod = trt.module
    config.set_flag(mod.BuilderFlag.FP16)
    if hasattr(mod.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS"):
        config.set_flag(mod.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    pinned = 0
    float_types = {mod.float32, mod.float16}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outs = [layer.get_output(k) for k in range(layer.num_outputs)]
        hit = (
            layer.name in fp32_nodes
            or any(o.name in fp32_tensors for o in outs)
            or any(layer.name.startswith(n + "_") or layer.name.startswith(n + " ") for n in fp32_nodes)
        )
        if not hit or not any(o.dtype in float_types for o in outs):
            continue
        if hasattr(layer, "precision"):
            layer.precision = mod.float32
        for k, o in enumerate(outs):
            if o.dtype in float_types and hasattr(layer, "set_output_type"):
                layer.set_output_type(k, mod.float32)
        pinned += 1
    return pinned


def _gpu_tag(trt: TensorRT) -> tuple[str, dict[str, Any], GpuInfo | None]:
    gpu = detect_gpu()
    if trt.is_rtx:
        info: dict[str, Any] = {
            "name": AOT_GPU,
            "compute_capability": None,
            "build_machine_gpu": (asdict(gpu) if gpu else None),
        }
        return "aot", info, gpu
    if gpu is None:
        raise InputError(
            f"{trt.flavour} {trt.version}: expected a CUDA GPU to build on, got none; fix: build on the "
            "target device, or build ahead of time with --flavour tensorrt-rtx"
        )
    return gpu.slug, {"name": gpu.name, "compute_capability": gpu.compute_capability}, gpu


def build_engine(
    onnx_path: str | os.PathLike,
    options: BuildOptions = BuildOptions(),
    *,
    trt: TensorRT | None = None,
    verbose: bool = False,
    progress: Any = None,
) -> BuildResult:
    """Build ``<out>/<name>-<precision>-<gpu|aot>-<flavour><version>.plan`` + manifest from an ONNX graph.

    Nothing is written unless the build succeeds; existing outputs are kept unless ``options.force``.
    """
    say = progress or (lambda _msg: None)
    onnx_path = Path(onnx_path)
    model, source_sha = load_onnx_hashed(onnx_path)  # the one read of the source graph (TensorRT parses it)
    onnx_meta = read_onnx_manifest(onnx_path)
    trt = trt or load_tensorrt(options.flavour)
    name = str((onnx_meta or {}).get("name") or onnx_path.stem)
    out_dir = Path(options.out_dir)
    have = graph_precision(model)
    want = options.precision
    # --- the graph this precision builds from
    if want == "int8" and have != "int8":
        raise InputError(
            f"--precision int8: expected a QDQ (explicitly quantized) graph, got a {have} graph "
            f"{onnx_path}; fix: run 'emorph calibrate {onnx_path}' and build its QDQ ONNX, or pass "
            "--calibration QDQ.onnx or --calibrate-synthetic N"
        )
    if want != "int8" and have == "int8":
        raise InputError(
            f"--precision {want}: expected an unquantized graph, got a QDQ graph {onnx_path}; fix: "
            "pass --precision int8 or the FP32 export"
        )
    if want == "fp32" and have == "fp16":
        raise InputError(
            f"--precision fp32: expected an FP32 graph, got an FP16 graph {onnx_path}; fix: pass the "
            "FP32 export"
        )
    use_flag = want == "fp16" and options.fp16_mode == "flag"
    if use_flag and trt.strongly_typed_only:
        raise InputError(
            f"--fp16-mode flag: expected TensorRT with BuilderFlag.FP16 (10.x), got {trt.flavour} "
            f"{trt.version} (strongly typed only); fix: use --fp16-mode graph"
        )
    convert_fp16 = want == "fp16" and have == "fp32" and not use_flag

    # --- refuse what this TensorRT cannot build, before any work
    from emorph_deploy.engines.graph import grid_sample_5d_nodes

    gs5 = grid_sample_5d_nodes(model)
    if gs5 and not trt.supports_grid_sample_5d:
        raise InputError(
            f"ONNX {onnx_path}: expected no rank-5 GridSample for {trt.flavour} {trt.version} (3D "
            f"GridSample needs TensorRT >= 11.2), got {len(gs5)} node(s) e.g. {gs5[0]}; fix: re-export "
            "with 'emorph export --grid-sample gather'"
        )

    gpu_tag, gpu_info, _gpu = _gpu_tag(trt)
    mode_tag = "-flag" if use_flag else ""
    stem = engine_stem(name, want + mode_tag, gpu_tag, trt.tag)
    engine_path = out_dir / f"{stem}.plan"
    manifest_path = out_dir / f"{stem}.json"
    fp16_onnx = out_dir / f"{name}-fp16.onnx"
    fp16_json = manifest_path_for(fp16_onnx)
    for p in [engine_path, manifest_path] + ([fp16_onnx, fp16_json] if convert_fp16 else []):
        check_writable(p, force=options.force)

    extra: list[Path] = []
    fp16_summary: dict[str, Any] | None = None
    graph_path = onnx_path
    t0 = time.perf_counter()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="emorph-build-") as tmp:
        if convert_fp16:
            from emorph_deploy.engines.fp16 import convert_fp16 as _convert

            say("converting to mixed FP16/FP32 (AutoCast; LayerNorm, Softmax, flow head, warp kept FP32)")
            fp16_model, fp16_summary = _convert(model)
            graph_path = Path(tmp) / fp16_onnx.name
            fp16_bytes = fp16_model.SerializeToString()  # TensorRT parses the file; hash and copy from memory
            graph_path.write_bytes(fp16_bytes)
        convert_s = time.perf_counter() - t0

        mod = trt.module
        logger = make_logger(mod, verbose)
        builder = mod.Builder(logger)
        strongly_typed = not use_flag and hasattr(mod.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
        flags = 0
        if strongly_typed:
            flags |= 1 << int(mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        if hasattr(mod.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and trt.version_tuple[:1] < (10,):
            flags |= 1 << int(mod.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)  # pragma: no cover - TRT 8.x
        network = builder.create_network(flags)
        say(f"parsing {graph_path.name} with {trt.flavour} {trt.version}")
        parse_onnx(trt, network, logger, graph_path, str(onnx_path))
        config = builder.create_builder_config()
        if options.workspace_mb:
            config.set_memory_pool_limit(mod.MemoryPoolType.WORKSPACE, int(options.workspace_mb) << 20)
        if options.optimization_level is not None and hasattr(config, "builder_optimization_level"):
            config.builder_optimization_level = int(options.optimization_level)
        targets: list[str] = []
        if trt.is_rtx:
            targets = _set_rtx_targets(trt, config, tuple(options.rtx_targets))
            gpu_info["target_compute_capabilities"] = targets
        pinned = None
        if use_flag:
            from emorph_deploy.engines.fp16 import fp32_node_names
            from emorph_deploy.engines.graph import named_copy

            named = named_copy(model)
            keep = fp32_node_names(
                named,
            )
            tensors = {o for n in named.graph.node if n.name in keep for o in n.output}
            pinned = _apply_fp16_flag(trt, network, config, keep, tensors)
        # timing cache (TensorRT-RTX: timing-cache calls are no-ops; it has a runtime cache instead)
        cache_path: Path | None = None
        cache = None
        if options.timing_cache and not trt.is_rtx and hasattr(config, "create_timing_cache"):
            cache_path = out_dir / f"timing-{trt.tag}-{gpu_tag}.cache"
            blob = cache_path.read_bytes() if cache_path.is_file() else b""
            cache = config.create_timing_cache(blob)
            config.set_timing_cache(cache, False)
        say(f"building {want} engine ({'strongly typed' if strongly_typed else 'BuilderFlag.FP16'})")
        t_build = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        build_s = time.perf_counter() - t_build
        if serialized is None:
            errs = [m.splitlines()[0] for m in logger.errors()][-3:] or ["no error message"]
            raise ProcessingError(
                f"{trt.flavour} {trt.version} failed to build {onnx_path} at {want}: "
                f"{' | '.join(errs)}; fix: build --precision fp32 to isolate, or re-export"
            )
        data = bytes(serialized)
        # --- write: graph first (manifest references it), engine, manifest last
        built_graph, built_sha = onnx_path, source_sha
        if convert_fp16:
            built_sha = hashlib.sha256(fp16_bytes).hexdigest()
            fp16_meta = derived_onnx_manifest(
                onnx_meta, model, name=name, precision="fp16", graph_sha=built_sha, source=onnx_path,
                source_sha=source_sha, fp16_conversion=fp16_summary or {},
            )
            write_bytes_atomic(fp16_onnx, fp16_bytes, force=options.force)
            write_json_atomic(fp16_json, fp16_meta, force=options.force)
            extra += [fp16_onnx, fp16_json]
            built_graph = fp16_onnx
        write_bytes_atomic(engine_path, data, force=options.force)
        if cache is not None and cache_path is not None:
            write_bytes_atomic(cache_path, bytes(cache.serialize()), force=True)
            extra.append(cache_path)
    total_s = time.perf_counter() - t0
    inputs, outputs = io_spec(model)
    from emorph_deploy import __version__

    manifest: dict[str, Any] = {
        "format": ENGINE_FORMAT,
        "name": name,
        "engine": engine_path.name,
        "precision": want,
        "tensorrt": trt.describe(),
        "gpu": gpu_info,
        "onnx": {
            "source": str(onnx_path.resolve()),
            "source_sha256": source_sha,
            "path": str(Path(built_graph).resolve()),
            "sha256": built_sha,
            "graph_precision": "fp16" if convert_fp16 else have,
            "manifest": (onnx_meta or {}).get("format") and str(manifest_path_for(onnx_path).resolve()),
        },
        "model": (onnx_meta or {}).get("model"),
        "preprocessing": (onnx_meta or {}).get("preprocessing"),
        "grid_shape": (onnx_meta or {}).get("grid_shape") or (inputs[0]["shape"][2:] if inputs else None),
        "grid_sample": (onnx_meta or {}).get("grid_sample"),
        "inputs": inputs,
        "outputs": outputs,
        "builder_options": {
            "strongly_typed": strongly_typed,
            "fp16_mode": options.fp16_mode if want == "fp16" else None,
            "fp32_layers_pinned": pinned,
            "workspace_mb": options.workspace_mb,
            "optimization_level": options.optimization_level,
            "timing_cache": str(cache_path) if cache_path else None,
            "rtx_targets": targets or None,
        },
        "fp16_conversion": fp16_summary,
        "calibration": (onnx_meta or {}).get("calibration"),
        "build_seconds": round(build_s, 3),
        "total_seconds": round(total_s, 3),
        "conversion_seconds": round(convert_s, 3) if convert_fp16 else None,
        "engine_bytes": len(data),
        "engine_sha256": hashlib.sha256(data).hexdigest(),
        "out_dir": str(out_dir),
        "package_version": __version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest["rebuild_command"] = rebuild_command(manifest)
    write_json_atomic(manifest_path, manifest, force=options.force)
    return BuildResult(engine_path, manifest_path, manifest, Path(built_graph), extra)


def derived_onnx_manifest(
    meta: dict[str, Any] | None,
    model: Any,
    *,
    name: str,
    precision: str,
    graph_sha: str,
    source: Path,
    source_sha: str,
    **extra: Any,
) -> dict[str, Any]:
    """The ONNX manifest of a graph derived from ``source`` (FP16 conversion, INT8 Q/DQ): the source's
    manifest (or a minimal one when it has none) with precision, hash and provenance updated, plus ``extra``
    sections; name, inputs/outputs and grid filled in from ``model`` when the source manifest lacks them."""
    out = dict(meta or {"format": MANIFEST_FORMAT, "model": None, "preprocessing": None})
    out.setdefault("name", name)
    out.update(
        {
            "precision": precision,
            "sha256_onnx": graph_sha,
            "derived_from": {"onnx": str(source.resolve()), "sha256": source_sha},
            **extra,
        }
    )
    if "inputs" not in out or "outputs" not in out:
        out["inputs"], out["outputs"] = io_spec(model)
    out.setdefault("grid_shape", out["inputs"][0]["shape"][2:] if out["inputs"] else None)
    return out
