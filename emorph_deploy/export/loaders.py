"""Checkpoint → ONNX as small named steps (Polygraphy style), each usable on its own.

``onnx_from_checkpoint`` chains them::

    load_model_from_checkpoint → set_sampler → ExportWrapper → torch_to_onnx (legacy exporter)
    → check_onnx (full check) → simplify_onnx (onnxslim, constant folding) → infer_shapes
    → verify_opset / verify_io → [target tensorrt] check_tensorrt_ops → atomic write of .onnx + .json

Exporter choice: ``torch.onnx.export(..., dynamo=False)``. The legacy exporter writes opset 17 for the
gather form (the dynamo exporter cannot down-convert Resize and silently writes opset 18) and 5D
GridSample only at opset 20, which is the spec-conformant opset for N-D GridSample.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emorph_deploy.errors import ConfigMismatchError, EmorphError, InputError, ProcessingError, require
from emorph_deploy.export.manifest import (
    MANIFEST_FORMAT,
    PATH_KEYS,
    io_entry,
    manifest_path_for,
    spacing_and_orientation,
)
from emorph_deploy.export.trt_ops import (
    DEFAULT_TRT_VERSION,
    check_tensorrt_ops,
    gridsample_5d_supported,
    tensorrt_op_report,
)

if TYPE_CHECKING:
    import onnx
    import torch

GRID_SAMPLE_MODES = ("gather", "native")
TARGETS = ("tensorrt", "onnxruntime")
DEFAULT_OPSET = {"gather": 17, "native": 20}
MIN_OPSET = {"gather": 17, "native": 20}  # 17: LayerNormalization; 20: N-D GridSample
INPUT_NAMES = ("moving", "fixed")
ALLOWED_OUTPUTS = (("flow",), ("flow", "warped"))
_SAMPLER_FOR_MODE = {"gather": "gather", "native": "grid_sample"}

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- checkpoint
def checkpoint_files(checkpoint: str | Path) -> tuple[Path, Path]:
    """Resolve a checkpoint (``.safetensors``, ``.json``, stem or run folder) to (weights, meta) files."""
    from emorph_deploy.train.checkpoint import checkpoint_paths

    paths = checkpoint_paths(checkpoint)
    for f in (paths.weights, paths.meta):
        if not f.is_file():
            raise InputError(
                f"checkpoint file {f} not found: expected an emorph checkpoint "
                "(<name>.safetensors + <name>.json); fix: pass a checkpoint written by 'emorph train'"
            )
    return Path(paths.weights), Path(paths.meta)


def load_model_from_checkpoint(checkpoint: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load ``(model, meta)`` with ``emorph_deploy.train.checkpoint.load_checkpoint``; eval mode, fp32, CPU.

    Anything that is not a valid checkpoint becomes an :class:`InputError` (exit 2).
    """
    checkpoint_files(checkpoint)
    from emorph_deploy.train.checkpoint import load_checkpoint

    try:
        model, meta = load_checkpoint(checkpoint)
    except EmorphError:
        raise
    except Exception as exc:  # corrupt safetensors, bad JSON, wrong keys ...
        raise InputError(
            f"{checkpoint} is not a valid emorph checkpoint ({type(exc).__name__}: {exc}); "
            "fix: pass a checkpoint written by 'emorph train'"
        ) from exc
    model = model.float().eval()
    return model, dict(meta or {})


def grid_shape_of(model: torch.nn.Module) -> tuple[int, int, int]:
    """The model grid (D, H, W) from ``model.config.img_size``."""
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "img_size", None)
    if size is None or len(tuple(size)) != 3:
        raise InputError(
            f"model config has no 3D img_size (got {size!r}); fix: use an EfficientMorph checkpoint"
        )
    return tuple(int(s) for s in size)  # type: ignore[return-value]


def config_dict_of(
    model: torch.nn.Module, meta: dict[str, Any], sampler: str | None = None
) -> dict[str, Any]:
    """The model's ModelConfig dict; ``warp_sampler`` set to the sampler the graph actually uses."""
    cfg = getattr(model, "config", None)
    d = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else dict(meta.get("model") or {})
    if sampler is not None and "warp_sampler" in d:
        d["warp_sampler"] = sampler
    return d


# ----------------------------------------------------------------------------------------------- model prep
def set_sampler(model: torch.nn.Module, sampler: str) -> int:
    """Switch every ``SpatialTransformer`` in ``model`` to ``sampler`` ("grid_sample"|"gather"); returns
    the count."""
    from emorph_deploy.models.warp import SpatialTransformer

    count = 0
    for module in model.modules():
        if isinstance(module, SpatialTransformer):
            module.sampler = sampler
            count += 1
    return count


