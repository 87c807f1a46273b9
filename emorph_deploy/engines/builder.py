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

:func:`build_engine` runs the stages in order: :func:`select_graph` (which graph, at which precision; every
refusal before any work), :func:`output_paths`, :func:`graph_to_build` (the FP16 conversion),
:func:`configure_builder` (network flags, parse, workspace, optimization level, TensorRT-RTX targets, FP16
flag, timing cache), :func:`serialize_engine`, :func:`write_outputs` and :func:`engine_manifest`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emorph_deploy.engines.manifest import AOT_GPU, ENGINE_FORMAT, engine_stem, rebuild_command
from emorph_deploy.engines.manifest import PATH_KEYS as ENGINE_PATH_KEYS
from emorph_deploy.engines.trt import TensorRT, detect_gpu, load_tensorrt, make_logger
from emorph_deploy.errors import InputError, ProcessingError, interrupts_deferred
from emorph_deploy.export.manifest import PATH_KEYS as ONNX_PATH_KEYS
from emorph_deploy.export.manifest import manifest_path_for
from emorph_deploy.export.onnx_io import (
    derived_onnx_manifest,
    embed_metadata,
    graph_precision,
    io_spec,
    load_onnx_hashed,
    read_onnx_manifest,
)
from emorph_deploy.fileio import check_writable, write_bytes_atomic, write_manifest_atomic

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


def build_engine(
    onnx_path: str | os.PathLike,
    options: BuildOptions = BuildOptions(),
    *,
    trt: TensorRT | None = None,
    verbose: bool = False,
    progress: Callable[[str], None] | None = None,
) -> BuildResult:
    """Build ``<out>/<name>-<precision>-<gpu|aot>-<flavour><version>.plan`` + manifest from an ONNX graph.

    Nothing is written unless the build succeeds; existing outputs are kept unless ``options.force``.
    """
    say = progress or (lambda _msg: None)
    source = SourceGraph.read(Path(onnx_path))  # the one read of the source graph (TensorRT parses it)
    trt = trt or load_tensorrt(options.flavour)
    plan = select_graph(source, options, trt)
    gpu_tag, gpu_info = _gpu_tag(trt)
    paths = output_paths(source.name, plan, gpu_tag, trt, options)
    t0 = time.perf_counter()
    # signals are only recorded while TensorRT runs (it swallows exceptions raised in its callbacks) and
    # raised at the checks (the last one on leaving); the new files are removed on any failure or interruption
    with _removed_on_failure(paths, options.out_dir), interrupts_deferred() as check:
        with tempfile.TemporaryDirectory(prefix="emorph-build-") as tmp:
            graph = graph_to_build(source, plan, Path(tmp) / paths.fp16_onnx.name, say)
            convert_s = time.perf_counter() - t0
            check()
            setup = configure_builder(trt, source, plan, graph.path, options, gpu_tag, verbose, say)
            check()
            engine, build_s = serialize_engine(trt, setup, plan, source.path, say, check)
            check()
            built = write_outputs(source, graph, paths, engine, setup, options)
        seconds = {"build": build_s, "total": time.perf_counter() - t0, "conversion": convert_s}
        manifest = engine_manifest(source, plan, trt, gpu_info, graph, built, setup, options, seconds)
        write_manifest_atomic(paths.manifest, manifest, ENGINE_PATH_KEYS, force=options.force)
    return BuildResult(paths.engine, paths.manifest, manifest, built.graph, built.extra)


@contextlib.contextmanager
def _removed_on_failure(paths: BuildPaths, out_dir: str | os.PathLike) -> Iterator[None]:
    """On any error or interruption: delete the build's files that did not exist before it (the timing
    cache, a cache, stays) and ``out_dir`` if this build created it and left it empty. A full disk is one
    ProcessingError line."""
    out = Path(out_dir)
    created = [p for p in [out, *out.parents] if not p.exists()]
    new = [p for p in (paths.engine, paths.manifest, paths.fp16_onnx, paths.fp16_manifest) if not p.exists()]
    try:
        yield
    except BaseException as exc:
        for p in new:
            p.unlink(missing_ok=True)
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty
        if isinstance(exc, OSError):
            raise ProcessingError(
                f"build: expected to write the engine into {out}, got {type(exc).__name__}: "
                f"{exc.strerror or exc}; fix: free space or choose another --out"
            ) from exc
        raise


