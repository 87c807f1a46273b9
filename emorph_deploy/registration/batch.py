"""Batch registration from a CSV of pairs:
``fixed,moving[,moving_labels,fixed_labels,fixed_mask,moving_mask][,id]``.

The CSV is read by :func:`emorph_deploy.data.pairs.read_pairs` (relative paths are resolved against the CSV's
folder). Each pair goes to ``<out>/<id>/`` (``id`` column, or ``<row number>_<moving stem>``). A failing
pair is recorded with its one-line error and the rest continue; ``<out>/summary.csv`` lists every pair's
status (ok, failed, or skipped by ``resume``), NCC before/after, J ≤ 0, SDlogJ and seconds;
``<out>/batch.json`` the settings it ran with (:mod:`emorph_deploy.registration.batch_manifest`), which
``resume`` must match.

:func:`run_batch` registers in this process; :mod:`emorph_deploy.registration.cluster` runs the same
:func:`register_pair` as Dask tasks.
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emorph_deploy.data.pairs import nifti_stem
from emorph_deploy.data.pairs import read_pairs as read_pairs_csv
from emorph_deploy.errors import EmorphError, InputError
from emorph_deploy.registration.defaults import DEFAULTS

__all__ = [
    "Pair",
    "PairOptions",
    "completed_row",
    "failed_row",
    "format_summary",
    "input_record",
    "read_pairs",
    "register_pair",
    "run_batch",
]

SUMMARY_FIELDS = (
    "id",
    "status",
    "fixed",
    "moving",
    "ncc_before",
    "ncc_after",
    "frac_jac_nonpos",
    "sdlogj",
    "seconds",
    "warning",
    "error",
)


@dataclass(frozen=True)
class Pair:
    id: str
    fixed: Path
    moving: Path
    moving_labels: Path | None = None
    fixed_labels: Path | None = None  # QC Dice (with moving_labels)
    fixed_mask: Path | None = None
    moving_mask: Path | None = None


#: the optional files of a pair besides ``moving_labels`` (Registrar.register keywords of the same names)
PAIR_EXTRAS = ("fixed_labels", "fixed_mask", "moving_mask")


def read_pairs(csv_path: str | Path) -> list[Pair]:
    """The pairs of a pairs CSV (:mod:`emorph_deploy.data.pairs`: ``fixed,moving[,moving_labels][,id]``), each
    with a unique folder name; InputError on a malformed file."""
    path = Path(csv_path)
    pairs: list[Pair] = []
    seen: set[str] = set()
    for row in read_pairs_csv(path):
        pid = re.sub(r"[^A-Za-z0-9._-]+", "_", row.id or f"{row.index:04d}_{nifti_stem(row.moving)}")
        if pid in seen:
            raise InputError(
                f"pairs CSV {path} line {row.line}: expected a unique id, got duplicate {pid!r}; "
                "fix: make the id column unique"
            )
        seen.add(pid)
        pairs.append(
            Pair(pid, row.fixed, row.moving, row.moving_labels, *(getattr(row, k) for k in PAIR_EXTRAS))
        )
    return pairs


@dataclass(frozen=True)
class PairOptions:
    """How each pair of a batch is registered and written (the same for the in-process and the Dask paths).

    Defaults from :data:`~emorph_deploy.registration.defaults.DEFAULTS`. ``affine`` None = the registrar's
    setting; ``refine`` None (the defaults), steps or a :class:`~emorph_deploy.refine.RefineConfig`;
    ``resume``: a pair whose complete output set validates
    (:func:`completed_row`) is skipped, any other pair is registered again, replacing what an interrupted run
    left in its folder.
    """

    force: bool = False
    affine: bool | None = None
    voxel_flow: bool = DEFAULTS.voxel_flow
    qc_png: bool = DEFAULTS.qc_png
    refine: Any = None
    resume: bool = False


def input_record(pair: Pair) -> dict[str, Any]:
    """The identity of a pair's input files (path, size in bytes, modification time in ns), kept in the pair's
    ``qc.json`` as ``inputs`` so that ``--resume`` only keeps outputs made from the same files."""
    rec: dict[str, Any] = {}
    extras = [(k, getattr(pair, k)) for k in PAIR_EXTRAS if getattr(pair, k) is not None]  # only when given
    roles = [("fixed", pair.fixed), ("moving", pair.moving), ("moving_labels", pair.moving_labels), *extras]
    for role, path in roles:
        if path is None:
            rec[role] = None
            continue
        st = Path(path).stat()
        rec[role] = {"path": str(Path(path).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return rec


def failed_row(pair: Pair, error: str, seconds: float = 0.0) -> dict[str, Any]:
    """The summary row of a pair that failed with the one-line ``error``."""
    return {
        "id": pair.id,
        "fixed": str(pair.fixed),
        "moving": str(pair.moving),
        "status": "failed",
        "seconds": seconds,
        "error": error,
    }


def _qc_row(qc: dict[str, Any]) -> dict[str, Any]:
    """The summary columns a pair's ``qc.json`` gives, ``warning`` the CLI's warnings for it (a rejected
    affine, a deformable stage that ended below its start), joined by "; " without their prefix."""
    from emorph_deploy.qc import warnings_of

    warnings = [w.removeprefix("warning: ") for w in warnings_of(qc)]
    row = {k: qc[k] for k in ("ncc_before", "ncc_after", "frac_jac_nonpos", "sdlogj")}
    return {**row, "warning": "; ".join(warnings)}


def register_pair(registrar: Any, pair: Pair, out_dir: str | Path, options: PairOptions) -> dict[str, Any]:
    """Register one pair into ``out_dir/<id>/`` and return its summary row (``status`` ok, skipped or
    failed, with the one-line error); never raises for a failing pair.

    The one per-pair function of :func:`run_batch` and of the Dask tasks
    (:mod:`emorph_deploy.registration.cluster`).
    """
    t0 = time.perf_counter()
    row: dict[str, Any] = {"id": pair.id, "fixed": str(pair.fixed), "moving": str(pair.moving)}
    try:
        done = completed_row(pair, out_dir, options) if options.resume else None
        if done is not None:
            return {**row, **done}
        res = registrar.register(
            pair.fixed,
            pair.moving,
            labels=pair.moving_labels,
            affine=options.affine,
            refine=options.refine,
            **{k: getattr(pair, k) for k in PAIR_EXTRAS},
        )
        res.qc["inputs"] = input_record(pair)
        res.save(
            Path(out_dir) / pair.id,
            force=options.force or options.resume,
            voxel_flow=options.voxel_flow,
            qc_png=options.qc_png,
        )
        row.update(status="ok", error="", **_qc_row(res.qc))
    except EmorphError as exc:
        row.update(status="failed", error=str(exc))
    except Exception as exc:  # one pair must never stop the batch
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    row["seconds"] = time.perf_counter() - t0
    return row


def completed_row(pair: Pair, out_dir: str | Path, options: PairOptions) -> dict[str, Any] | None:
    """The summary row of a pair whose outputs are complete and valid (status ``skipped``, its QC and the
    seconds of the run that wrote it), or None when it must be registered (again).

    Complete and valid: every file the options ask for exists (``warped_labels`` iff the pair has labels,
    ``voxel_flow``, ``qc.png``); ``qc.json`` parses, lists them and records the same input files
    (:func:`input_record`); every NIfTI decodes in full (gzip checksum included) on the fixed grid; ``qc.png``
    ends with its PNG end marker. A file half-written by an interrupted run fails one of these.
    """
    import json

    from emorph_deploy.registration.pipeline import RegistrationQC, output_targets

    folder = Path(out_dir) / pair.id
    targets = output_targets(
        folder, labels=pair.moving_labels is not None, voxel_flow=options.voxel_flow, qc_png=options.qc_png
    )
    if not all(p.is_file() for p in targets.values()):
        return None
    try:
        qc = json.loads(targets["qc_json"].read_text())
        if not isinstance(qc, dict) or qc.get("format") != RegistrationQC.FORMAT:
            return None
        if not set(targets) <= set(qc.get("outputs") or {}) or qc.get("inputs") != input_record(pair):
            return None
        fixed_shape = tuple(qc["fixed_shape"])
        for name, path in targets.items():
            shape = None if name == "inverse_displacement" else fixed_shape  # that one is on the moving grid
            if path.name.endswith(".nii.gz") and not _nifti_readable(path, shape):
                return None
        if "qc_png" in targets and not _png_complete(targets["qc_png"]):
            return None
        times = qc.get("times_s") or {}
        row = {**_qc_row(qc), "seconds": float(times.get("total", 0.0)) + float(times.get("write", 0.0))}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {**row, "status": "skipped", "error": ""}


def _nifti_readable(path: Path, fixed_shape: tuple[int, ...] | None) -> bool:
    """True when ``path`` is a NIfTI (on the fixed grid unless ``fixed_shape`` is None) whose data decode in
    full."""
    import nibabel as nib
    import numpy as np

    try:
        img = nib.load(str(path))
        if fixed_shape is not None and tuple(img.shape[:3]) != fixed_shape:
            return False
        np.asanyarray(img.dataobj)  # reads to the end: a truncated gzip stream raises here
    except Exception:  # any reader error means "not a valid output"
        return False
    return True


def _png_complete(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(b"\x89PNG\r\n\x1a\n") and data.rstrip(b"\0").endswith(b"IEND\xaeB`\x82")


def run_batch(
    registrar: Any,
    pairs: list[Pair],
    out_dir: str | Path,
    *,
    force: bool = False,
    affine: bool | None = None,
    voxel_flow: bool = DEFAULTS.voxel_flow,
    qc_png: bool = DEFAULTS.qc_png,
    progress: bool = True,
    refine: Any = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Register every pair into ``out_dir/<id>/`` in this process; never stops on a failing pair. Returns the
    summary rows (also written to ``out_dir/summary.csv``). ``resume``: see :class:`PairOptions`."""
    options = PairOptions(force, affine, voxel_flow, qc_png, refine, resume)
    summary_path = prepare_summary(out_dir, options)
    from emorph_deploy.registration.batch_manifest import batch_settings, record_batch_settings

    record_batch_settings(out_dir, batch_settings(registrar, options), options)
    rows: list[dict[str, Any]] = []
    with progress_bar(len(pairs), progress) as tick:
        for pair in pairs:
            rows.append(register_pair(registrar, pair, out_dir, options))
            tick(rows[-1])
    write_summary(summary_path, rows)
    return rows