def _export_wrapper_cls():
    import torch

    class ExportWrapper(torch.nn.Module):
        """``(moving, fixed) -> (flow, warped)`` or ``flow`` only: the graph's output order and names."""

        def __init__(self, model: torch.nn.Module, outputs: Sequence[str] = ("flow", "warped")) -> None:
            super().__init__()
            self.model = model
            self.with_warped = "warped" in outputs
            self.training = model.training  # a fresh Module is in training mode: mirror (not recursively)

        def forward(self, moving, fixed):  # (1, 1, D, H, W) each
            warped, flow = self.model(moving, fixed)  # (1, 1, D, H, W), (1, 3, D, H, W)
            if self.with_warped:
                return flow, warped
            return flow

    return ExportWrapper


def ExportWrapper(model: torch.nn.Module, outputs: Sequence[str] = ("flow", "warped")) -> torch.nn.Module:
    """Wrap an EfficientMorph so the graph returns ``flow`` first (and ``warped`` unless
    outputs=("flow",))."""
    return _export_wrapper_cls()(model, outputs)


# ----------------------------------------------------------------------------------------------- ONNX steps
def torch_to_onnx(
    module: torch.nn.Module,
    grid_shape: Sequence[int],
    out_path: str | Path,
    opset: int,
    outputs: Sequence[str] = ("flow", "warped"),
) -> Path:
    """Legacy exporter (``dynamo=False``), fixed input shape 1×1×D×H×W float32, inputs
    ``moving``/``fixed``."""
    import torch

    shape = (1, 1, *(int(s) for s in grid_shape))
    gen = torch.Generator().manual_seed(0)
    args = (torch.rand(shape, generator=gen), torch.rand(shape, generator=gen))
    out_path = Path(out_path)
    # torch.onnx.export evaluates the module in eval mode and afterwards calls .train(<top-level mode>)
    # recursively: put every submodule back exactly as it was (a wrapper in training mode would otherwise
    # leave the wrapped model in training mode — DropPath active — for the caller's next eager call)
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(out_path),
                dynamo=False,
                opset_version=int(opset),
                input_names=list(INPUT_NAMES),
                output_names=list(outputs),
                do_constant_folding=True,
                export_params=True,
            )
    except EmorphError:
        raise
    except Exception as exc:
        raise ProcessingError(
            f"torch.onnx.export failed at opset {opset} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); fix: check --grid-sample/--opset"
        ) from exc
    finally:
        for m, training in modes:
            m.training = training
    return out_path


