"""The ONNX manifest: ``export/<name>.json`` beside ``export/<name>.onnx`` (format ``emorph-onnx/1``).

Keys (docs/conventions.md): ``format``, ``name``, ``model`` (ModelConfig dict, ``warp_sampler`` as
exported), ``preprocessing`` (Preprocessing dict), ``grid_shape``, ``spacing_mm``, ``orientation``,
``opset``, ``exporter``, ``grid_sample`` ("native"|"gather"), ``target``, ``precision``,
``inputs``/``outputs`` (name, shape, dtype), ``sha256_weights`` (sha256 of the source checkpoint's
``.safetensors`` file), ``sha256_onnx`` (sha256 of the ``.onnx`` file), ``package_version``,
``source_checkpoint`` (absolute path of the checkpoint's ``.json``), plus ``simplifier``, ``ops``,
``tensorrt_check`` and ``onnx_version``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emorph_deploy.errors import ConfigMismatchError, InputError

MANIFEST_FORMAT = "emorph-onnx/1"
REQUIRED_KEYS = ("format", "model", "grid_shape", "inputs", "outputs", "precision")


def manifest_path_for(artifact: str | Path) -> Path:
    """``export/x.onnx`` → ``export/x.json`` (same folder, same stem)."""
    return Path(artifact).with_suffix(".json")


def spacing_and_orientation(preprocessing: dict[str, Any] | None) -> tuple[list[float] | None, str]:
    """Pull spacing (mm) and orientation out of a Preprocessing dict, tolerant of the exact key names."""
    pre = preprocessing or {}
    spacing = None
    for key in ("spacing_mm", "spacing", "voxel_spacing", "target_spacing"):
        if pre.get(key) is not None:
            spacing = [float(s) for s in pre[key]]
            break
    orientation = str(pre.get("orientation", "RAS"))
    return spacing, orientation


def read_manifest(path: str | Path, expected_format: str = MANIFEST_FORMAT) -> dict[str, Any]:
    """Read and validate a manifest JSON; :class:`InputError` (exit 2) on a missing/corrupt/foreign file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"manifest {path} not found: expected the .json written by 'emorph export' beside the "
            "artifact; fix: re-run 'emorph export' or pass the matching manifest"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"manifest {path} is not valid JSON ({exc}); fix: re-run 'emorph export'") from exc
    if not isinstance(meta, dict) or meta.get("format") != expected_format:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ConfigMismatchError(
            f"manifest {path}: expected format '{expected_format}', got '{got}'; fix: re-run 'emorph export'"
        )
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise InputError(f"manifest {path} lacks keys {missing}; fix: re-run 'emorph export'")
    return meta


def io_entry(name: str, shape: tuple[int, ...] | list[int], dtype: str = "float32") -> dict[str, Any]:
    return {"name": name, "shape": [int(s) for s in shape], "dtype": dtype}
