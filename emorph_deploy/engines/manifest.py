"""Engine manifests: ``engines/<name>.json`` beside ``engines/<name>.plan`` (format ``emorph-engine/1``).

An engine is tied to the TensorRT flavour and version that built it and to the GPU architecture (or, for an
ahead-of-time TensorRT-RTX build, to its list of target compute capabilities). :func:`check_compatible`
refuses a mismatch with the exact ``emorph build`` command that rebuilds the engine on this machine.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

from emorph_deploy.errors import ConfigMismatchError, InputError

ENGINE_FORMAT = "emorph-engine/1"
AOT_GPU = "AOT/CPU"
REQUIRED = ("format", "name", "precision", "tensorrt", "gpu", "onnx", "inputs", "outputs")


def engine_stem(name: str, precision: str, gpu_tag: str, trt_tag: str) -> str:
    """``<model>-<precision>-<gpu or aot>-<flavour+version>``, made file-name safe."""
    stem = f"{name}-{precision}-{gpu_tag}-{trt_tag}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", stem)


def manifest_path_for(engine: str | Path) -> Path:
    return Path(engine).with_suffix(".json")


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
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"engine manifest {path} not found: expected the .json written by 'emorph build' beside "
            "the engine; fix: rebuild the engine with 'emorph build'"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            f"engine manifest {path} is not valid JSON ({exc}); fix: rebuild with 'emorph build'"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != ENGINE_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ConfigMismatchError(
            f"engine manifest {path}: expected format '{ENGINE_FORMAT}', got '{got}'; "
            "fix: rebuild with 'emorph build'"
        )
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise InputError(f"engine manifest {path} lacks keys {missing}; fix: rebuild with 'emorph build'")
    return meta


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
