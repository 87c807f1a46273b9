"""The pairs CSV every command reads (``register --pairs``, ``check --pairs``, ``calibrate --pairs``, and the
``--data`` CSVs of ``train``/``evaluate``), and the NIfTI file-name stem.

Column vocabulary (header names are matched case-insensitively; cells are stripped):

==================  =================================  ============================================
column              also accepted as                   meaning
==================  =================================  ============================================
``fixed``                                              fixed image (NIfTI, MGZ, NRRD, MHA, DICOM), required
``moving``                                             moving image (same formats), required
``fixed_labels``    ``fixed_label``                    fixed label map, optional
``moving_labels``   ``moving_label``                   moving label map, optional
``fixed_mask``                                         mask on the fixed grid, optional
``moving_mask``                                        mask on the moving grid, optional
``id``                                                 name of the pair (``register``: output folder)
==================  =================================  ============================================

Columns may come in any order; other columns are ignored. Each command reads the columns it uses (``register``
all of them, ``fixed_labels`` for QC Dice; ``calibrate`` reads only the images; ``check`` takes both label
columns or neither, and no masks). The file is UTF-8 with or without a byte-order mark; empty lines and lines
starting with ``#`` are skipped, and so are rows whose cells are all empty. An empty optional cell means
"none". Paths may start with ``~``; relative paths are resolved against the CSV's folder. A calibration list
may also have no header at all: then every line is ``moving,fixed``. The subject lists of
``train``/``evaluate`` (``image[,label]``, :mod:`emorph_deploy.data.datasets`) follow the same rules through
:func:`read_table`.

Errors are one :class:`~emorph_deploy.errors.InputError` line naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from emorph_deploy.errors import InputError

__all__ = [
    "PAIR_COLUMNS",
    "PairRow",
    "Table",
    "TableRow",
    "nifti_stem",
    "pairs_from_table",
    "read_pairs",
    "read_table",
    "require_cells",
    "require_columns",
    "resolve_path",
]

#: Canonical pair column -> the other spellings accepted for it.
PAIR_COLUMNS: dict[str, tuple[str, ...]] = {
    "fixed": (),
    "moving": (),
    "fixed_labels": ("fixed_label",),
    "moving_labels": ("moving_label",),
    "fixed_mask": (),
    "moving_mask": (),
    "id": (),
}
_REQUIRED_PAIR = ("fixed", "moving")
_HEADER_HINT = "fixed,moving[,fixed_labels,moving_labels,fixed_mask,moving_mask,id]"


@dataclass(frozen=True)
class PairRow:
    """One pair of a pairs CSV: absolute-or-CSV-relative paths resolved; ``line`` is the file line (header =
    1) and ``index`` the 1-based data row, for messages and default names."""

    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    id: str | None = None
    line: int = 0
    index: int = 0
    fixed_mask: Path | None = None
    moving_mask: Path | None = None


@dataclass(frozen=True)
class TableRow:
    """One data row of :func:`read_table`: canonical column -> stripped cell (``""`` when empty)."""

    cells: dict[str, str]
    line: int
    index: int


@dataclass(frozen=True)
class Table:
    """A CSV read by :func:`read_table`: the canonical columns present, the header's line (0 when the file
    has none) and the data rows."""

    path: Path
    columns: frozenset[str]
    header_line: int
    rows: list[TableRow]


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without ``.nii.gz`` / ``.nii`` (or any other last suffix): ``sub-01_T1w.nii.gz`` ->
    ``sub-01_T1w``."""
    p = Path(path)
    name = p.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return p.stem


def resolve_path(cell: str, csv_path: Path) -> Path:
    """A path cell: ``~`` expanded, relative paths taken from the CSV's folder."""
    p = Path(cell).expanduser()
    return p if p.is_absolute() else csv_path.parent / p


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InputError(
            f"CSV {path}: expected an existing CSV file, got a missing path; fix: check the path"
        )
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the header
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(
            f"CSV {path}: expected UTF-8 text, got {type(exc).__name__} ({exc}); fix: save it as a UTF-8 CSV"
        ) from exc


