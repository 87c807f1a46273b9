"""Datasets of NIfTI volumes for training/evaluation.

Sources (:func:`discover`):
- a folder: every ``*.nii``/``*.nii.gz`` (and ``.mgh``/``.mgz``/``.nrrd``/``.nhdr``/``.mha``/``.mhd``); label
  maps are matched by name — ``images/`` + ``labels/`` sub-folders with the same file names, or
  ``<stem>_seg``/``_label``/``_labels``/``_aseg`` next to ``<stem>``;
- a CSV with columns ``image[,label]`` (subjects), or a pairs CSV
  ``fixed,moving[,fixed_labels,moving_labels]`` (explicit pairs; :mod:`emorph_deploy.data.pairs`). Relative
  paths are relative to the CSV's folder; a cell may name a folder holding one DICOM series.

Pairs: ``"inter"`` (inter-subject: each subject is the fixed image once per epoch, its moving partner drawn
deterministically from ``(seed, epoch)``), ``"atlas"`` (atlas-to-subject: the atlas is the moving image, each
subject fixed), or explicit pairs from a CSV. :func:`split_subjects` gives a deterministic validation split.

:class:`PairDataset` items are dicts of tensors ``moving``, ``fixed`` (1, D, H, W) float32 in [0, 1] and, when
every volume has a label map, ``moving_labels``, ``fixed_labels`` (1, D, H, W) int64; plus ``index``. Every
pair is preprocessed with the same :class:`Preprocessing`, the fixed image's field of view defining the grid;
preprocessed volumes are cached in memory (LRU, keyed by path and grid) so data already in a common space is
loaded once.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emorph_deploy.choices import Choice
from emorph_deploy.data.imageio_formats import IMAGE_SUFFIXES, image_suffix
from emorph_deploy.data.nifti import as_image
from emorph_deploy.data.pairs import (
    PAIR_COLUMNS,
    PairRow,
    TableRow,
    nifti_stem,
    pairs_from_table,
    read_table,
    require_cells,
    resolve_path,
)
from emorph_deploy.data.preprocess import PreparedVolume, Preprocessing
from emorph_deploy.errors import InputError

__all__ = [
    "PairDataset",
    "PairMode",
    "PairSpec",
    "Split",
    "Subject",
    "discover",
    "make_pairs",
    "split_pairs",
    "split_subjects",
]

_LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_aseg", "_dseg", "_mask")


class PairMode(Choice):
    """How subjects are paired: ``inter`` (inter-subject) or ``atlas`` (atlas-to-subject)."""

    inter = "inter"
    atlas = "atlas"


class Split(Choice):
    """Part of a seeded train/validation split: ``train``, ``val`` or ``all`` (no split)."""

    train = "train"
    val = "val"
    all = "all"


@dataclass(frozen=True)
class Subject:
    image: Path
    label: Path | None = None


@dataclass(frozen=True)
class PairSpec:
    fixed: Subject
    moving: Subject


def _is_nifti(p: Path) -> bool:
    """An image file of a format ``load_volume`` reads (NIfTI, MGH/MGZ, NRRD, MetaImage)."""
    return p.is_file() and image_suffix(p) in IMAGE_SUFFIXES


def _check_file(p: Path, what: str) -> Path:
    if not (p.is_file() or p.is_dir()):  # a folder: a DICOM series
        raise InputError(
            f"{what} {p}: expected an existing image file or DICOM series folder, got a missing path; "
            "fix: correct the path"
        )
    return p


def _from_folder(folder: Path) -> list[Subject]:
    img_dir, lab_dir = folder / "images", folder / "labels"
    if img_dir.is_dir():
        subjects = []
        for p in sorted(q for q in img_dir.iterdir() if _is_nifti(q)):
            lab = None
            if lab_dir.is_dir():
                cands = [c for c in lab_dir.iterdir() if _is_nifti(c) and nifti_stem(c) == nifti_stem(p)]
                lab = cands[0] if cands else None
            subjects.append(Subject(p, lab))
        return subjects
    files = sorted(q for q in folder.iterdir() if _is_nifti(q))
    by_stem = {nifti_stem(q): q for q in files}
    label_files = {q for q in files if any(nifti_stem(q).endswith(s) for s in _LABEL_SUFFIXES)}
    subjects = []
    for p in files:
        if p in label_files:
            continue
        stem = nifti_stem(p)
        lab = next((by_stem[stem + s] for s in _LABEL_SUFFIXES if stem + s in by_stem), None)
        subjects.append(Subject(p, lab))
    return subjects


#: Subject-list columns (canonical -> other accepted spellings); pairs CSVs use
#: :data:`emorph_deploy.data.pairs.PAIR_COLUMNS`.
SUBJECT_COLUMNS: dict[str, tuple[str, ...]] = {"image": (), "label": ("labels",)}


def _read_csv(path: Path) -> tuple[list[Subject], list[PairSpec]]:
    """Subjects (``image[,label]``) or explicit pairs (a pairs CSV, :mod:`emorph_deploy.data.pairs`)."""
    table = read_table(path, {**PAIR_COLUMNS, **SUBJECT_COLUMNS})
    if not table.rows:
        raise InputError(
            f"dataset {path}: expected at least one row, got an empty CSV; fix: list your volumes"
        )
    if {"fixed", "moving"} <= table.columns:
        return [], [_pair_spec(path, row) for row in pairs_from_table(table)]
    if "image" in table.columns:
        return [_subject(path, row) for row in table.rows], []
    raise InputError(
        f"dataset {path}: expected columns 'image[,label]' or 'fixed,moving[,fixed_labels,moving_labels]', "
        f"got {sorted(table.columns)}; fix: rename the CSV header"
    )


def _pair_spec(path: Path, row: PairRow) -> PairSpec:
    where = f"dataset {path} line {row.line}"
    fixed_labels = _check_file(row.fixed_labels, f"{where}: fixed_labels") if row.fixed_labels else None
    moving_labels = _check_file(row.moving_labels, f"{where}: moving_labels") if row.moving_labels else None
    return PairSpec(
        Subject(_check_file(row.fixed, f"{where}: fixed"), fixed_labels),
        Subject(_check_file(row.moving, f"{where}: moving"), moving_labels),
    )


def _subject(path: Path, row: TableRow) -> Subject:
    require_cells(path, row, ("image",))
    where = f"dataset {path} line {row.line}"
    image = _check_file(resolve_path(row.cells["image"], path), f"{where}: image")
    label = row.cells.get("label")
    return Subject(image, _check_file(resolve_path(label, path), f"{where}: label") if label else None)


def discover(source: str | os.PathLike) -> tuple[list[Subject], list[PairSpec]]:
    """Subjects (folder or ``image`` CSV) or explicit pairs (``fixed,moving`` CSV); empty -> InputError."""
    src = Path(source)
    if not src.exists():
        raise InputError(
            f"dataset {src}: expected a folder of NIfTI files or a CSV, got a missing path; "
            "fix: check the path"
        )
    if src.is_dir():
        subjects, pairs = _from_folder(src), []
    elif src.suffix.lower() == ".csv":
        subjects, pairs = _read_csv(src)
    else:
        raise InputError(
            f"dataset {src}: expected a folder or a .csv file, got {src.suffix or 'a file'}; "
            "fix: pass the folder holding the volumes or a CSV listing them"
        )
    if not subjects and not pairs:
        raise InputError(
            f"dataset {src}: expected image volumes (.nii/.nii.gz, .mgz, .nrrd, .mha, ...), got none; "
            "fix: point to the folder holding the volumes or list them in a CSV"
        )
    return subjects, pairs


def split_subjects(
    items: Sequence[Any], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Any], list[Any]]:
    """Deterministic (seeded) split into (train, val); val gets round(fraction * n) items, >= 1 if fraction >
    0 and n >= 2. The split depends only on ``seed``, ``val_fraction`` and the order of ``items``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(
            f"validation fraction: expected 0 <= fraction < 1, got {val_fraction}; fix: e.g. 0.1"
        )
    n = len(items)
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    train = [x for i, x in enumerate(items) if i not in val_idx]
    val = [x for i, x in enumerate(items) if i in val_idx]
    return train, val


