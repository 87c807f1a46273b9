"""Self-describing checkpoints: ``<stem>.safetensors`` (weights) + ``<stem>.json`` (everything else).

Format ``emorph-checkpoint/1``::

    {"format": "emorph-checkpoint/1",
     "model": ModelConfig.to_dict(), "preprocessing": Preprocessing.to_dict() | null,
     "training": {...} | null, "metrics": {...} | null,
     "code_version": {"package": "0.1.0", "git_commit": "abc…" | null, "git_dirty": bool | null},
     "weights": "<stem>.safetensors", "sha256_weights": "…", "num_parameters": int, "created": ISO-8601}

Loading never unpickles: weights come from safetensors, metadata from JSON. The resumable training state
(optimizer, scheduler, step, epoch, RNG) lives in a separate ``<stem>.state.pt`` that only holds tensors and
plain containers and is read with ``torch.load(weights_only=True)``.

Every file is written to a temporary name in the same folder and renamed on success
(:func:`emorph_deploy.fileio.atomic_path`), so nothing half-written is ever left under the final name.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emorph_deploy.errors import ConfigMismatchError, InputError
from emorph_deploy.fileio import atomic_path, check_writable, sha256_file, write_json_atomic
from emorph_deploy.models.config import TRAINING_ONLY_FIELDS

if TYPE_CHECKING:  # pragma: no cover
    import torch

FORMAT = "emorph-checkpoint/1"
STATE_FORMAT = "emorph-train-state/1"
WEIGHTS_SUFFIX = ".safetensors"
META_SUFFIX = ".json"
STATE_SUFFIX = ".state.pt"

__all__ = [
    "FORMAT",
    "CheckpointPaths",
    "checkpoint_paths",
    "code_version",
    "load_checkpoint",
    "load_checkpoint_meta",
    "load_training_state",
    "save_checkpoint",
    "save_training_state",
    "unwrap_model",
]


# ---------------------------------------------------------------------------------------------------- paths
class CheckpointPaths:
    """The three files of a checkpoint stem: ``weights``, ``meta`` and ``state``."""

    def __init__(self, stem: Path) -> None:
        self.stem = Path(stem)
        self.weights = self.stem.with_name(self.stem.name + WEIGHTS_SUFFIX)
        self.meta = self.stem.with_name(self.stem.name + META_SUFFIX)
        self.state = self.stem.with_name(self.stem.name + STATE_SUFFIX)

    def __repr__(self) -> str:
        return f"CheckpointPaths({str(self.stem)!r})"


def checkpoint_paths(path: str | os.PathLike) -> CheckpointPaths:
    """Resolve ``<stem>.safetensors``, ``<stem>.json``, ``<stem>.state.pt``, the bare stem, or a run folder.

    A folder resolves to its ``best`` checkpoint, else ``last``, else its only checkpoint.
    """
    p = Path(path)
    name = p.name
    for suffix in (STATE_SUFFIX, WEIGHTS_SUFFIX, META_SUFFIX):
        if name.endswith(suffix) and len(name) > len(suffix):
            return CheckpointPaths(p.with_name(name[: -len(suffix)]))
    if p.is_dir():
        for stem in ("best", "last"):
            if (p / f"{stem}{META_SUFFIX}").is_file():
                return CheckpointPaths(p / stem)
        metas = sorted(q for q in p.glob(f"*{META_SUFFIX}") if (q.with_suffix(WEIGHTS_SUFFIX)).is_file())
        if len(metas) == 1:
            return CheckpointPaths(metas[0].with_suffix(""))
        raise InputError(
            f"checkpoint folder {p} holds {len(metas)} checkpoints (no best/last): expected one; "
            f"fix: pass the .safetensors or .json file itself"
        )
    return CheckpointPaths(p)


# ---------------------------------------------------------------------------------------------- code version
@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """Package version and, when the package runs from a git work tree, the commit and dirty flag."""
    from emorph_deploy import __version__

    info: dict[str, Any] = {"package": __version__, "git_commit": None, "git_dirty": None}
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0 and commit.stdout.strip():
            info["git_commit"] = commit.stdout.strip()
            status = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            if status.returncode == 0:
                info["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):  # no git, or too slow: version only
        pass
    return info


# ------------------------------------------------------------------------------------------------- helpers
def unwrap_model(model: Any) -> Any:
    """Strip DistributedDataParallel / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        else:
            return model