def _rows(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of every CSV record; empty lines and ``#`` comment lines are skipped."""
    where = [0]

    def lines() -> Iterator[str]:
        for n, line in enumerate(io.StringIO(text, newline=""), start=1):
            where[0] = n
            if not line.lstrip().startswith("#"):
                yield line

    reader = csv.reader(lines())
    try:
        for row in reader:
            if row:  # csv yields [] for an empty line
                yield where[0], row
    except csv.Error as exc:
        raise InputError(
            f"CSV {path} line {where[0]}: expected CSV text, got {exc}; fix: check the quoting"
        ) from exc


def _header(
    path: Path, line: int, cells: Sequence[str], vocabulary: Mapping[str, Sequence[str]]
) -> list[str | None]:
    """Canonical column name per header cell (None for unknown columns); InputError on a repeated column."""
    alias = {name: canon for canon, names in vocabulary.items() for name in (canon, *names)}
    cols: list[str | None] = [alias.get(c.strip().lower()) for c in cells]
    for canon in vocabulary:
        if cols.count(canon) > 1:
            given = [c.strip() for c, k in zip(cells, cols, strict=True) if k == canon]
            raise InputError(
                f"CSV {path} line {line}: expected column '{canon}' once, got {given}; fix: keep one of them"
            )
    return cols


def read_table(
    path: str | os.PathLike,
    vocabulary: Mapping[str, Sequence[str]],
    *,
    headerless: Sequence[str] | None = None,
) -> Table:
    """A CSV whose header uses ``vocabulary`` (canonical name -> aliases); rows whose cells are all empty
    are skipped.

    ``headerless``: the columns of a file whose first line names none of the vocabulary's columns; without it
    such a file is an error.
    """
    path = Path(path)
    records = list(_rows(path, _read_text(path)))
    if not records:
        raise InputError(
            f"CSV {path}: expected a header and at least one row, got an empty file; fix: list the pairs"
        )
    header_line, header = records[0]
    cols = _header(path, header_line, header, vocabulary)
    if any(cols):
        first = 1
    elif headerless is not None:
        cols, first, header_line = list(headerless), 0, 0
    else:
        raise InputError(
            f"CSV {path} line {header_line}: expected a header naming some of the columns "
            f"{','.join(vocabulary)}, got {[c.strip() for c in header]}; fix: add the header line"
        )
    out: list[TableRow] = []
    for index, (n, row) in enumerate(records[first:], start=1):
        filled = sum(bool(c.strip()) for c in row)
        if first == 0 and filled > len(cols):
            raise InputError(
                f"CSV {path} line {n}: expected {len(cols)} columns {','.join(cols)}, got {filled}; "
                "fix: one pair per line, or add a header line"
            )
        if filled:
            cells = {k: v.strip() for k, v in zip(cols, row, strict=False) if k is not None}
            out.append(TableRow(cells, n, index))
    return Table(path, frozenset(c for c in cols if c is not None), header_line, out)


def require_columns(table: Table, columns: Sequence[str], hint: str) -> None:
    """InputError naming the header line when one of ``columns`` is absent from ``table``."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(
            f"CSV {table.path} line {table.header_line}: expected columns {hint}, got "
            f"{sorted(table.columns)} (no {' or '.join(missing)}); fix: name them in the header line"
        )


def require_cells(path: Path, row: TableRow, columns: Sequence[str]) -> None:
    """InputError naming the line when one of ``columns`` is empty in ``row``."""
    for col in columns:
        if not row.cells.get(col):
            raise InputError(
                f"CSV {path} line {row.line}: expected a path in column '{col}', got an empty cell; "
                "fix: fill it in or delete the line"
            )


def _pair(path: Path, row: TableRow) -> PairRow:
    require_cells(path, row, _REQUIRED_PAIR)
    c = row.cells
    optional = ("fixed_labels", "moving_labels", "fixed_mask", "moving_mask")
    paths = {col: resolve_path(c[col], path) if c.get(col) else None for col in optional}
    return PairRow(
        fixed=resolve_path(c["fixed"], path),
        moving=resolve_path(c["moving"], path),
        id=c.get("id") or None,
        line=row.line,
        index=row.index,
        **paths,
    )


def read_pairs(path: str | os.PathLike, *, headerless: Sequence[str] | None = None) -> list[PairRow]:
    """The pairs of a pairs CSV (vocabulary in the module docstring), paths resolved against the CSV's folder.

    ``headerless``: columns of a file without a header (``("moving", "fixed")`` for calibration lists).
    InputError (one line: file, line, fix) on a missing file, a header without ``fixed``/``moving``, an empty
    required cell or no pairs.
    """
    return pairs_from_table(read_table(path, PAIR_COLUMNS, headerless=headerless))


def pairs_from_table(table: Table) -> list[PairRow]:
    """The pairs of a table read with (at least) :data:`PAIR_COLUMNS`; errors as :func:`read_pairs`."""
    require_columns(table, _REQUIRED_PAIR, _HEADER_HINT)
    pairs = [_pair(table.path, row) for row in table.rows]
    if not pairs:
        raise InputError(
            f"pairs CSV {table.path}: expected at least one pair, got none; fix: add a line per pair"
        )
    return pairs