split_pairs = split_subjects


def make_pairs(
    subjects: Sequence[Subject],
    mode: PairMode | str = PairMode.inter,
    atlas: Subject | None = None,
    seed: int = 0,
    epoch: int = 0,
) -> list[PairSpec]:
    """Pairs for one epoch. ``inter``: subject i fixed, a seeded random other subject moving (n pairs);
    ``atlas``: atlas moving, each subject fixed."""
    subjects = list(subjects)
    if mode == PairMode.atlas:
        if atlas is None:
            raise InputError("atlas pairs: expected an atlas image, got none; fix: pass --atlas PATH")
        return [PairSpec(fixed=s, moving=atlas) for s in subjects]
    if mode != PairMode.inter:
        raise InputError(f"pairing: expected 'inter' or 'atlas', got {mode!r}; fix: use one of those")
    n = len(subjects)
    if n < 2:
        raise InputError(
            f"inter-subject pairs: expected at least 2 volumes, got {n}; fix: add volumes or use --atlas"
        )
    rng = np.random.default_rng((seed, epoch))
    offsets = rng.integers(1, n, size=n)
    return [PairSpec(fixed=subjects[i], moving=subjects[(i + int(o)) % n]) for i, o in enumerate(offsets)]


try:
    from torch.utils.data import Dataset as _Dataset
