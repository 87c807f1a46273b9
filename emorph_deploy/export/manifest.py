"""The ONNX manifest: ``export/<name>.json`` beside ``export/<name>.onnx`` (format ``emorph-onnx/1``).

Keys (docs/conventions.md): ``format``, ``name``, ``model`` (ModelConfig dict, ``warp_sampler`` as
exported), ``preprocessing`` (Preprocessing dict), ``grid_shape``, ``spacing_mm``, ``orientation``,
``opset``, ``exporter``, ``grid_sample`` ("native"|"gather"), ``target``, ``precision``,
``inputs``/``outputs`` (name, shape, dtype), ``sha256_weights`` (sha256 of the source checkpoint's
``.safetensors`` file), ``sha256_onnx`` (sha256 of the ``.onnx`` file), ``package_version``,
``source_checkpoint`` (the checkpoint's ``.json``), plus ``simplifier``, ``ops``,
``tensorrt_check`` and ``onnx_version``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MANIFEST_FORMAT = "emorph-onnx/1"
REQUIRED_KEYS = ("format", "model", "grid_shape", "inputs", "outputs", "precision")
#: Paths an ONNX manifest records, stored relative to its folder (read back absolute; older manifests store
#: absolute paths): the checkpoint, the graph a derived one came from, the calibration records.
PATH_KEYS = (
    ("source_checkpoint",),
    ("derived_from", "onnx"),
    ("calibration", "pairs"),
    ("calibration", "stats"),
    ("calibration", "cache"),
)


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
    from emorph_deploy.fileio import read_manifest_json

    return read_manifest_json(
        path,
        kind="manifest",
        fmt=expected_format,
        required=REQUIRED_KEYS,
        fix="re-run 'emorph export' or pass the matching manifest",
        path_keys=PATH_KEYS,
    )


def io_entry(name: str, shape: tuple[int, ...] | list[int], dtype: str = "float32") -> dict[str, Any]:
    return {"name": name, "shape": [int(s) for s in shape], "dtype": dtype}
