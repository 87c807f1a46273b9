"""``<out>/batch.json``: the settings a batch folder's pairs are registered with, so that ``--resume`` never
mixes pairs registered with different settings in one folder.

The first run of a batch writes it before any pair runs (:func:`record_batch_settings`); a resumed run
compares its own settings (:func:`batch_settings`) with it and refuses, in one line naming what changed,
when they differ. Used by the in-process batch and the Dask path alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emorph_deploy.errors import InputError, OutputExistsError

if TYPE_CHECKING:
    from emorph_deploy.registration.batch import PairOptions

__all__ = ["BATCH_FORMAT", "BATCH_MANIFEST", "batch_settings", "record_batch_settings"]

BATCH_MANIFEST = "batch.json"
BATCH_FORMAT = "emorph-batch/1"
#: PairOptions fields that say how to run, not what a pair's outputs are
_RUN_FIELDS = ("force", "resume")


def batch_settings(registrar: Any, options: PairOptions) -> dict[str, Any]:
    """The settings every pair of a batch folder is registered with, as kept in its ``batch.json``: the model
    artifact (path, and sha256 of it with its same-stem manifest/weights files), backend and precision the
    registrar runs, then every output-affecting :class:`PairOptions` field (``affine`` resolved against the
    registrar, ``refine`` as a full config) and the registrar's ``match_contrast`` and ``passes``."""
    import dataclasses

    from emorph_deploy.refine import RefineConfig

    artifact = getattr(registrar.runner, "artifact", None)
    artifact = Path(artifact).resolve() if artifact is not None else None
    fields = {
        f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name not in _RUN_FIELDS
    }
    fields["affine"] = bool(registrar.affine if options.affine is None else options.affine)
    fields["match_contrast"] = bool(registrar.match_contrast)
    fields["passes"] = int(registrar.passes)
    fields["refine"] = RefineConfig.coerce(options.refine).to_dict()
    settings = {
        "artifact": str(artifact) if artifact is not None else None,
        "artifact_sha256": _artifact_sha256(artifact) if artifact is not None else None,
        "backend": str(registrar.backend),
        "precision": str(registrar.precision),
        **fields,
    }
    return json.loads(json.dumps(settings, default=str))  # as it reads back from batch.json


def _artifact_sha256(artifact: Path) -> str:
    """sha256 over the artifact and its same-stem manifest/weights files (``.json``, ``.safetensors``,
    ``.bin``): a checkpoint's weights or an IR's ``.bin`` change without its named file changing."""
    import hashlib

    from emorph_deploy.fileio import sha256_file

    files = [artifact] if artifact.is_file() else []
    files += [artifact.with_suffix(s) for s in (".json", ".safetensors", ".bin")]
    h = hashlib.sha256()
    for f in dict.fromkeys(files):
        if f.is_file():
            h.update(f"{f.suffix}:{sha256_file(f)}\n".encode())  # a renamed copy is the same model
    return h.hexdigest()


def record_batch_settings(out_dir: str | Path, settings: dict[str, Any], options: PairOptions) -> Path:
    """Keep ``settings`` in ``out_dir/batch.json`` before the first pair runs. With ``resume`` an existing
    ``batch.json`` must record the same settings (the model by its sha256, not its path), else InputError
    naming what changed: a resumed folder never mixes pairs registered with different settings. Without
    ``force`` or ``resume`` an existing one (an earlier, perhaps interrupted, run) is refused."""
    from emorph_deploy.fileio import write_json_atomic

    path = Path(out_dir) / BATCH_MANIFEST
    if path.is_file() and not (options.force or options.resume):
        raise OutputExistsError(
            f"--out {out_dir}: expected a folder without an earlier batch, got {path.name} from one; fix: "
            "--resume to continue it, --force to redo every pair, or a new --out"
        )
    if options.resume and path.is_file():
        try:
            recorded = json.loads(path.read_text()).get("settings")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if not isinstance(recorded, dict):
            raise InputError(
                f"--resume: expected the settings of the earlier run in {path}, got an unreadable file; "
                "fix: use a new --out, or --force instead of --resume to redo every pair"
            )
        changed = _changed(recorded, settings)
        if changed:
            raise InputError(
                f"--resume {out_dir}: expected the settings of the run that wrote it, got changed "
                f"{', '.join(changed)}; fix: use a new --out, or --force instead of --resume to redo every "
                "pair"
            )
        return path
    return write_json_atomic(path, {"format": BATCH_FORMAT, "settings": settings}, force=True)


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"key old -> new"`` for each setting that differs (nested ones as ``refine.steps``); the model by
    its hash, shown with its file name."""

    def flat(d: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()} if isinstance(v, dict) else {k: v})
        return out

    a, b = flat(old), flat(new)
    lines = []
    for k in dict.fromkeys([*a, *b]):
        if k == "artifact" or a.get(k) == b.get(k):
            continue
        if k == "artifact_sha256":
            lines.append(
                f"model {Path(str(a.get('artifact'))).name} ({str(a.get(k))[:12]}…) -> "
                f"{Path(str(b.get('artifact'))).name} ({str(b.get(k))[:12]}…)"
            )
        else:
            lines.append(f"{k} {a.get(k)} -> {b.get(k)}")
    return lines
