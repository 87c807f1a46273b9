"""TensorRT runner: a serialized engine (``engines/*.plan``) plus its manifest (``emorph build``).

Before deserializing, the manifest is checked against the running TensorRT flavour/version and GPU; a mismatch
is refused with the exact ``emorph build`` command that rebuilds the engine here. Buffers, stream and CUDA
events come from pycuda (imported lazily: it cannot be built on GPU-less machines); inference sets every I/O
tensor address (``set_tensor_address``) and runs ``execute_async_v3``; ``last_gpu_latency_s`` is the
CUDA-event time of the last ``infer`` (engine only, after ``warmup`` runs at construction), ``last_latency_s``
the wall time incl. copies.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from emorph_deploy.engines.manifest import check_compatible, read_engine_manifest, rebuild_command
from emorph_deploy.errors import ConfigMismatchError, InputError, MissingDependencyError, ProcessingError
from emorph_deploy.runners.base import FLOW, WARPED, Runner


class TensorRTRunner(Runner):
    """Runner protocol over a TensorRT / TensorRT-RTX engine (needs a CUDA GPU and pycuda)."""

    name = "tensorrt"

    def __init__(
        self,
        artifact: str | Path,
        manifest: str | Path | None = None,
        warmup: int = 3,
        device: int = 0,
        verify_sha256: bool = True,
    ) -> None:
        super().__init__()
        from emorph_deploy.engines.trt import detect_gpu, load_tensorrt
        from emorph_deploy.fileio import sha256_file

        path = Path(artifact)
        if not path.is_file():
            raise InputError(
                f"engine {path} not found: expected a .plan from 'emorph build'; fix: check the path"
            )
        meta = read_engine_manifest(manifest or path.with_suffix(".json"))
        trt = load_tensorrt(meta["tensorrt"].get("flavour", "auto"))
        gpu = detect_gpu()
        check_compatible(meta, trt.flavour, trt.version, gpu)  # version mismatch refused even without a GPU
        if verify_sha256 and meta.get("engine_sha256") and sha256_file(path) != meta["engine_sha256"]:
            raise ConfigMismatchError(
                f"engine {path}: expected sha256 {meta['engine_sha256'][:12]}… from its manifest, "
                f"got another file; fix: rebuild with '{rebuild_command(meta, trt.flavour)}'"
            )
        if gpu is None:
            raise MissingDependencyError(
                f"TensorRT runner: expected a CUDA GPU to run {path.name}, got none; fix: "
                "run on a GPU machine, or use the ONNX with --backend onnxruntime"
            )
        try:
            import pycuda.driver as cuda
        except ImportError as exc:
            raise MissingDependencyError(
                f"TensorRT runner: expected pycuda, got ImportError ({exc}); fix: pip "
                "install pycuda (needs the CUDA toolkit)"
            ) from exc
        self.artifact = path
        self._meta = dict(meta)
        self._trt = trt
        self._cuda = cuda
        grid = meta.get("grid_shape") or []
        self._grid_shape = tuple(int(s) for s in grid)  # type: ignore[assignment]
        outs = [o["name"] for o in meta.get("outputs", [])]
        self._output_names = tuple(n for n in (FLOW, WARPED) if n in outs) or (FLOW,)
        cuda.init()
        self._ctx = cuda.Device(device).retain_primary_context()
        self._ctx.push()
        try:
            self._setup(path)
            for _ in range(max(0, int(warmup))):
                self._run()
            self._save_runtime_cache()
        finally:
            self._ctx.pop()
        self.last_gpu_latency_s = float("nan")

    # ------------------------------------------------------------------ setup
    def _setup(self, path: Path) -> None:
        from emorph_deploy.engines.trt import make_logger

        mod = self._trt.module
        cuda = self._cuda
        self._logger = make_logger(mod)
        self._runtime = mod.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            errs = "; ".join(m.splitlines()[0] for m in self._logger.errors()[-2:]) or "no message"
            raise ProcessingError(
                f"engine {path}: {self._trt.flavour} {self._trt.version} could not deserialize it "
                f"({errs}); fix: rebuild with '{rebuild_command(self._meta, self._trt.flavour)}'"
            )
        self._runtime_cache = None
        if self._trt.is_rtx and hasattr(self._engine, "create_runtime_config"):
            # TensorRT-RTX compiles kernels for this GPU at first run: keep them in a runtime cache beside the
            # engine (the RTX counterpart of a timing cache)
            config = self._engine.create_runtime_config()
            cache = config.create_runtime_cache()
            cache_path = path.with_suffix(".runtime-cache")
            if cache_path.is_file():
                with contextlib.suppress(Exception):  # a stale cache is rebuilt
                    cache.deserialize(cache_path.read_bytes())
            config.set_runtime_cache(cache)
            self._runtime_cache = (cache, cache_path)
            self._context = self._engine.create_execution_context(config)
        else:
            self._context = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        self._start, self._end = cuda.Event(), cuda.Event()
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, Any] = {}
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            is_input = self._engine.get_tensor_mode(name) == mod.TensorIOMode.INPUT
            shape = tuple(self._engine.get_tensor_shape(name))
            if is_input and any(s < 0 for s in shape):  # dynamic batch: run at batch 1
                shape = tuple(1 if s < 0 else s for s in shape)
                self._context.set_input_shape(name, shape)
            if not is_input:
                shape = tuple(self._context.get_tensor_shape(name))
            dtype = np.dtype(mod.nptype(self._engine.get_tensor_dtype(name)))
            host = cuda.pagelocked_empty(shape, dtype)
            dev = cuda.mem_alloc(host.nbytes)
            self._host[name], self._device[name] = host, dev
            self._context.set_tensor_address(name, int(dev))
            (self._inputs if is_input else self._outputs).append(name)

    def _save_runtime_cache(self) -> None:
        if self._runtime_cache is None:
            return
        from emorph_deploy.fileio import write_bytes_atomic

        cache, cache_path = self._runtime_cache
        with contextlib.suppress(Exception):  # a read-only engines/ folder only loses the cache
            write_bytes_atomic(cache_path, bytes(cache.serialize()), force=True)

    # ------------------------------------------------------------------ inference
    def _run(self) -> float:
        cuda = self._cuda
        for name in self._inputs:
            cuda.memcpy_htod_async(self._device[name], self._host[name], self._stream)
        self._start.record(self._stream)
        if not self._context.execute_async_v3(self._stream.handle):
            raise ProcessingError(
                f"engine {self.artifact}: execute_async_v3 failed; fix: rerun with a rebuilt engine"
            )
        self._end.record(self._stream)
        for name in self._outputs:
            cuda.memcpy_dtoh_async(self._host[name], self._device[name], self._stream)
        self._stream.synchronize()
        return self._end.time_since(self._start) / 1000.0

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._ctx.push()
        try:
            for name in self._inputs:
                np.copyto(self._host[name], feed[name].astype(self._host[name].dtype, copy=False))
            self.last_gpu_latency_s = self._run()
            return {name: np.array(self._host[name], dtype=np.float32) for name in self._outputs}
        finally:
            self._ctx.pop()

    def benchmark(self, iterations: int = 20) -> list[float]:
        """CUDA-event seconds of ``iterations`` engine runs on the current input buffers (after warm-up)."""
        self._ctx.push()
        try:
            return [self._run() for _ in range(int(iterations))]
        finally:
            self._ctx.pop()

    def close(self) -> None:
        for dev in getattr(self, "_device", {}).values():
            with contextlib.suppress(Exception):  # driver teardown
                dev.free()
        self._device = {}
        for attr in ("_context", "_engine", "_runtime"):
            if hasattr(self, attr):
                setattr(self, attr, None)
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            with contextlib.suppress(Exception):
                ctx.detach()
            self._ctx = None