def check_onnx(model_or_path: onnx.ModelProto | str | Path, *, user_input: bool = False) -> None:
    """``onnx.checker.check_model(full_check=True)``; InputError for user files (exit 2), else
    ProcessingError."""
    onnx = require("onnx", "onnx")
    target = str(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    try:
        onnx.checker.check_model(target, full_check=True)
    except Exception as exc:
        what = model_or_path if isinstance(model_or_path, (str, Path)) else "exported graph"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        cls = InputError if user_input else ProcessingError
        raise cls(
            f"{what} fails onnx.checker (full check): {msg}; fix: re-export with 'emorph export'"
        ) from exc


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Strict ONNX shape inference (with data propagation) — every intermediate gets a static shape."""
    onnx = require("onnx", "onnx")
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ProcessingError(f"ONNX shape inference failed: {str(exc).splitlines()[0]}") from exc


def simplify_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """Constant folding, dead-node and common-subexpression elimination with onnxslim (opset is kept)."""
    onnxslim = require("onnxslim", "onnx")
    opset_before = opset_of(model)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slimmed = onnxslim.slim(model)
    except Exception as exc:
        raise ProcessingError(f"onnxslim failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    if slimmed is None:
        raise ProcessingError("onnxslim returned no model (its self-check failed)")
    if opset_of(slimmed) != opset_before:
        raise ProcessingError(f"onnxslim changed the opset from {opset_before} to {opset_of(slimmed)}")
    return slimmed, f"onnxslim {getattr(onnxslim, '__version__', '?')}"


def opset_of(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def verify_opset(model: onnx.ModelProto, opset: int) -> None:
    got = opset_of(model)
    if got != int(opset):
        raise ProcessingError(
            f"exported graph has opset {got}, expected {opset}; fix: use the legacy exporter"
        )


def graph_io(model: onnx.ModelProto) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Graph inputs/outputs as manifest entries (name, static shape, numpy dtype name)."""
    onnx = require("onnx", "onnx")

    def entry(vi) -> dict[str, Any]:
        t = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        return io_entry(vi.name, shape, dtype)

    initializers = {i.name for i in model.graph.initializer}
    inputs = [entry(vi) for vi in model.graph.input if vi.name not in initializers]
    return inputs, [entry(vi) for vi in model.graph.output]


def verify_io(model: onnx.ModelProto, grid_shape: Sequence[int], outputs: Sequence[str]) -> None:
    """Inputs moving/fixed (1,1,D,H,W) f32; outputs flow (1,3,D,H,W) [+ warped (1,1,D,H,W)], all f32."""
    d, h, w = (int(s) for s in grid_shape)
    expected_in = [io_entry(n, (1, 1, d, h, w)) for n in INPUT_NAMES]
    expected_out = [io_entry("flow", (1, 3, d, h, w))]
    if "warped" in outputs:
        expected_out.append(io_entry("warped", (1, 1, d, h, w)))
    got_in, got_out = graph_io(model)
    if got_in != expected_in or got_out != expected_out:
        raise ProcessingError(
            f"exported graph I/O mismatch: expected inputs {expected_in} outputs {expected_out}, "
            f"got inputs {got_in} outputs {got_out}"
        )


def op_types(model: onnx.ModelProto) -> list[str]:
    return sorted({n.op_type for n in model.graph.node})


# ----------------------------------------------------------------------------------------------- pipeline
def _normalise_outputs(outputs: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(outputs, str):
        outputs = [o.strip() for o in outputs.split(",") if o.strip()]
    outputs = tuple(outputs)
    if outputs not in ALLOWED_OUTPUTS:
        raise InputError(
            f"outputs must be 'flow' or 'flow,warped', got {','.join(outputs) or 'nothing'}; "
            "fix: --outputs flow,warped"
        )
    return outputs


def _resolve_opset(grid_sample: str, opset: int | None) -> int:
    if grid_sample not in GRID_SAMPLE_MODES:
        raise InputError(f"grid_sample must be one of {GRID_SAMPLE_MODES}, got {grid_sample!r}")
    if opset is None:
        return DEFAULT_OPSET[grid_sample]
    if int(opset) < MIN_OPSET[grid_sample]:
        raise InputError(
            f"--grid-sample {grid_sample} needs opset >= {MIN_OPSET[grid_sample]}, got {opset}; "
            f"fix: --opset {DEFAULT_OPSET[grid_sample]}"
        )
    return int(opset)


def export_paths(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    onnx_path = Path(out_dir) / f"{name}.onnx"
    return onnx_path, manifest_path_for(onnx_path)


def default_export_name(checkpoint: str | Path, grid_sample: str) -> str:
    return f"{Path(checkpoint).with_suffix('').name}-{grid_sample}"


def onnx_from_checkpoint(
    checkpoint: str | Path,
    out_path: str | Path,
    grid_sample: str = "gather",
    outputs: Sequence[str] | str = ("flow", "warped"),
    opset: int | None = None,
    target: str | None = None,
    force: bool = False,
    trt_version: str = DEFAULT_TRT_VERSION,
) -> Path:
    """Export ``checkpoint`` to ``out_path`` (``<name>.onnx``) plus the manifest ``<name>.json`` beside it.

    ``target`` defaults to "tensorrt" for the gather form and "onnxruntime" for native GridSample. Both
    files are written atomically; an existing output is only replaced with ``force``; a failure leaves
    nothing behind. Returns the ONNX path.
    """
    from emorph_deploy.fileio import atomic_path, check_writable, sha256_file, write_manifest_atomic
    from emorph_deploy.models.warp import GATHER_INDICES

    onnx_path = Path(out_path)
    if onnx_path.suffix != ".onnx":
        raise InputError(f"output must end in .onnx, got {onnx_path.name}; fix: --name without a suffix")
    json_path = manifest_path_for(onnx_path)
    outputs = _normalise_outputs(outputs)
    opset = _resolve_opset(grid_sample, opset)
    target = target or ("tensorrt" if grid_sample == "gather" else "onnxruntime")
    if target not in TARGETS:
        raise InputError(f"target must be one of {TARGETS}, got {target!r}")
    if target == "tensorrt" and grid_sample == "native" and not gridsample_5d_supported(trt_version):
        raise InputError(
            f"--grid-sample native writes a 5D GridSample, which TensorRT {trt_version} cannot parse "
            "(rank 5 needs TensorRT >= 11.2); fix: --grid-sample gather, --trt-version 11.2 or "
            "--target onnxruntime"
        )
    # Validate everything cheap before any work: outputs writable / not existing, checkpoint real.
    check_writable(onnx_path, force=force)
    check_writable(json_path, force=force)
    weights_file, meta_file = checkpoint_files(checkpoint)

    onnx = require("onnx", "onnx")
    import torch

    from emorph_deploy import __version__
    from emorph_deploy.export.onnx_io import embed_metadata

    model, meta = load_model_from_checkpoint(checkpoint)
    grid = grid_shape_of(model)
    pre_grid = (meta.get("preprocessing") or {}).get("grid_shape")
    if pre_grid is not None and tuple(int(s) for s in pre_grid) != grid:
        raise ConfigMismatchError(
            f"checkpoint {meta_file.name}: preprocessing grid {tuple(pre_grid)} differs from the model grid "
            f"{grid}; fix: re-save the checkpoint with matching Preprocessing(grid_shape={grid})"
        )
    n_warps = set_sampler(model, _SAMPLER_FOR_MODE[grid_sample])
    if n_warps == 0:
        raise ProcessingError("model has no SpatialTransformer to switch to the requested sampler")
    wrapper = ExportWrapper(model, outputs).eval()

    json_written = False
    try:
        with atomic_path(onnx_path, force=force) as tmp_onnx:
            torch_to_onnx(wrapper, grid, tmp_onnx, opset, outputs)
            proto = onnx.load(str(tmp_onnx))
            check_onnx(proto)
            verify_opset(proto, opset)
            proto, simplifier = simplify_onnx(proto)
            proto = infer_shapes(proto)
            check_onnx(proto)
            verify_opset(proto, opset)
            verify_io(proto, grid, outputs)
            ops = op_types(proto)
            if grid_sample == "gather" and "GridSample" in ops:
                raise ProcessingError(
                    "gather export still contains GridSample: a warp bypasses SpatialTransformer"
                )
            if target == "tensorrt":
                trt_report = check_tensorrt_ops(proto, trt_version)
            else:
                trt_report = tensorrt_op_report(proto, trt_version)
            proto.producer_name = "emorph"
            proto.producer_version = __version__
            preprocessing = meta.get("preprocessing")
            model_config = config_dict_of(model, meta, _SAMPLER_FOR_MODE[grid_sample])
            gather_indices = {"gather_indices": GATHER_INDICES} if grid_sample == "gather" else {}
            # the graph carries what running it needs, so it still runs when its .json is lost
            embed_metadata(
                proto,
                {
                    "format": MANIFEST_FORMAT,
                    "name": onnx_path.stem,
                    "model": model_config,
                    "preprocessing": preprocessing,
                    "grid_sample": grid_sample,
                    **gather_indices,
                },
            )
            onnx.save(proto, str(tmp_onnx))

            inputs_io, outputs_io = graph_io(proto)
            spacing, orientation = spacing_and_orientation(preprocessing)
            manifest = {
                "format": MANIFEST_FORMAT,
                "name": onnx_path.stem,
                "model": model_config,
                "preprocessing": preprocessing,
                "grid_shape": list(grid),
                "spacing_mm": spacing,
                "orientation": orientation,
                "opset": opset,
                "exporter": f"torch.onnx.export(dynamo=False) torch {torch.__version__}",
                "simplifier": simplifier,
                "grid_sample": grid_sample,
                **gather_indices,
                "target": target,
                "precision": "fp32",
                "inputs": inputs_io,
                "outputs": outputs_io,
                "ops": ops,
                "tensorrt_check": trt_report.to_dict(),
                "sha256_weights": sha256_file(weights_file),
                "sha256_onnx": sha256_file(tmp_onnx),
                "package_version": __version__,
                "onnx_version": onnx.__version__,
                "source_checkpoint": str(meta_file.resolve()),
            }
            write_manifest_atomic(json_path, manifest, PATH_KEYS, force=force)
            json_written = True
    except BaseException:
        if json_written:  # the .onnx rename failed after the manifest landed: leave nothing
            json_path.unlink(missing_ok=True)
        raise
    log.info("exported %s (%s, opset %d, %s)", onnx_path, grid_sample, opset, target)
    return onnx_path


def load_onnx_checked(path: str | Path) -> onnx.ModelProto:
    """Load a user-supplied ONNX and run the full checker; InputError (exit 2) if it is not valid."""
    onnx = require("onnx", "onnx")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file {path} not found; fix: run 'emorph export' first")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:
        raise InputError(f"{path} is not an ONNX model ({type(exc).__name__}); fix: re-export it") from exc
    check_onnx(path, user_input=True)
    return proto


def check_manifest_matches_graph(meta: dict[str, Any], proto: onnx.ModelProto, path: str | Path) -> None:
    """The manifest's I/O must describe this graph (a stale manifest is a ConfigMismatchError)."""
    inputs, outputs = graph_io(proto)
    if meta.get("inputs") != inputs or meta.get("outputs") != outputs:
        raise ConfigMismatchError(
            f"manifest for {path} does not match the graph: expected inputs {meta.get('inputs')} "
            f"outputs {meta.get('outputs')}, got {inputs} {outputs}; fix: re-run 'emorph export'"
        )