# ---------------------------------------------------------------------------------------------- graph
@dataclass(frozen=True)
class SourceGraph:
    """The ONNX graph given to ``emorph build``, read once: the model, the file's hash, its manifest."""

    path: Path
    model: Any  # onnx.ModelProto
    sha256: str  # of the .onnx file
    meta: dict[str, Any] | None  # the ONNX manifest beside it, if any
    name: str  # the manifest's model name, else the file stem
    precision: str  # of the graph: fp32 | fp16 | int8 (see graph_precision)

    @classmethod
    def read(cls, path: Path) -> SourceGraph:
        model, sha = load_onnx_hashed(path)
        meta = read_onnx_manifest(path, model)
        name = str((meta or {}).get("name") or path.stem)
        return cls(path, model, sha, meta, name, graph_precision(model))


@dataclass(frozen=True)
class GraphPlan:
    """How the engine reaches its precision from the source graph."""

    precision: str  # of the engine: fp32 | fp16 | int8
    fp16_flag: bool  # the FP32 graph with BuilderFlag.FP16 and FP32-pinned layers (TensorRT 10.x)
    convert_fp16: bool  # a mixed FP16/FP32 graph converted here and written beside the engine


def select_graph(source: SourceGraph, options: BuildOptions, trt: TensorRT) -> GraphPlan:
    """Which graph builds at ``options.precision``; refuses (InputError) a graph of the wrong precision, the
    FP16 flag on a strongly-typed-only TensorRT and a rank-5 GridSample this TensorRT cannot build."""
    have, want, path = source.precision, options.precision, source.path
    if want == "int8" and have != "int8":
        raise InputError(
            f"--precision int8: expected a QDQ (explicitly quantized) graph, got a {have} graph "
            f"{path}; fix: run 'emorph calibrate {path}' and build its QDQ ONNX, or pass "
            "--calibration QDQ.onnx or --calibrate-synthetic N"
        )
    if want != "int8" and have == "int8":
        raise InputError(
            f"--precision {want}: expected an unquantized graph, got a QDQ graph {path}; fix: "
            "pass --precision int8 or the FP32 export"
        )
    if want == "fp32" and have == "fp16":
        raise InputError(
            f"--precision fp32: expected an FP32 graph, got an FP16 graph {path}; fix: pass the FP32 export"
        )
    use_flag = want == "fp16" and options.fp16_mode == "flag"
    if use_flag and trt.strongly_typed_only:
        raise InputError(
            f"--fp16-mode flag: expected TensorRT with BuilderFlag.FP16 (10.x), got {trt.flavour} "
            f"{trt.version} (strongly typed only); fix: use --fp16-mode graph"
        )
    _refuse_grid_sample_5d(source, trt)
    return GraphPlan(want, use_flag, convert_fp16=want == "fp16" and have == "fp32" and not use_flag)


def _refuse_grid_sample_5d(source: SourceGraph, trt: TensorRT) -> None:
    from emorph_deploy.engines.graph import grid_sample_5d_nodes

    gs5 = grid_sample_5d_nodes(source.model)
    if gs5 and not trt.supports_grid_sample_5d:
        raise InputError(
            f"ONNX {source.path}: expected no rank-5 GridSample for {trt.flavour} {trt.version} (3D "
            f"GridSample needs TensorRT >= 11.2), got {len(gs5)} node(s) e.g. {gs5[0]}; fix: re-export "
            "with 'emorph export --grid-sample gather'"
        )


@dataclass(frozen=True)
class GraphToBuild:
    """The file TensorRT parses: the source graph, or its FP16 conversion in a temporary folder."""

    path: Path
    fp16_bytes: bytes | None = None  # the converted graph (written beside the engine), None if not converted
    fp16_summary: dict[str, Any] | None = None  # the conversion's record for the manifests


def graph_to_build(
    source: SourceGraph, plan: GraphPlan, fp16_tmp: Path, say: Callable[[str], None]
) -> GraphToBuild:
    """The source graph, or (``plan.convert_fp16``) its mixed FP16/FP32 conversion written to ``fp16_tmp``."""
    if not plan.convert_fp16:
        return GraphToBuild(source.path)
    from emorph_deploy.engines.fp16 import convert_fp16

    say("converting to mixed FP16/FP32 (AutoCast; LayerNorm, Softmax, flow head, warp kept FP32)")
    fp16_model, summary = convert_fp16(source.model)
    if source.meta:  # the derived graph carries the source's model config and preprocessing too
        embed_metadata(fp16_model, source.meta)
    fp16_bytes = fp16_model.SerializeToString()  # TensorRT parses the file; hash and copy from memory
    fp16_tmp.write_bytes(fp16_bytes)
    return GraphToBuild(fp16_tmp, fp16_bytes, summary)


