"""Engine manifests: ``engines/<name>.json`` beside ``engines/<name>.plan`` (format ``emorph-engine/1``).

An engine is tied to the TensorRT flavour and version that built it and to the GPU architecture (or, for an
ahead-of-time TensorRT-RTX build, to its list of target compute capabilities). :func:`check_compatible`
refuses a mismatch with the exact ``emorph build`` command that rebuilds the engine on this machine.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from emorph_deploy.errors import ConfigMismatchError

ENGINE_FORMAT = "emorph-engine/1"
AOT_GPU = "AOT/CPU"
REQUIRED = ("format", "name", "precision", "tensorrt", "gpu", "onnx", "inputs", "outputs")
#: Paths an engine manifest records, stored relative to its folder (read back absolute; older manifests store
#: absolute paths): the source graph, the graph built (maybe its FP16 conversion), their manifest, the folder.
PATH_KEYS = (("onnx", "source"), ("onnx", "path"), ("onnx", "manifest"), ("out_dir",))


def engine_stem(name: str, precision: str, gpu_tag: str, trt_tag: str) -> str:
    """``<model>-<precision>-<gpu or aot>-<flavour+version>``, made file-name safe."""
    stem = f"{name}-{precision}-{gpu_tag}-{trt_tag}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", stem)


def rebuild_command(meta: dict[str, Any], flavour: str | None = None) -> str:
    """The ``emorph build`` command that rebuilds this engine (on the machine that runs it)."""
    onnx = meta.get("onnx", {})
    src = onnx.get("source") or onnx.get("path") or "<model>.onnx"
    opts = meta.get("builder_options", {})
    args = [
        "emorph",
        "build",
        str(src),
        "--precision",
        str(meta.get("precision", "fp32")),
        "--flavour",
        flavour or meta.get("tensorrt", {}).get("flavour", "auto"),
    ]
    if opts.get("workspace_mb"):
        args += ["--workspace-mb", str(opts["workspace_mb"])]
    if opts.get("fp16_mode") == "flag":
        args += ["--fp16-mode", "flag"]
    if meta.get("out_dir"):
        args += ["--out", str(meta["out_dir"])]
    args.append("--force")
    return shlex.join(args)


def read_engine_manifest(path: str | Path) -> dict[str, Any]:
    from emorph_deploy.fileio import read_manifest_json

    return read_manifest_json(
        path,
        kind="engine manifest",
        fmt=ENGINE_FORMAT,
        required=REQUIRED,
        fix="rebuild the engine with 'emorph build'",
        path_keys=PATH_KEYS,
    )


def check_compatible(meta: dict[str, Any], flavour: str, version: str, gpu: Any | None) -> None:
    """Refuse an engine built by another TensorRT flavour/version or for another GPU (ConfigMismatchError)."""
    built = meta["tensorrt"]
    if built.get("flavour") != flavour or built.get("version") != version:
        raise ConfigMismatchError(
            f"engine {meta.get('engine', meta['name'])}: expected an engine built by the running {flavour} "
            f"{version}, got one built by {built.get('flavour')} {built.get('version')}; fix: rebuild it "
            "here with "
            f"'{rebuild_command(meta, flavour)}'"
        )
    if gpu is None:
        return
    g = meta["gpu"]
    cc = str(gpu.compute_capability)
    targets = [str(t) for t in g.get("target_compute_capabilities", [])]
    if g.get("name") == AOT_GPU or targets:
        if targets and cc not in targets:
            raise ConfigMismatchError(
                f"engine {meta.get('engine', meta['name'])}: expected a GPU of compute capability in "
                f"{targets}, "
                f"got {gpu.name} ({cc}); fix: rebuild it here with '{rebuild_command(meta, flavour)}'"
            )
        return
    if str(g.get("compute_capability")) != cc or g.get("name") != gpu.name:
        raise ConfigMismatchError(
            f"engine {meta.get('engine', meta['name'])}: expected the GPU it was built on, {g.get('name')} "
            f"({g.get('compute_capability')}), got {gpu.name} ({cc}); fix: rebuild it here with "
            f"'{rebuild_command(meta, flavour)}'"
        )