def _to_dict(obj: Any) -> Any:
    if obj is None or isinstance(obj, dict):
        return obj
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} into checkpoint metadata")


def _state_dict_for_save(model: Any) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies (no shared storage, which safetensors refuses)."""
    sd = unwrap_model(model).state_dict()
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------------- save
def save_checkpoint(
    model: Any,
    path: str | os.PathLike,
    preprocessing: Any = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    force: bool = False,
    extra: dict[str, Any] | None = None,
) -> CheckpointPaths:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` atomically; return their paths.

    ``path`` is the stem (``runs/x/best``) or either file name. ``model`` is an ``EfficientMorph`` (possibly
    DDP-wrapped); its ``config`` (``ModelConfig``) is stored. ``preprocessing`` is a ``Preprocessing`` (or its
    dict). Without ``force`` an existing checkpoint is an ``OutputExistsError`` and nothing is written.
    """
    from safetensors.torch import save_file

    paths = checkpoint_paths(path)
    # Validate both destinations before writing anything.
    check_writable(paths.weights, force=force)
    check_writable(paths.meta, force=force)

    core = unwrap_model(model)
    config = getattr(core, "config", None)
    if config is None:
        raise InputError(
            f"cannot checkpoint {type(core).__name__}: expected a model with a .config ModelConfig"
        )
    tensors = _state_dict_for_save(core)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "model": _to_dict(config),
        "preprocessing": _to_dict(preprocessing),
        "training": training,
        "metrics": metrics,
        "code_version": code_version(),
        "weights": paths.weights.name,
        "sha256_weights": None,
        "num_parameters": int(sum(p.numel() for p in core.parameters())),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        meta.update(extra)
    # Fail on unserialisable metadata before touching the disk.
    json.dumps(meta, default=_json_probe)
    with atomic_path(paths.weights, force=force) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "emorph": FORMAT})
        meta["sha256_weights"] = sha256_file(tmp)
    write_json_atomic(paths.meta, meta, force=force)
    return paths


def _json_probe(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, (np.generic, np.ndarray, Path)):
        return str(obj)
    raise TypeError(f"checkpoint metadata holds a non-JSON value of type {type(obj).__name__}")


