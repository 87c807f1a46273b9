"""The packaged default model: ``default.safetensors`` + ``default.json`` (an emorph checkpoint).

Ships as package data (``[tool.setuptools.package-data]`` in pyproject: ``weights/*.safetensors``,
``weights/*.json``). The model card is ``docs/model_card.md``. When the files are missing (a trimmed install),
:func:`default_checkpoint_path` raises an :class:`~emorph_deploy.errors.InputError` telling the user to pass
``--model CHECKPOINT``.

    from emorph_deploy.weights import default_checkpoint_path, load_default
    model, meta = load_default()          # EfficientMorph (eval mode) + checkpoint metadata

On CPUs that compute bf16 natively (AVX512-BF16 or AMX) with OpenVINO installed, ``backend="auto"`` runs the
packaged model as an OpenVINO bf16 IR (:func:`default_openvino_ir`, built once per machine into
``$EMORPH_CACHE/openvino``, default ``~/.cache/emorph/openvino``): on the validation suite it registers
with the same Dice as torch fp32 at about half the inference time (docs/model_card.md).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emorph_deploy.errors import InputError

__all__ = [
    "DEFAULT_STEM",
    "WEIGHTS_DIR",
    "default_checkpoint",
    "default_checkpoint_path",
    "default_openvino_ir",
    "ir_cache_root",
    "is_default_checkpoint",
    "load_default",
    "packaged_ir_skip",
]

#: folder of the packaged weights (this package)
WEIGHTS_DIR = Path(__file__).resolve().parent
#: file stem of the default model: ``default.safetensors`` + ``default.json``
DEFAULT_STEM = "default"


def default_checkpoint_path() -> Path:
    """Path of the packaged default checkpoint's weights (``default.safetensors``; its ``default.json`` sits
    beside it). Raises InputError when no default model is packaged (both files are needed)."""
    weights = WEIGHTS_DIR / f"{DEFAULT_STEM}.safetensors"
    meta = WEIGHTS_DIR / f"{DEFAULT_STEM}.json"
    missing = [p.name for p in (weights, meta) if not p.is_file()]
    if missing:
        raise InputError(
            f"no default model is packaged; pass --model CHECKPOINT (expected {', '.join(missing)} in "
            f"{WEIGHTS_DIR}, got none)"
        )
    return weights


#: short alias of :func:`default_checkpoint_path` (public API)
default_checkpoint = default_checkpoint_path


def load_default(device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """``(model, meta)`` of the packaged default model (eval mode, on ``device``); InputError if none."""
    from emorph_deploy.train.checkpoint import load_checkpoint

    model, meta = load_checkpoint(default_checkpoint_path())
    return model.to(device).eval(), meta


# ------------------------------------------------------------------------- the packaged model in OpenVINO
def is_default_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` names the packaged checkpoint (its ``.safetensors`` or ``.json``)."""
    try:
        weights = default_checkpoint_path()
    except InputError:
        return False
    p = Path(path)
    return p.parent.resolve() == weights.parent.resolve() and p.name in (weights.name, f"{DEFAULT_STEM}.json")


def packaged_ir_skip() -> str | None:
    """Why ``backend="auto"`` runs the packaged model in torch here rather than as an OpenVINO bf16 IR, or
    None when it takes the IR: it needs OpenVINO, an x86-64 CPU that computes bf16 natively (without it,
    OpenVINO fp32 ran the model only ~10 % faster than torch, not worth a first-use build), no CUDA GPU
    (torch runs the model there). A network that warps inside (a full-resolution stage fed the warped
    image) runs there too: the exported gather sampler forms its indices in integers."""
    import importlib.util
    import platform

    from emorph_deploy.runtime import cpu_has_native_bf16

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not measured on {platform.machine()} CPUs"
    if not cpu_has_native_bf16():
        return "the CPU has no AVX512-BF16/AMX-BF16, so the packaged model runs in torch fp32"
    if importlib.util.find_spec("openvino") is None:
        return "'openvino' is not installed (pip install 'emorph-deploy[cpu]' for the bf16 fast path)"
    try:
        import torch

        if torch.cuda.is_available():
            return "a CUDA GPU is available: torch runs the packaged model on it"
    except ImportError:
        pass
    return None


def ir_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` or ``$EMORPH_CACHE/openvino`` or ``~/.cache/emorph/openvino``."""
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("EMORPH_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "emorph") / "openvino"


def default_openvino_ir(
    precision: str = "bf16",
    cache_dir: str | os.PathLike | None = None,
    say: Callable[[str], None] | None = None,
) -> Path:
    """The packaged model as an OpenVINO IR (``.xml``, with its ``.bin`` and manifest) at ``precision``.

    Built on first use (ONNX export with the gather sampler, the flow as the only output, then
    :func:`emorph_deploy.engines.openvino.build_ir`, a few seconds) into ``<cache>/<first 16 hex of the
    weights' sha256>-openvino<version>-<precision>-flow/`` and reused after: a retrained package or another
    OpenVINO gets its own folder. The flow alone: the registration warps the moving image itself where it
    needs it (once, on every thread, after refinement), and a gather warp in the graph cost the IR more than
    that warp costs in torch. The folder
    appears in one rename, so an interrupted or concurrent build leaves nothing partial. ``say`` receives one
    line after a build. Raises InputError when no model is packaged, OSError when the cache is not
    writable, ImportError without OpenVINO.
    """
    import openvino as ov

    weights = default_checkpoint_path()
    meta = json.loads(weights.with_suffix(".json").read_text())
    version = ov.__version__.split("-")[0]
    root = ir_cache_root(cache_dir)
    folder = root / f"{str(meta['sha256_weights'])[:16]}-openvino{version}-{precision}-flow"
    found = sorted(folder.glob("*.xml"))
    if found:
        return found[0]
    from emorph_deploy.engines.openvino import build_ir
    from emorph_deploy.export import onnx_from_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=root))
    try:
        onnx = onnx_from_checkpoint(
            weights, tmp / "onnx" / f"{DEFAULT_STEM}.onnx", grid_sample="gather", outputs=("flow",)
        )
        build = build_ir(onnx, precision, out_dir=tmp / "ir")
        shutil.rmtree(onnx.parent)
        try:
            os.rename(tmp / "ir", folder)
        except OSError:
            if not any(folder.glob("*.xml")):  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if say is not None:
        say(f"built the packaged model's OpenVINO {precision} IR once, into {folder} (reused from now on)")
    return folder / Path(build.xml).name
