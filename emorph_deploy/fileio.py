"""Atomic writing: a file is written to a temporary file in the same folder, then renamed; a set of files
(:func:`atomic_dir`) is written into a temporary sibling folder, then swapped in as a whole.

Nothing partial is ever left at the destination; an existing file is only replaced with ``force=True``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from emorph_deploy.errors import ConfigMismatchError, InputError, OutputExistsError


def check_writable(path: str | os.PathLike, force: bool = False, *, create: bool = False) -> Path:
    """Validate an output file path before any work: not a folder, no overwrite without force, its folder
    writable (or creatable: it is created when the file is written, so a failed run leaves no empty folder;
    ``create=True`` creates it now)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(
            f"output {path}: expected a file path, got an existing folder; fix: pass a file name, e.g. "
            f"{path / 'report.json'}"
        )
    if path.exists() and not force:
        raise OutputExistsError(f"output {path} already exists: pass --force to overwrite it")
    check_dir_writable(path.parent)
    if create:
        _make_dirs(path.parent)
    return path


def _make_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the created ones, outermost first (InputError)."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {folder}: {exc.strerror or exc}") from exc
    return missing


def _remove_empty_dirs(created: list[Path]) -> None:
    for p in reversed(created):
        with contextlib.suppress(OSError):
            p.rmdir()  # only if empty


def check_dir_writable(folder: str | os.PathLike) -> Path:
    """Before any work: ``folder`` (or, while it does not exist, its nearest existing parent, where it will
    be created) must be writable; InputError otherwise."""
    folder = Path(folder)
    probe = folder.absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(
            f"output folder {folder}: expected a writable folder, got {probe} "
            f"{'not writable' if probe.is_dir() else 'not a folder'}; fix: choose another --out"
        )
    return folder


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
    created = _make_dirs(path.parent)
    suffix = "".join(path.suffixes)
    done = False
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            os.chmod(tmp_path, 0o666 & ~_process_umask())  # mkstemp creates 0600: the usual permissions
            yield tmp_path
            if path.exists() and not force:  # appeared while we were working
                raise OutputExistsError(f"output {path} already exists: pass --force to overwrite it")
            os.replace(tmp_path, path)
            done = True
        finally:
            if tmp_path.exists():
                tmp_path.unlink()
    finally:
        if not done:
            _remove_empty_dirs(created)