# ---------------------------------------------------------------------------------------------------- load
def load_checkpoint_meta(path: str | os.PathLike) -> tuple[dict[str, Any], CheckpointPaths]:
    """Read and validate ``<stem>.json`` only (cheap: no torch, no weights)."""
    paths = checkpoint_paths(path)
    if not paths.meta.is_file():
        if paths.weights.is_file():
            raise InputError(
                f"checkpoint metadata {paths.meta} is missing beside {paths.weights.name}: expected "
                f"<stem>.json and <stem>.safetensors together; fix: copy the .json with the weights"
            )
        raise InputError(
            f"checkpoint {paths.stem} not found: expected {paths.meta.name} and {paths.weights.name} in "
            f"{paths.meta.parent}; fix: check the path"
        )
    try:
        meta = json.loads(paths.meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read checkpoint metadata {paths.meta}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise InputError(
            f"checkpoint metadata {paths.meta} is not valid JSON (line {exc.lineno}): the file is corrupt; "
            f"fix: re-export or re-train the checkpoint"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InputError(
            f"{paths.meta} is not an emorph checkpoint: expected format {FORMAT!r}, got {got!r}; "
            f"fix: pass a checkpoint written by 'emorph train'"
        )
    if not isinstance(meta.get("model"), dict):
        raise InputError(f"checkpoint metadata {paths.meta} has no 'model' config: the file is corrupt")
    return meta, paths


def _expected_config_dict(expect_model: Any, ckpt_cfg: Any) -> dict[str, Any] | None:
    """Config dict to compare against, or None when only the variant name is checked."""
    if expect_model is None:
        return None
    if isinstance(expect_model, str):
        return None
    if isinstance(expect_model, dict):
        from emorph_deploy.models import ModelConfig

        return ModelConfig.from_dict(expect_model).to_dict()
    return _to_dict(expect_model)


def _with_defaults(meta_model: dict[str, Any]) -> dict[str, Any]:
    """The stored config with fields added since it was written at their defaults (which keep the old
    behaviour, e.g. ``full_res_width`` 0); an invalid config is returned as is for the comparison."""
    from emorph_deploy.models import ModelConfig

    try:
        return ModelConfig.from_dict(meta_model).to_dict()
    except (InputError, TypeError):
        return meta_model


def check_model_matches(meta_model: dict[str, Any], expect_model: Any, where: str = "checkpoint") -> None:
    """Raise ``ConfigMismatchError`` (one line) when ``expect_model`` (name, ModelConfig, dict) differs."""
    if expect_model is None:
        return
    if isinstance(expect_model, str):
        name = meta_model.get("name")
        if name != expect_model:
            raise ConfigMismatchError(
                f"{where} holds model {name!r} but {expect_model!r} was requested; fix: pass --model {name} "
                f"or a checkpoint of {expect_model}"
            )
        return
    want = _expected_config_dict(expect_model, meta_model)
    assert want is not None
    meta_model = _with_defaults(meta_model)
    keys = sorted((set(want) | set(meta_model)) - TRAINING_ONLY_FIELDS)
    diffs = [k for k in keys if want.get(k) != meta_model.get(k)]
    if diffs:
        shown = ", ".join(f"{k}: {meta_model.get(k)!r} vs requested {want.get(k)!r}" for k in diffs[:4])
        more = f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise ConfigMismatchError(
            f"{where} model config does not match the requested model ({shown}{more}); fix: request the "
            f"checkpoint's config or use a matching checkpoint"
        )


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    expect_model: Any = None,
    verify_hash: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Load ``(model, meta)`` from a checkpoint (``.safetensors``, ``.json``, stem or run folder).

    The model is built from the stored ``ModelConfig`` with ``create_model`` and returned in eval mode on
    ``map_location``. ``expect_model`` (variant name, ``ModelConfig`` or dict) is compared to the stored
    config.
    Missing/corrupt files and weights that do not fit the config raise ``InputError`` /
    ``ConfigMismatchError`` with one line.
    """
    meta, paths = load_checkpoint_meta(path)
    check_model_matches(meta["model"], expect_model, where=f"checkpoint {paths.meta.name}")

    from emorph_deploy.models import ModelConfig, create_model

    try:
        config = ModelConfig.from_dict(meta["model"])
    except InputError as exc:
        raise ConfigMismatchError(f"checkpoint {paths.meta} has an invalid model config: {exc}") from exc
    except TypeError as exc:
        raise ConfigMismatchError(f"checkpoint {paths.meta} has an invalid model config: {exc}") from exc

    state = _read_weights(paths, meta, map_location, verify_hash)
    model = create_model(config)
    _load_state_strict(model, state, paths)
    model.to(map_location)
    model.eval()
    meta = dict(meta)
    meta["path"] = str(paths.stem)
    return model, meta


def _read_weights(
    paths: CheckpointPaths, meta: dict[str, Any], map_location: Any, verify_hash: bool
) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not paths.weights.is_file():
        raise InputError(
            f"checkpoint weights {paths.weights} not found beside {paths.meta.name}; fix: copy the "
            f".safetensors file with its .json"
        )
    expected = meta.get("sha256_weights")
    if verify_hash and expected:
        got = sha256_file(paths.weights)
        if got != expected:
            raise InputError(
                f"checkpoint weights {paths.weights} are corrupt or were replaced: sha256 {got[:12]}… does "
                f"not match {expected[:12]}… recorded in {paths.meta.name}; fix: re-copy or re-train it"
            )
    device = str(map_location) if not isinstance(map_location, str) else map_location
    try:
        return load_file(str(paths.weights), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"cannot read checkpoint weights {paths.weights}: expected a safetensors file, got an error "
            f"({first}); fix: re-copy or re-train the checkpoint"
        ) from exc


def _compare_state(
    own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, wrong_shape)`` tensor names of ``state`` against the model's ``own``."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    return missing, unexpected, shape


def _load_state_strict(model: Any, state: dict[str, torch.Tensor], paths: CheckpointPaths) -> None:
    own = model.state_dict()
    missing, unexpected, shape = _compare_state(own, state)
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shape:
            k = shape[0]
            parts.append(
                f"{len(shape)} with wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})"
            )
        raise ConfigMismatchError(
            f"checkpoint weights {paths.weights.name} do not match its model config: {'; '.join(parts)}; "
            f"fix: keep the .json and .safetensors of the same checkpoint together"
        )
    model.load_state_dict(state, strict=True)


def load_weights_partial(model: Any, path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Warm-start ``model`` in place from the checkpoint at ``path``; returns ``(loaded, kept)`` tensor names.

    Every checkpoint tensor must exist in ``model`` with the same shape (a different architecture is a
    ``ConfigMismatchError``); model tensors the checkpoint lacks (layers added since) keep their
    initialisation and are listed in ``kept``.
    """
    meta, paths = load_checkpoint_meta(path)
    state = _read_weights(paths, meta, "cpu", verify_hash=True)
    own = model.state_dict()
    kept, unexpected, shape = _compare_state(own, state)
    if unexpected or shape:
        what = (
            f"{len(unexpected)} tensor(s) the model lacks (e.g. {unexpected[0]})"
            if unexpected
            else f"{len(shape)} of another shape (e.g. {shape[0]}: {tuple(state[shape[0]].shape)} vs "
            f"{tuple(own[shape[0]].shape)})"
        )
        raise ConfigMismatchError(
            f"--init-from {paths.meta}: expected weights of the same architecture up to added layers; got "
            f"{what}; fix: warm-start from a checkpoint of the same variant, widths and grid"
        )
    model.load_state_dict(state, strict=False)
    return sorted(state), kept


# --------------------------------------------------------------------------------------- training state
def save_training_state(path: str | os.PathLike, state: dict[str, Any], force: bool = False) -> Path:
    """Write ``<stem>.state.pt`` atomically. ``state`` must hold only tensors and plain Python containers."""
    import torch

    paths = checkpoint_paths(path)
    payload = {"format": STATE_FORMAT, **state}
    with atomic_path(paths.state, force=force) as tmp:
        torch.save(payload, tmp)
    return paths.state


def load_training_state(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, Any]:
    """Read ``<stem>.state.pt`` with ``torch.load(weights_only=True)`` (no arbitrary unpickling)."""
    import pickle

    import torch

    paths = checkpoint_paths(path)
    if not paths.state.is_file():
        raise InputError(
            f"training state {paths.state} not found: expected it beside {paths.weights.name} to resume; "
            f"fix: resume from a run folder written by 'emorph train' (or start without --resume)"
        )
    try:
        state = torch.load(paths.state, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"cannot read training state {paths.state}: {first}; fix: resume from another run"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise InputError(
            f"{paths.state} is not an emorph training state: expected format {STATE_FORMAT!r}; "
            f"fix: resume from a run folder written by 'emorph train'"
        )
    return state
