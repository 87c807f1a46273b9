"""Batch registration from a CSV of pairs: ``fixed,moving[,moving_labels][,id]``.

The CSV is read by :func:`emorph_deploy.data.pairs.read_pairs` (relative paths are resolved against the CSV's
folder). Each pair goes to ``<out>/<id>/`` (``id`` column, or ``<row number>_<moving stem>``). A failing
pair is recorded with its one-line error and the rest continue; ``<out>/summary.csv`` lists every pair's
status, NCC before/after, J ≤ 0, SDlogJ and time.
"""

from __future__ import annotations

import csv
import io
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emorph_deploy.data.pairs import nifti_stem
from emorph_deploy.data.pairs import read_pairs as read_pairs_csv
from emorph_deploy.errors import EmorphError, InputError

__all__ = ["Pair", "format_summary", "read_pairs", "run_batch"]

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
    "error",
)


@dataclass(frozen=True)
class Pair:
    id: str
    fixed: Path
    moving: Path
    moving_labels: Path | None = None


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
        pairs.append(Pair(pid, row.fixed, row.moving, row.moving_labels))
    return pairs


def run_batch(
    registrar: Any,
    pairs: list[Pair],
    out_dir: str | Path,
    *,
    force: bool = False,
    affine: bool | None = None,
    voxel_flow: bool = False,
    qc_png: bool = True,
    progress: bool = True,
    refine: Any = 0,
) -> list[dict[str, Any]]:
    """Register every pair into ``out_dir/<id>/``; never stops on a failing pair. Returns the summary rows."""
    from emorph_deploy.fileio import check_writable, write_bytes_atomic

    out = Path(out_dir)
    summary_path = out / "summary.csv"
    check_writable(summary_path, force=force)  # OutputExistsError without --force
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), desc="register", unit="pair", dynamic_ncols=True)
    try:
        for pair in pairs:
            t0 = time.perf_counter()
            row: dict[str, Any] = {"id": pair.id, "fixed": str(pair.fixed), "moving": str(pair.moving)}
            try:
                res = registrar.register(
                    pair.fixed, pair.moving, labels=pair.moving_labels, affine=affine, refine=refine
                )
                res.save(out / pair.id, force=force, voxel_flow=voxel_flow, qc_png=qc_png)
                q = res.qc
                row.update(
                    status="ok",
                    ncc_before=q["ncc_before"],
                    ncc_after=q["ncc_after"],
                    frac_jac_nonpos=q["frac_jac_nonpos"],
                    sdlogj=q["sdlogj"],
                    error="",
                )
            except EmorphError as exc:
                row.update(status="failed", error=str(exc))
            except Exception as exc:  # one pair must never stop the batch
                row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            if bar is not None:
                bar.set_postfix_str(f"{pair.id}: {row['status']}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    write_bytes_atomic(summary_path, buf.getvalue().encode(), force=True)
    return rows


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
    ok = sum(r["status"] == "ok" for r in rows)
    lines.append(f"{ok}/{len(rows)} pairs registered, {len(rows) - ok} failed")
    return "\n".join(lines)
