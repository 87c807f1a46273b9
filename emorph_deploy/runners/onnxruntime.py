"""ONNX Runtime runner: an exported ``.onnx`` plus its manifest ``.json`` (written by ``emorph export``).

CPU provider by default; with ``providers="auto"`` the TensorRT and CUDA execution providers are used
first when the installed onnxruntime (onnxruntime-gpu) offers them. Session options: graph optimisation
level "all", intra-op threads settable (``threads``; 0 = ONNX Runtime's default).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emorph_deploy.errors import ConfigMismatchError, InputError, ProcessingError, require
from emorph_deploy.runners.base import FLOW, INPUT_NAMES, WARPED, Runner
from emorph_deploy.runtime import cpu_has_int8_dot

PREFERRED_PROVIDERS: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


def select_providers(requested: str | Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """``"cpu"``/None → CPU only; ``"auto"`` → TensorRT, CUDA, CPU as available; a list → checked as given."""
    if requested is None or requested == "cpu":
        return ["CPUExecutionProvider"]
    if requested == "auto":
        return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]
    wanted = [requested] if isinstance(requested, str) else list(requested)
    missing = [p for p in wanted if p not in available]
    if missing:
        raise InputError(
            f"onnxruntime providers {missing} are not available (have {list(available)}); "
            "fix: pip install onnxruntime-gpu for CUDA/TensorRT, or use providers='cpu'"
        )
    return wanted


def read_checked_manifest(
    artifact: Path, manifest: str | Path | None = None, verify: bool = True
) -> tuple[dict[str, Any], tuple[int, int, int], tuple[str, ...]]:
    """(manifest, grid (D, H, W), output names) of an exported ``.onnx``, checked against the graph.

    ``manifest`` defaults to ``<artifact>.json``; ``verify`` runs the full ONNX checker on the file and
    compares its sha256 with the manifest's ``sha256_onnx`` (a modified graph needs its manifest updated).
    Shared by the runners that read ONNX (ONNX Runtime, OpenVINO).
    """
    from emorph_deploy.export.loaders import check_manifest_matches_graph, load_onnx_checked
    from emorph_deploy.export.manifest import manifest_path_for, read_manifest
    from emorph_deploy.fileio import sha256_file

    if artifact.suffix != ".onnx":
        raise InputError(f"expected an .onnx file, got {artifact.name}; fix: pass export/<name>.onnx")
    sidecar = Path(manifest) if manifest is not None else manifest_path_for(artifact)
    if manifest is None and not sidecar.is_file() and artifact.is_file():
        meta = _manifest_from_graph(artifact, sidecar)  # the .json is lost: the graph's own metadata
    else:
        meta = read_manifest(sidecar)
    if verify:
        proto = load_onnx_checked(artifact)
        check_manifest_matches_graph(meta, proto, artifact)
        recorded = meta.get("sha256_onnx")
        if recorded and sha256_file(artifact) != recorded:
            raise ConfigMismatchError(
                f"{artifact} does not match its manifest (sha256_onnx differs): the "
                "graph was modified after export; fix: re-run 'emorph export' or update "
                "the manifest"
            )
    elif not artifact.is_file():
        raise InputError(f"ONNX file {artifact} not found; fix: run 'emorph export' first")
    grid = tuple(int(s) for s in meta["grid_shape"])
    names = tuple(o["name"] for o in meta["outputs"])
    if names not in ((FLOW,), (FLOW, WARPED)):
        raise ConfigMismatchError(
            f"{artifact}: expected outputs ('flow',) or ('flow', 'warped'), got "
            f"{names}; fix: re-run 'emorph export'"
        )
    expected_inputs = [{"name": n, "shape": [1, 1, *grid], "dtype": "float32"} for n in INPUT_NAMES]
    if meta["inputs"] != expected_inputs:
        raise ConfigMismatchError(
            f"{artifact}: expected inputs {expected_inputs}, got {meta['inputs']}; "
            "fix: re-run 'emorph export'"
        )
    return meta, grid, names  # type: ignore[return-value]


def _manifest_from_graph(artifact: Path, sidecar: Path) -> dict[str, Any]:
    """The manifest an export embeds in its ``metadata_props``; InputError naming the missing sidecar when
    the graph carries none (an ONNX not written by ``emorph export``)."""
    from emorph_deploy.export.loaders import load_onnx_checked
    from emorph_deploy.export.onnx_io import manifest_from_metadata

    meta = manifest_from_metadata(load_onnx_checked(artifact))
    if meta is None:
        raise InputError(
            f"manifest {sidecar}: expected the manifest beside the graph or emorph metadata inside it, got "
            "neither; fix: re-run 'emorph export' (or pass the matching manifest)"
        )
    return meta


class OnnxRuntimeRunner(Runner):
    """Run an exported graph with ONNX Runtime.

    ``manifest`` defaults to ``<artifact>.json``; ``verify`` runs the full ONNX checker on the file and
    compares
    its sha256 with the manifest's ``sha256_onnx`` (a modified graph needs its manifest updated).
    """

    name = "onnxruntime"

    def __init__(
        self,
        artifact: str | Path,
        manifest: str | Path | None = None,
        threads: int | None = None,
        providers: str | Sequence[str] | None = "auto",
        verify: bool = True,
    ) -> None:
        super().__init__()
        ort = require("onnxruntime", "onnx")
        self.artifact = Path(artifact)
        meta, self._grid_shape, self._output_names = read_checked_manifest(self.artifact, manifest, verify)

        opts = ort.SessionOptions()
        # INT8 (QDQ) graphs on CPUs without VNNI/AMX: keep Q/DQ as explicit fake-quantisation (BASIC). At
        # ENABLE_ALL ONNX Runtime fuses Q/DQ+MatMul into its own u8s8 kernels, which saturate on x86 without
        # VNNI (measured: 14 % error on one MatMul vs 0.6 % unfused) and do not model what TensorRT computes
        # from the same QDQ graph. With VNNI/AMX the int8 dot products accumulate in int32: fused.
        unfused = meta.get("precision") == "int8" and not cpu_has_int8_dot()
        level = "ORT_ENABLE_BASIC" if unfused else "ORT_ENABLE_ALL"
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        opts.log_severity_level = 3
        # No memory-pattern plan: ORT's planned block for all intermediates is what drove peak RSS to 2.96 GiB
        # at 160×192×224 (em-23-hires, gather graph); without it the arena reuses freed blocks: 1.76 GiB, same
        # latency (median of 3: 7.8 s either way, 2 threads).
        opts.enable_mem_pattern = False
        if threads is not None:
            if int(threads) < 0:
                raise InputError(f"threads must be >= 0 (0 = onnxruntime default), got {threads}")
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        chosen = select_providers(providers, ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(str(self.artifact), sess_options=opts, providers=chosen)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(
                f"onnxruntime cannot load {self.artifact}: {first}; fix: re-run 'emorph export' "
                "(use --grid-sample native only with onnxruntime >= 1.17)"
            ) from exc
        self._threads = threads
        self._meta: dict[str, Any] = dict(meta)
        self._meta["backend"] = f"onnxruntime {ort.__version__} ({', '.join(self._session.get_providers())})"
        self._meta["intra_op_threads"] = threads if threads is not None else 0

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outs = self._session.run(list(self._output_names), feed)
        except Exception as exc:
            raise ProcessingError(f"onnxruntime inference failed: {str(exc).splitlines()[0]}") from exc
        return dict(zip(self._output_names, outs, strict=True))

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]