# ---------------------------------------------------------------------------------------------- outputs
@dataclass(frozen=True)
class BuildPaths:
    engine: Path
    manifest: Path
    fp16_onnx: Path  # written only when the plan converts the graph to FP16
    fp16_manifest: Path


def output_paths(
    name: str, plan: GraphPlan, gpu_tag: str, trt: TensorRT, options: BuildOptions
) -> BuildPaths:
    """The files this build writes, each checked writable (no overwrite without ``options.force``)."""
    out_dir = Path(options.out_dir)
    stem = engine_stem(name, plan.precision + ("-flag" if plan.fp16_flag else ""), gpu_tag, trt.tag)
    fp16_onnx = out_dir / f"{name}-fp16.onnx"
    paths = BuildPaths(
        out_dir / f"{stem}.plan", out_dir / f"{stem}.json", fp16_onnx, manifest_path_for(fp16_onnx)
    )
    written = [paths.engine, paths.manifest]
    if plan.convert_fp16:
        written += [paths.fp16_onnx, paths.fp16_manifest]
    for p in written:
        check_writable(p, force=options.force)
    return paths


def _gpu_tag(trt: TensorRT) -> tuple[str, dict[str, Any]]:
    """(file-name tag, manifest ``gpu`` section): ``aot`` for TensorRT-RTX, else the GPU built on."""
    gpu = detect_gpu()
    if trt.is_rtx:
        info: dict[str, Any] = {
            "name": AOT_GPU,
            "compute_capability": None,
            "build_machine_gpu": (asdict(gpu) if gpu else None),
        }
        return "aot", info
    if gpu is None:
        raise InputError(
            f"{trt.flavour} {trt.version}: expected a CUDA GPU to build on, got none; fix: build on the "
            "target device, or build ahead of time with --flavour tensorrt-rtx"
        )
    return gpu.slug, {"name": gpu.name, "compute_capability": gpu.compute_capability}


# ---------------------------------------------------------------------------------------------- builder
@dataclass
class BuilderSetup:
    """A parsed network and its configured builder, with what the engine manifest records about them."""

    builder: Any
    network: Any
    config: Any
    logger: Any
    strongly_typed: bool
    rtx_targets: list[str] = field(default_factory=list)
    fp32_layers_pinned: int | None = None  # FP16-flag builds only
    timing_cache: Any = None
    timing_cache_path: Path | None = None

    def record(self, options: BuildOptions, plan: GraphPlan) -> dict[str, Any]:
        """The manifest's ``builder_options`` section."""
        return {
            "strongly_typed": self.strongly_typed,
            "fp16_mode": options.fp16_mode if plan.precision == "fp16" else None,
            "fp32_layers_pinned": self.fp32_layers_pinned,
            "workspace_mb": options.workspace_mb,
            "optimization_level": options.optimization_level,
            "timing_cache": str(self.timing_cache_path) if self.timing_cache_path else None,
            "rtx_targets": self.rtx_targets or None,
        }


def configure_builder(
    trt: TensorRT,
    source: SourceGraph,
    plan: GraphPlan,
    graph_path: Path,
    options: BuildOptions,
    gpu_tag: str,
    verbose: bool = False,
    say: Callable[[str], None] | None = None,
) -> BuilderSetup:
    """Create the network (strongly typed unless FP16-flag), parse ``graph_path`` into it and configure the
    builder: workspace, optimization level, TensorRT-RTX targets, FP16 flag, timing cache."""
    say = say or (lambda _msg: None)
    setup = _create_network(trt, plan, verbose)
    say(f"parsing {graph_path.name} with {trt.flavour} {trt.version}")
    parse_onnx(trt, setup.network, setup.logger, graph_path, str(source.path))
    setup.config = config = setup.builder.create_builder_config()
    if options.workspace_mb:
        config.set_memory_pool_limit(trt.module.MemoryPoolType.WORKSPACE, int(options.workspace_mb) << 20)
    if options.optimization_level is not None and hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = int(options.optimization_level)
    if trt.is_rtx:
        setup.rtx_targets = _set_rtx_targets(trt, config, tuple(options.rtx_targets))
    if plan.fp16_flag:
        from emorph_deploy.engines.fp16 import fp32_nodes_and_tensors

        keep, tensors = fp32_nodes_and_tensors(source.model)
        setup.fp32_layers_pinned = _apply_fp16_flag(trt, setup.network, config, keep, tensors)
    _attach_timing_cache(trt, setup, options, gpu_tag)
    return setup


