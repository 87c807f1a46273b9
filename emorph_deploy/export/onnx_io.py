"""ONNX graphs as the build and calibration commands read and derive them.

One read per source graph (:func:`load_onnx_hashed` returns the model and the file's SHA-256 together), the
graph's precision and I/O as the engine and ONNX manifests record them, the ONNX manifest beside a graph, and
the manifest of a graph derived from another (FP16 conversion, INT8 Q/DQ). ``onnx`` is imported inside the
functions, so importing this module is cheap.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emorph_deploy.errors import InputError
from emorph_deploy.export.manifest import MANIFEST_FORMAT, PATH_KEYS, manifest_path_for
from emorph_deploy.fileio import read_manifest_json

if TYPE_CHECKING:
    import onnx


def load_onnx(path: Path) -> onnx.ModelProto:
    """The ONNX model at ``path`` (external data beside it loaded); InputError if missing or unreadable."""
    return load_onnx_hashed(path)[0]


def load_onnx_hashed(path: Path) -> tuple[onnx.ModelProto, str]:
    """(ModelProto, SHA-256 of the ``.onnx`` file) from one read of the file; external data beside it is
    loaded as ``onnx.load`` does (and is not part of the hash, as with ``sha256_file``)."""
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


def read_onnx_manifest(onnx_path: Path, model: onnx.ModelProto | None = None) -> dict[str, Any] | None:
    """The ONNX manifest beside the graph (``x.onnx`` -> ``x.json``); without one, the manifest rebuilt from
    ``model``'s metadata (:func:`manifest_from_metadata`, when ``model`` is given); else None."""
    path = manifest_path_for(onnx_path)
    if not path.is_file():
        return manifest_from_metadata(model) if model is not None else None
    return read_manifest_json(
        path,
        kind="ONNX manifest",
        fmt=MANIFEST_FORMAT,
        required=(),
        fix="re-run 'emorph export'",
        path_keys=PATH_KEYS,
    )


#: ``metadata_props`` keys of an exported graph: the manifest entries a graph needs to be run without its
#: sidecar ``.json`` (model config and preprocessing as JSON strings).
METADATA_KEYS = {
    "format": "emorph.format",
    "name": "emorph.name",
    "model": "emorph.model",
    "preprocessing": "emorph.preprocessing",
    "grid_sample": "emorph.grid_sample",
    "gather_indices": "emorph.gather_indices",
}
_JSON_ENTRIES = ("model", "preprocessing")


def embed_metadata(model: onnx.ModelProto, manifest: dict[str, Any]) -> onnx.ModelProto:
    """Write the manifest's :data:`METADATA_KEYS` entries into ``model.metadata_props`` (in place, replacing
    earlier ``emorph.*`` values; dicts as JSON strings); returns ``model``."""
    import json

    wanted = {
        key: (json.dumps(manifest[name], sort_keys=True) if name in _JSON_ENTRIES else str(manifest[name]))
        for name, key in METADATA_KEYS.items()
        if manifest.get(name) is not None
    }
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in wanted]
    del model.metadata_props[:]
    for key, value in [*kept, *wanted.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def manifest_from_metadata(model: onnx.ModelProto) -> dict[str, Any] | None:
    """An ONNX manifest rebuilt from the graph alone: :data:`METADATA_KEYS` from ``metadata_props`` plus the
    graph's I/O, grid and precision; None when the graph carries no ``emorph.format``. It has no
    ``sha256_onnx`` (a graph cannot hold its own hash) and records ``"manifest": "onnx metadata_props"``."""
    import json

    from emorph_deploy.export.manifest import spacing_and_orientation

    props = {p.key: p.value for p in model.metadata_props}
    if props.get(METADATA_KEYS["format"]) != MANIFEST_FORMAT:
        return None
    meta: dict[str, Any] = {"format": MANIFEST_FORMAT}
    for name, key in METADATA_KEYS.items():
        if name == "format" or key not in props:
            continue
        try:
            meta[name] = json.loads(props[key]) if name in _JSON_ENTRIES else props[key]
        except ValueError as exc:
            raise InputError(
                f"ONNX metadata {key}: expected a JSON object, got {props[key][:40]!r}; fix: re-run "
                "'emorph export'"
            ) from exc
    meta["inputs"], meta["outputs"] = io_spec(model)
    meta["grid_shape"] = list(meta["inputs"][0]["shape"][2:]) if meta["inputs"] else None
    meta["spacing_mm"], meta["orientation"] = spacing_and_orientation(meta.get("preprocessing"))
    meta["precision"] = graph_precision(model)
    meta["manifest"] = "onnx metadata_props"
    return meta


def graph_precision(model: onnx.ModelProto) -> str:
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


def io_spec(model: onnx.ModelProto) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) as manifest entries ``{"name", "shape", "dtype"}``; initializers are not inputs.

    A shape keeps a symbolic dimension by its name (``"batch"``) and an unknown one as -1.
    """
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


def derived_onnx_manifest(
    meta: dict[str, Any] | None,
    model: onnx.ModelProto,
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
