"""Calibration pairs: a CSV of NIfTI (moving, fixed) pairs or synthetic pairs, preprocessed exactly as at
inference.

CSV: a pairs CSV (:mod:`emorph_deploy.data.pairs`: columns ``fixed,moving``, other columns ignored) or,
without a header line, one ``moving,fixed`` pair per line; relative paths are resolved against the CSV's
folder. Every pair is loaded and preprocessed with the graph's :class:`~emorph_deploy.data.Preprocessing`
(the ONNX manifest's) *before* calibration starts, so an unreadable or mismatched volume fails fast with its
line number and nothing is written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from emorph_deploy.choices import CalibrationKind
from emorph_deploy.data.pairs import read_pairs
from emorph_deploy.errors import ConfigMismatchError, EmorphError, InputError

#: The columns of a calibration list without a header line.
HEADERLESS_COLUMNS = ("moving", "fixed")


@dataclass(frozen=True)
class PairSource:
    """Where a calibration pair came from (written to the saved pair list); ``line`` in the CSV (0 for
    synthetic pairs)."""

    moving: str
    fixed: str
    line: int = 0


def read_pair_csv(path: str | os.PathLike) -> list[PairSource]:
    """The (moving, fixed) images of a pairs CSV (:func:`emorph_deploy.data.pairs.read_pairs`); a file
    without a header is read as ``moving,fixed`` lines."""
    return [
        PairSource(str(row.moving), str(row.fixed), row.line)
        for row in read_pairs(path, headerless=HEADERLESS_COLUMNS)
    ]


class PairVolumes(NamedTuple):
    """One pair on the model grid: images (D, H, W) in [0, 1], labels (D, H, W) int32 or None."""

    moving: np.ndarray
    fixed: np.ndarray
    moving_labels: np.ndarray | None = None
    fixed_labels: np.ndarray | None = None


def load_pair(
    preprocessing: Any,
    moving: str | os.PathLike,
    fixed: str | os.PathLike,
    moving_label: str | os.PathLike | None = None,
    fixed_label: str | os.PathLike | None = None,
) -> PairVolumes:
    """Load NIfTI files and bring them onto the model grid with ``preprocessing``
    (:class:`~emorph_deploy.data.Preprocessing`) as registration does: the fixed image defines the grid for
    the moving image and the labels (resampled nearest; loaded only when both are given).

    Errors of :meth:`Preprocessing.apply` propagate unchanged; callers add their own context.
    """
    fixed_vol = preprocessing.apply(str(fixed), name="fixed image")  # the fixed image defines the grid
    grid = fixed_vol.affine
    moving_data = preprocessing.apply(str(moving), reference=grid, name="moving image").data
    ml = fl = None
    if moving_label is not None and fixed_label is not None:
        ml = preprocessing.apply(str(moving_label), reference=grid, is_label=True, name="moving label").data
        fl = preprocessing.apply(str(fixed_label), reference=grid, is_label=True, name="fixed label").data
    return PairVolumes(moving_data, fixed_vol.data, ml, fl)


def preprocess_pair(
    src: PairSource, preprocessing: Any, grid: tuple[int, int, int], where: str
) -> dict[str, np.ndarray]:
    """Load + preprocess one pair onto the model grid (fixed defines the grid) as registration does."""
    try:
        vols = load_pair(preprocessing, src.moving, src.fixed)
    except EmorphError as exc:
        raise InputError(f"{where}: {exc}") from exc
    except Exception as exc:  # nibabel/scipy errors on corrupt files
        raise InputError(
            f"{where}: cannot load/preprocess ({type(exc).__name__}: {exc}); fix: check the files "
            "or remove the row"
        ) from exc
    for what, data in (("moving", vols.moving), ("fixed", vols.fixed)):
        if tuple(data.shape) != tuple(grid):
            raise ConfigMismatchError(
                f"{where}: expected {what} on the model grid {tuple(grid)}, got "
                f"{tuple(data.shape)}; fix: use the ONNX manifest's preprocessing"
            )
    return {
        "moving": vols.moving[None, None].astype(np.float32),
        "fixed": vols.fixed[None, None].astype(np.float32),
    }


def synthetic_pair(
    grid: tuple[int, int, int], seed: int, index: int, kind: CalibrationKind | str = CalibrationKind.template
) -> dict[str, np.ndarray]:
    """A synthetic brain pair (MNI152-template based or SynthMorph-style) on the model grid: images
    (1, 1, D, H, W) float32 in [0, 1]."""
    from emorph_deploy.data.synthetic import synth_pair, template_pair

    make = template_pair if kind == "template" or (kind == "mix" and index % 2 == 1) else synth_pair
    pair = make(tuple(grid), seed=(int(seed), int(index)))
    return {
        "moving": pair.moving[None, None].astype(np.float32),
        "fixed": pair.fixed[None, None].astype(np.float32),
    }


class CalibrationSet:
    """Preprocessed calibration feeds held in memory (volumes are small: ≤ 1 GB for 64 pairs at full grid)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], sources: list[PairSource]) -> None:
        self.feeds = feeds
        self.sources = sources

    def __len__(self) -> int:
        return len(self.feeds)

    @classmethod
    def from_csv(
        cls,
        path: str | os.PathLike,
        preprocessing: Any,
        grid: tuple[int, int, int],
        limit: int | None = None,
        progress: bool = True,
    ) -> CalibrationSet:
        pairs = read_pair_csv(path)[: limit or None]
        feeds = []
        for src in _bar(pairs, "preprocessing pairs", progress):
            where = f"calibration list {path} line {src.line}"
            feeds.append(preprocess_pair(src, preprocessing, grid, where))
        return cls(feeds, pairs)

    @classmethod
    def synthetic(
        cls,
        n: int,
        grid: tuple[int, int, int],
        seed: int = 0,
        kind: CalibrationKind | str = CalibrationKind.template,
        progress: bool = True,
    ) -> CalibrationSet:
        if n < 1:
            raise InputError(f"--synthetic: expected at least 1 pair, got {n}; fix: e.g. --synthetic 16")
        kind = CalibrationKind.coerce(kind, "--synthetic-kind").value
        feeds = [synthetic_pair(grid, seed, i, kind) for i in _bar(range(n), "synthesising pairs", progress)]
        return cls(
            feeds,
            [
                PairSource(
                    f"synthetic:{kind}:seed={seed}:{i}:moving", f"synthetic:{kind}:seed={seed}:{i}:fixed"
                )
                for i in range(n)
            ],
        )


def _bar(it: Any, desc: str, enabled: bool) -> Iterator[Any]:
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="pair", disable=not enabled, leave=False)


def make_reader(calib: CalibrationSet, progress: bool = True, desc: str = "calibrating") -> Any:
    """An ONNX Runtime CalibrationDataReader over ``calib`` with a tqdm progress bar (one tick per pair)."""
    from onnxruntime.quantization import CalibrationDataReader
    from tqdm.auto import tqdm

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._i = 0
            self._bar = None

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._bar is None:
                self._bar = tqdm(total=len(calib), desc=desc, unit="pair", disable=not progress, leave=False)
            if self._i >= len(calib):
                self._bar.close()
                return None
            feed = calib.feeds[self._i]
            self._i += 1
            self._bar.update(1)
            return feed

        def get_first(self) -> dict[str, np.ndarray]:  # Model Optimizer's test run
            return calib.feeds[0]

        def rewind(self) -> None:
            self._i = 0
            if self._bar is not None:
                self._bar.close()
            self._bar = None

        def __len__(self) -> int:
            return len(calib)

    return _Reader()