except ImportError:  # pragma: no cover
    _Dataset = object  # type: ignore[assignment,misc]


class PairDataset(_Dataset):  # type: ignore[misc,valid-type]
    """Torch dataset of preprocessed pairs (see module docstring for item keys).

    Build with :meth:`from_source` or directly from subjects/pairs. ``set_epoch(e)`` re-draws inter-subject
    partners deterministically (call it each epoch; DDP ranks calling it with the same epoch agree).
    """

    def __init__(
        self,
        subjects: Sequence[Subject] = (),
        preprocessing: Preprocessing | None = None,
        pairs: Sequence[PairSpec] | None = None,
        mode: PairMode | str = PairMode.inter,
        atlas: str | os.PathLike | Subject | None = None,
        seed: int = 0,
        cache_size: int = 64,
    ) -> None:
        self.preprocessing = preprocessing or Preprocessing()
        self.subjects = list(subjects)
        self.explicit = list(pairs) if pairs else None
        if isinstance(atlas, str | os.PathLike):
            atlas = Subject(_check_file(Path(atlas), "atlas"))
        self.atlas = atlas
        self.mode = PairMode.atlas if atlas is not None else mode
        self.seed = int(seed)
        self.epoch = 0
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple, PreparedVolume] = OrderedDict()
        if not self.subjects and not self.explicit:
            raise InputError(
                "dataset: expected at least one volume or pair, got an empty dataset; "
                "fix: check the folder/CSV and the validation fraction"
            )
        self._pairs = self.explicit or make_pairs(self.subjects, self.mode, self.atlas, self.seed, 0)
        self.has_labels = all(p.fixed.label is not None and p.moving.label is not None for p in self._pairs)

    @classmethod
    def from_source(
        cls,
        source: str | os.PathLike,
        preprocessing: Preprocessing | None = None,
        val_fraction: float = 0.0,
        split: Split | str = Split.all,
        seed: int = 0,
        **kwargs: Any,
    ) -> PairDataset:
        """Dataset from a folder/CSV; ``split`` selects the train or val part of a seeded split."""
        subjects, pairs = discover(source)
        items = subjects or pairs
        if split != Split.all:
            train, val = split_subjects(items, val_fraction, seed)
            items = train if split == Split.train else val
        if not items:
            raise InputError(
                f"dataset {source}: expected volumes in the {split} split, got none; "
                "fix: add volumes or change the validation fraction"
            )
        if subjects:
            return cls(items, preprocessing, seed=seed, **kwargs)
        return cls((), preprocessing, pairs=items, seed=seed, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.explicit is None:
            self._pairs = make_pairs(self.subjects, self.mode, self.atlas, self.seed, self.epoch)

    @property
    def pairs(self) -> list[PairSpec]:
        return list(self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def _prepared(self, path: Path, grid: np.ndarray, is_label: bool) -> PreparedVolume:
        key = (str(path), is_label, grid.round(6).tobytes())
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        vol = self.preprocessing.apply(
            path, reference=grid, is_label=is_label, name=("label map " if is_label else "image ") + str(path)
        )
        if self.cache_size > 0:
            self._cache[key] = vol
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return vol

    def _grid(self, path: Path) -> np.ndarray:
        key = ("grid", str(path))
        hit = self._cache.get(key)
        if hit is None:
            import nibabel as nib

            try:
                img = nib.load(str(path))
                ref = (img.shape, img.affine)
            except Exception:  # full validation with a clear message
                ref = as_image(path, name=f"image {path}")
            hit = self.preprocessing.grid_affine(ref)
            self._cache[key] = hit  # type: ignore[assignment]
        return hit  # type: ignore[return-value]

    def prepared_pair(self, index: int) -> dict[str, PreparedVolume]:
        """The PreparedVolumes of pair ``index`` (keys fixed, moving[, fixed_labels, moving_labels])."""
        spec = self._pairs[index]
        grid = self._grid(spec.fixed.image)
        out = {
            "fixed": self._prepared(spec.fixed.image, grid, False),
            "moving": self._prepared(spec.moving.image, grid, False),
        }
        if self.has_labels:
            out["fixed_labels"] = self._prepared(spec.fixed.label, grid, True)  # type: ignore[arg-type]
            out["moving_labels"] = self._prepared(spec.moving.label, grid, True)  # type: ignore[arg-type]
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self._pairs):
            raise IndexError(index)
        item: dict[str, Any] = {k: v.tensor() for k, v in self.prepared_pair(index).items()}
        item["index"] = int(index)
        return item