def _create_network(trt: TensorRT, plan: GraphPlan, verbose: bool) -> BuilderSetup:
    mod = trt.module
    logger = make_logger(mod, verbose)
    builder = mod.Builder(logger)
    strongly_typed = not plan.fp16_flag and hasattr(mod.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    flags = 0
    if strongly_typed:
        flags |= 1 << int(mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if hasattr(mod.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and trt.version_tuple[:1] < (10,):
        flags |= 1 << int(mod.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)  # pragma: no cover - TRT 8.x
    network = builder.create_network(flags)
    return BuilderSetup(builder, network, None, logger, strongly_typed)


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


def _attach_timing_cache(trt: TensorRT, setup: BuilderSetup, options: BuildOptions, gpu_tag: str) -> None:
    """Reuse and extend ``<out>/timing-<trt>-<gpu>.cache`` (TensorRT-RTX: timing-cache calls are no-ops; it
    has a runtime cache instead)."""
    config = setup.config
    if not options.timing_cache or trt.is_rtx or not hasattr(config, "create_timing_cache"):
        return
    cache_path = Path(options.out_dir) / f"timing-{trt.tag}-{gpu_tag}.cache"
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    setup.timing_cache = config.create_timing_cache(blob)
    setup.timing_cache_path = cache_path
    config.set_timing_cache(setup.timing_cache, False)


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


# ---------------------------------------------------------------------------------------------- build
def serialize_engine(
    trt: TensorRT,
    setup: BuilderSetup,
    plan: GraphPlan,
    label: Path,
    say: Callable[[str], None] | None = None,
    check: Callable[[], None] = lambda: None,
) -> tuple[bytes, float]:
    """(serialized engine, build seconds); ProcessingError with TensorRT's last errors if it fails.
    ``check`` is called while waiting for the build; if it raises, the build is cancelled first."""
    say = say or (lambda _msg: None)
    typing = "strongly typed" if setup.strongly_typed else "BuilderFlag.FP16"
    say(f"building {plan.precision} engine ({typing})")
    t_build = time.perf_counter()
    serialized = _build_interruptibly(trt, setup, check)
    build_s = time.perf_counter() - t_build
    if serialized is None:
        errs = [m.splitlines()[0] for m in setup.logger.errors()][-3:] or ["no error message"]
        raise ProcessingError(
            f"{trt.flavour} {trt.version} failed to build {label} at {plan.precision}: "
            f"{' | '.join(errs)}; fix: build --precision fp32 to isolate, or re-export"
        )
    return bytes(serialized), build_s


def _build_interruptibly(trt: TensorRT, setup: BuilderSetup, check: Callable[[], None]) -> Any:
    """``build_serialized_network`` in a worker thread while the main thread waits in short joins and calls
    ``check`` (from :func:`~emorph_deploy.errors.interrupts_deferred`) after each: on an interruption the
    build is cancelled through a progress monitor and joined before :class:`Interrupted` goes on."""
    import threading

    cancel = threading.Event()
    monitor = _cancelling_monitor(trt, cancel)
    if monitor is not None:
        setup.config.progress_monitor = monitor
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["engine"] = setup.builder.build_serialized_network(setup.network, setup.config)
        except BaseException as exc:  # surfaced in the calling thread
            result["error"] = exc

    worker = threading.Thread(target=run, name="emorph-trt-build", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
            check()
    except BaseException:
        cancel.set()
        worker.join()  # cancelled at the builder's next step
        raise
    finally:
        if monitor is not None:
            setup.config.progress_monitor = None
    if "error" in result:
        raise result["error"]
    return result.get("engine")


def _cancelling_monitor(trt: TensorRT, cancel: Any) -> Any:
    """A TensorRT ``IProgressMonitor`` that cancels the build once ``cancel`` (a threading.Event) is set;
    None when this TensorRT has no progress monitor (the build then runs to its end, its result dropped)."""
    base = getattr(trt.module, "IProgressMonitor", None)
    if base is None:  # pragma: no cover - TensorRT < 10
        return None

    class CancellingMonitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            pass

        def step_complete(self, phase_name: str, step: int) -> bool:
            return not cancel.is_set()

        def phase_finish(self, phase_name: str) -> None:
            pass

    return CancellingMonitor()


# ---------------------------------------------------------------------------------------------- write
@dataclass(frozen=True)
class BuiltFiles:
    engine: Path
    engine_bytes: int
    engine_sha256: str
    graph: Path  # the ONNX graph the engine was built from (the FP16 conversion beside it, or the source)
    graph_sha256: str
    extra: list[Path]  # written beside the engine and its manifest


def write_outputs(
    source: SourceGraph,
    graph: GraphToBuild,
    paths: BuildPaths,
    engine: bytes,
    setup: BuilderSetup,
    options: BuildOptions,
) -> BuiltFiles:
    """Write the FP16 graph and its manifest (if converted; the engine manifest references them), then the
    engine and the timing cache; the engine manifest is written last, by :func:`build_engine`."""
    extra: list[Path] = []
    built_graph, built_sha = source.path, source.sha256
    if graph.fp16_bytes is not None:
        built_graph, built_sha = paths.fp16_onnx, hashlib.sha256(graph.fp16_bytes).hexdigest()
        fp16_meta = derived_onnx_manifest(
            source.meta,
            source.model,
            name=source.name,
            precision="fp16",
            graph_sha=built_sha,
            source=source.path,
            source_sha=source.sha256,
            fp16_conversion=graph.fp16_summary or {},
        )
        write_bytes_atomic(paths.fp16_onnx, graph.fp16_bytes, force=options.force)
        write_manifest_atomic(paths.fp16_manifest, fp16_meta, ONNX_PATH_KEYS, force=options.force)
        extra += [paths.fp16_onnx, paths.fp16_manifest]
    write_bytes_atomic(paths.engine, engine, force=options.force)
    if setup.timing_cache is not None and setup.timing_cache_path is not None:
        write_bytes_atomic(setup.timing_cache_path, bytes(setup.timing_cache.serialize()), force=True)
        extra.append(setup.timing_cache_path)
    engine_sha = hashlib.sha256(engine).hexdigest()
    return BuiltFiles(paths.engine, len(engine), engine_sha, built_graph, built_sha, extra)


# ---------------------------------------------------------------------------------------------- manifest
def engine_manifest(
    source: SourceGraph,
    plan: GraphPlan,
    trt: TensorRT,
    gpu_info: dict[str, Any],
    graph: GraphToBuild,
    built: BuiltFiles,
    setup: BuilderSetup,
    options: BuildOptions,
    seconds: dict[str, float],
) -> dict[str, Any]:
    """The ``emorph-engine/1`` manifest (:mod:`emorph_deploy.engines.manifest`); ``seconds`` holds the
    ``build``, ``total`` and ``conversion`` wall times."""
    from emorph_deploy import __version__

    meta = source.meta or {}
    inputs, outputs = io_spec(source.model)
    gpu = {**gpu_info, "target_compute_capabilities": setup.rtx_targets} if trt.is_rtx else gpu_info
    manifest: dict[str, Any] = {
        "format": ENGINE_FORMAT,
        "name": source.name,
        "engine": built.engine.name,
        "precision": plan.precision,
        "tensorrt": trt.describe(),
        "gpu": gpu,
        "onnx": {
            "source": str(source.path.resolve()),
            "source_sha256": source.sha256,
            "path": str(Path(built.graph).resolve()),
            "sha256": built.graph_sha256,
            "graph_precision": "fp16" if plan.convert_fp16 else source.precision,
            "manifest": meta.get("format") and str(manifest_path_for(source.path).resolve()),
        },
        "model": meta.get("model"),
        "preprocessing": meta.get("preprocessing"),
        "grid_shape": meta.get("grid_shape") or (inputs[0]["shape"][2:] if inputs else None),
        "grid_sample": meta.get("grid_sample"),
        "inputs": inputs,
        "outputs": outputs,
        "builder_options": setup.record(options, plan),
        "fp16_conversion": graph.fp16_summary,
        "calibration": meta.get("calibration"),
        "build_seconds": round(seconds["build"], 3),
        "total_seconds": round(seconds["total"], 3),
        "conversion_seconds": round(seconds["conversion"], 3) if plan.convert_fp16 else None,
        "engine_bytes": built.engine_bytes,
        "engine_sha256": built.engine_sha256,
        "out_dir": str(Path(options.out_dir).resolve()),
        "package_version": __version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest["rebuild_command"] = rebuild_command(manifest)
    return manifest
