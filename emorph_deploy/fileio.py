"""Atomic file writing: write to a temporary file in the same folder, then rename.

Nothing partial is ever left at the destination; an existing file is only replaced with ``force=True``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emorph_deploy.errors import ConfigMismatchError, InputError, OutputExistsError


def check_writable(path: str | os.PathLike, force: bool = False) -> Path:
    """Validate an output path before any work: parent creatable and writable, no overwrite without force."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"output {path} already exists: pass --force to overwrite it")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {parent}: {exc.strerror or exc}") from exc
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder {parent} is not writable: choose another folder with --out")
    return path


@functools.cache
def _process_umask() -> int:
    """The process umask, read once: reading it means setting it, which must not race with other threads
    creating files (``Result.save`` writes in threads)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``, on error removed.

    The temporary name keeps the destination's suffixes (``.nii.gz``, ``.onnx``) so writers that
    infer the format from the name still work.
    """
    path = check_writable(path, force=force)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_process_umask())  # mkstemp creates 0600; give the file the usual permissions
    try:
        yield tmp_path
        if path.exists() and not force:  # appeared while we were working
            raise OutputExistsError(f"output {path} already exists: pass --force to overwrite it")
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes, force: bool = False) -> Path:
    with atomic_path(path, force=force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, force: bool = False) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    return write_bytes_atomic(path, text.encode(), force=force)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest_json(
    path: str | os.PathLike, *, kind: str, fmt: str, required: tuple[str, ...] | list[str], fix: str
) -> dict[str, Any]:
    """Read a JSON manifest and validate its ``format`` and required keys.

    Missing/corrupt file or missing keys → :class:`InputError`; another format → :class:`ConfigMismatchError`.
    ``kind`` names the manifest in messages (e.g. "engine manifest"); ``fix`` is the remedy shown.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"{kind} {path} not found: expected the .json written beside the artifact; fix: {fix}"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{kind} {path} is not valid JSON ({exc}); fix: {fix}") from exc
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ConfigMismatchError(f"{kind} {path}: expected format '{fmt}', got '{got}'; fix: {fix}")
    missing = [k for k in required if k not in meta]
    if missing:
        raise InputError(f"{kind} {path} lacks keys {missing}; fix: {fix}")
    return meta