def prepare_summary(out_dir: str | Path, options: PairOptions) -> Path:
    """``out_dir/summary.csv``, checked before any work: OutputExistsError when it exists, unless ``force``
    or ``resume`` (a resumed run rewrites it with every pair)."""
    from emorph_deploy.fileio import check_writable

    return check_writable(Path(out_dir) / "summary.csv", force=options.force or options.resume)


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool = True) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar over ``total`` pairs; yields ``tick(row)``, called once per finished pair."""
    if not enabled:
        yield lambda row: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="register", unit="pair", dynamic_ncols=True)

    def tick(row: dict[str, Any]) -> None:
        bar.set_postfix_str(f"{row['id']}: {row['status']}")
        bar.update(1)

    try:
        yield tick
    finally:
        bar.close()


def write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """``summary.csv``: one row per pair (:data:`SUMMARY_FIELDS`), written atomically."""
    from emorph_deploy.fileio import write_bytes_atomic

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    write_bytes_atomic(path, buf.getvalue().encode(), force=True)


def format_summary(rows: list[dict[str, Any]]) -> str:
    """Plain-text summary table (one line per pair, then totals)."""

    def f(v: Any, spec: str) -> str:
        width = int(re.match(r"\d*", spec).group() or 0)
        return format(v, spec) if isinstance(v, float) else "-".rjust(width)

    header = (
        f"{'id':<28} {'status':<7} {'NCC before':>10} {'NCC after':>10} {'J<=0 %':>8} {'SDlogJ':>7} {'s':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        frac = r.get("frac_jac_nonpos")
        lines.append(
            f"{r['id'][:28]:<28} {r['status']:<7} {f(r.get('ncc_before'), '10.4f')} "
            f"{f(r.get('ncc_after'), '10.4f')} {f(100 * frac if isinstance(frac, float) else None, '8.3f')} "
            f"{f(r.get('sdlogj'), '7.3f')} {f(r.get('seconds'), '6.2f')}"
        )
        if r["status"] != "ok":
            lines.append(f"    error: {r.get('error', '')}")
        elif r.get("warning"):
            lines.append(f"    warning: {r['warning']}")
    ok = sum(r["status"] == "ok" for r in rows)
    skipped = sum(r["status"] == "skipped" for r in rows)
    failed = len(rows) - ok - skipped
    tail = f", {skipped} skipped (complete outputs kept)" if skipped else ""
    lines.append(f"{ok}/{len(rows)} pairs registered, {failed} failed{tail}")
    return "\n".join(lines)
