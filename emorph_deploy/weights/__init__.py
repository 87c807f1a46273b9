"""The packaged default model: ``default.safetensors`` + ``default.json`` (an emorph checkpoint).

Ships as package data (``[tool.setuptools.package-data]`` in pyproject: ``weights/*.safetensors``,
``weights/*.json``). The model card is ``docs/model_card.md``. When the files are missing (a trimmed install),
:func:`default_checkpoint_path` raises an :class:`~emorph_deploy.errors.InputError` telling the user to pass
``--model CHECKPOINT``.

    from emorph_deploy.weights import default_checkpoint_path, load_default
    model, meta = load_default()          # EfficientMorph (eval mode) + checkpoint metadata
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emorph_deploy.errors import InputError

__all__ = ["DEFAULT_STEM", "WEIGHTS_DIR", "default_checkpoint", "default_checkpoint_path", "load_default"]

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