def foreign_entries(folder: Path, owned: Collection[str]) -> list[str]:
    """The entries of an existing ``folder`` that are not files named in ``owned`` (what a tool writes)."""
    if not folder.is_dir():
        return []
    return sorted(e.name for e in folder.iterdir() if e.name not in owned or not e.is_file())


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, owned: Collection[str], force: bool = False) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``out``; the files written into it become the outputs in ``out``
    as one set, or (on any error, ``KeyboardInterrupt`` and ``SystemExit`` included) none of them do.

    ``owned`` names every file the command may write into ``out``. Without ``force`` any of them already in
    ``out`` is an :class:`OutputExistsError` (raised on entry, before any work). With ``force`` the earlier
    set is replaced as a whole: files of two runs never mix. When ``out`` holds nothing else it is swapped
    in one piece (renamed aside, the new folder renamed in, the old one deleted); a folder shared with
    other files gets the new files renamed in one by one, then the stale outputs deleted.
    """
    out = Path(out)
    _check_replaceable(out, owned, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise InputError(
            f"output: expected a writable folder for {out}, got {exc.strerror or exc}; fix: choose another "
            "--out or check its permissions"
        ) from exc
    try:
        os.chmod(tmp, 0o777 & ~_process_umask())  # mkdtemp creates 0700
        yield tmp
        _check_replaceable(out, owned, force)  # may have changed while we were working
        _swap_in(tmp, out, owned)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(out: Path, owned: Collection[str], force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"output: expected a folder, got the file {out}; fix: choose another --out")
    if not force:
        for name in owned:
            if (out / name).exists():
                raise OutputExistsError(f"output {out / name} already exists: pass --force to overwrite it")


def _swap_in(tmp: Path, out: Path, owned: Collection[str]) -> None:
    """Make the files of ``tmp`` the output set of ``out`` (see :func:`atomic_dir`)."""
    if not out.exists() or not any(out.iterdir()):
        os.replace(tmp, out)  # replaces an empty folder too
        return
    if not foreign_entries(out, owned):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rename(out, old / out.name)  # the window without ``out`` is two renames long
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old / out.name, out)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    new = {e.name for e in tmp.iterdir()}
    for name in sorted(new):
        os.replace(tmp / name, out / name)
    for name in owned:
        if name not in new and (out / name).is_file():
            (out / name).unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes, force: bool = False) -> Path:
    with atomic_path(path, force=force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, force: bool = False) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    return write_bytes_atomic(path, text.encode(), force=force)


#: A path value's place in a manifest: its keys from the top, e.g. ``("onnx", "source")``.
PathKey = tuple[str, ...]


#: Where a manifest was written (absolute folder): the fallback for its relative paths when the manifest
#: alone was moved away from the files it names.
WRITTEN_IN_KEY = "written_in"


def write_manifest_atomic(
    path: str | os.PathLike, meta: dict[str, Any], path_keys: Collection[PathKey], force: bool = False
) -> Path:
    """:func:`write_json_atomic` of a manifest whose path values (at ``path_keys``) are stored relative to the
    manifest's own folder, so the folder tree can be moved, plus :data:`WRITTEN_IN_KEY`; ``meta`` itself is
    not changed."""
    out = manifest_paths(meta, path_keys, Path(path), relative=True)
    out[WRITTEN_IN_KEY] = str(Path(path).resolve().parent)
    return write_json_atomic(path, out, force=force)


def manifest_paths(
    meta: dict[str, Any], path_keys: Collection[PathKey], manifest: str | os.PathLike, *, relative: bool
) -> dict[str, Any]:
    """A copy of ``meta`` with the path values at ``path_keys`` made relative to the folder of ``manifest``
    (POSIX separators; a relative value is taken as relative to the working directory, as a writer got it;
    kept absolute when no relative path exists, e.g. another drive) or, ``relative=False``, absolute again:
    relative ones joined to that folder, or to the folder the manifest was written in when only that path
    exists (the manifest alone was moved); absolute ones, as older manifests store, kept."""
    folder = Path(manifest).absolute().parent
    written_in = meta.get(WRITTEN_IN_KEY)
    out = dict(meta)
    for keys in path_keys:
        node = out
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                break
            node[key] = node = dict(node[key])  # copy each nested level before changing it
        else:
            value = node.get(keys[-1])
            if not isinstance(value, str | os.PathLike) or not str(value):
                continue
            if relative:
                node[keys[-1]] = _relative_to(Path(value), folder)
                continue
            here = os.path.normpath(folder / value)
            there = os.path.normpath(Path(written_in) / value) if written_in else here
            node[keys[-1]] = there if not os.path.exists(here) and os.path.exists(there) else here
    return out


def _relative_to(path: Path, folder: Path) -> str:
    """``path`` (absolute, or relative to the working directory as a writer got it) from ``folder``."""
    path, folder = path.resolve(), folder.resolve()
    try:
        return Path(os.path.relpath(path, folder)).as_posix()
    except ValueError:  # another drive (Windows): only an absolute path reaches it
        return str(path)


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
    path: str | os.PathLike,
    *,
    kind: str,
    fmt: str,
    required: tuple[str, ...] | list[str],
    fix: str,
    path_keys: Collection[PathKey] = (),
) -> dict[str, Any]:
    """Read a JSON manifest and validate its ``format`` and required keys; the path values at ``path_keys``
    come back absolute (stored relative to the manifest's folder, or absolute by older versions).

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
    return manifest_paths(meta, path_keys, path, relative=False) if path_keys else meta
