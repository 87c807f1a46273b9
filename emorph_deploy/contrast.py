"""Contrast between two roughly aligned images on the model grid: do they share one, and if not, a map that
gives the moving image the fixed image's contrast.

- :func:`contrast_agreement`: inside the common foreground, is the fixed intensity a positive, mostly
  *linear* function of the moving one (same contrast), a negative one (an inversion, e.g. T1 against
  T2-like tissue order), or neither? (Figures and a verdict.)
- :func:`fit_inversion_map`: for an inversion, the moving intensity quantiles mapped onto the fixed ones in
  reverse order (histogram matching; no alignment needed, the fixed image's full contrast kept).
- :func:`fit_intensity_map`: otherwise the typical fixed intensity for each moving intensity (a conditional
  median, :class:`IntensityMap`), fitted on a roughly aligned pair.
- Applied to the moving image before the network and the refinement
  (:class:`~emorph_deploy.registration.Registrar`'s ``match_contrast``), an inverted or remapped contrast
  becomes one the network and local NCC handle as same-contrast; the outputs still warp the moving image
  as given.
- A pair matched by the conditional-median map is a loose fit (tissues that share one moving intensity
  get one fixed intensity), so the refinement works on the moving image as given with normalised
  gradient fields (:meth:`~emorph_deploy.registration.Registrar.register`).

Images are tensors or arrays of any one shape, in [0, 1], whose background is 0 (the model-grid images of
:class:`~emorph_deploy.registration.Registrar`). Figures behind the choices: ``docs/model_card.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import torch

from emorph_deploy.choices import Similarity
from emorph_deploy.errors import InputError

__all__ = [
    "LINEAR_SHARE",
    "NCC_MIN_R",
    "IntensityMap",
    "contrast_agreement",
    "fit_intensity_map",
    "fit_inversion_map",
    "refine_similarity",
]

#: contrast_agreement's rule: same contrast iff r > 0 and r² ≥ LINEAR_SHARE · η²; an inversion iff r < 0
#: and r² ≥ LINEAR_SHARE · η² (see its docstring)
LINEAR_SHARE = 0.5

#: fit_inversion_map: quantile levels of the piecewise-linear map
INVERSION_LEVELS = 256

#: fit_inversion_map: at most about this many voxels per image enter the quantiles (a strided sample)
QUANTILE_SAMPLE = 65_536

#: The refinement's similarity: local NCC only when the moving image (unmatched or inversion-matched),
#: warped by the network, correlates with the fixed image at least this much (Pearson r in the common
#: foreground), else NGF (refine_similarity; the QC's deformable check judges a matched image only above
#: it). It lies between the correlations of the validation suite's pairs where NCC refined better and those
#: where NGF did (docs/model_card.md, "Across contrasts").
NCC_MIN_R = 0.55

#: fewest common-foreground voxels for a verdict or a map
MIN_VOXELS = 1000

#: intensity above which a voxel of a [0, 1] image counts as foreground for the contrast figures
FOREGROUND_THRESHOLD = 0.02


def _flat(x: Any) -> np.ndarray:
    """A tensor (any device) or array as a flat float32 numpy array (a view where possible)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32).reshape(-1)


def _common_foreground(moving: Any, fixed: Any, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The two images' intensities (float64, 1-D) where both exceed ``threshold``."""
    m, f = _flat(moving), _flat(fixed)
    both = (m > threshold) & (f > threshold)
    return m[both].astype(np.float64), f[both].astype(np.float64)


def _pearson(m: np.ndarray, f: np.ndarray) -> float:
    mc, fc = m - m.mean(), f - f.mean()
    return float((mc @ fc) / (np.sqrt(mc @ mc) * np.sqrt(fc @ fc) + 1e-12))


def _bin_ids(m: np.ndarray, bins: int) -> np.ndarray:
    """Equal-count bins of ``m`` (1-D): the bin of each value, 0..bins-1. The edges are quantiles of a
    strided sample of at most ~64 k values, so the cost is one pass over ``m`` rather than a full sort
    (which cost ~0.1 s per call on a brain's foreground)."""
    sample = m[:: max(1, m.size // 65_536)]
    edges = np.quantile(sample, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    return np.searchsorted(edges, m, side="right")


def contrast_agreement(
    moving: Any, fixed: Any, bins: int = 32, threshold: float = FOREGROUND_THRESHOLD
) -> dict[str, Any]:
    """Do two roughly aligned images share a contrast? Figures and verdict, measured on the common foreground.

    Inside the voxels where both images exceed ``threshold`` (the background of skull-stripped, [0, 1]
    normalised images is 0), with ``r`` the Pearson correlation of the two intensities and ``η²`` the
    correlation ratio of the fixed intensity given the moving one (``bins`` equal-count bins of the moving
    intensity; η² = the share of the fixed image's variance explained by *any* function of the moving
    intensity, r² = the share explained by a *linear* one, so r² ≤ η² up to binning): the contrast is the
    same iff ``r > 0`` and ``r² ≥ LINEAR_SHARE · η²`` (0.5). Misalignment lowers r² and η² together; an
    inverted contrast makes r negative; a non-monotone remap (tissue order changed) leaves η² well above
    r². ``relation`` names the case: ``"same"``, ``"inverted"`` (``r < 0`` and ``r² ≥ LINEAR_SHARE · η²``:
    a mostly linear *decreasing* relation, :func:`fit_inversion_map`'s case) or ``"other"``. Fewer than 1000
    foreground voxels: no verdict (``same_contrast`` True, NCC — the training loss). Takes tensors (any
    device) or arrays of one shape.

    Returns ``{"r", "eta2", "linear_share", "foreground_voxels", "same_contrast", "relation"}``.
    """
    m, f = _common_foreground(moving, fixed, threshold)
    n = m.size
    if n < MIN_VOXELS:
        return {
            "r": None,
            "eta2": None,
            "linear_share": None,
            "foreground_voxels": n,
            "same_contrast": True,
            "relation": "same",
        }
    r = _pearson(m, f)
    fc = f - f.mean()
    var_f = float(fc @ fc) / n
    ids = _bin_ids(m, bins)
    counts = np.bincount(ids, minlength=bins).astype(np.float64)
    sums = np.bincount(ids, weights=fc, minlength=bins)
    eta2 = float((sums * sums / np.maximum(counts, 1.0)).sum() / n / (var_f + 1e-12))
    share = r * r / max(eta2, 1e-12)
    linear = share >= LINEAR_SHARE
    relation = "same" if (r > 0 and linear) else "inverted" if (r < 0 and linear) else "other"
    return {
        "r": r,
        "eta2": eta2,
        "linear_share": share,
        "foreground_voxels": n,
        "same_contrast": relation == "same",
        "relation": relation,
    }


@dataclass(frozen=True)
class IntensityMap:
    """A moving intensity → fixed intensity map, piecewise linear through ``(moving_levels[k],
    fixed_levels[k])`` (increasing moving levels; constant beyond the ends). Background (intensity ≤ 0)
    stays 0. ``__call__`` takes a tensor or an array and returns a float32 one of its kind and shape."""

    moving_levels: tuple[float, ...]
    fixed_levels: tuple[float, ...]

    def __post_init__(self) -> None:
        xs = tuple(float(v) for v in self.moving_levels)
        ys = tuple(float(v) for v in self.fixed_levels)
        if len(xs) < 2 or len(xs) != len(ys) or any(b < a for a, b in pairwise(xs)):
            raise InputError(
                f"IntensityMap: expected as many fixed as moving levels (at least 2), the moving levels "
                f"increasing, got {len(xs)} moving and {len(ys)} fixed levels; fix: build it with "
                "fit_intensity_map"
            )
        object.__setattr__(self, "moving_levels", xs)
        object.__setattr__(self, "fixed_levels", ys)

    def __call__(self, moving: Any) -> Any:
        x = moving.detach().cpu().numpy() if isinstance(moving, torch.Tensor) else np.asarray(moving)
        out = np.zeros(x.shape, dtype=np.float32)
        inside = x > 0  # only the foreground is mapped: a native volume is mostly background
        out[inside] = np.interp(x[inside], self.moving_levels, self.fixed_levels)
        if isinstance(moving, torch.Tensor):
            return torch.from_numpy(out).to(moving.device)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"moving_levels": list(self.moving_levels), "fixed_levels": list(self.fixed_levels)}


def _check_pair(moving: Any, fixed: Any, who: str) -> None:
    if moving.shape != fixed.shape:
        raise InputError(
            f"{who}: expected two images of one shape, got {tuple(moving.shape)} and "
            f"{tuple(fixed.shape)}; fix: pass both images on the model grid"
        )


def _check_voxels(n: int, who: str) -> None:
    if n < MIN_VOXELS:
        raise InputError(
            f"{who}: expected at least {MIN_VOXELS} voxels where both images are foreground, got {n}; "
            "fix: pre-align the images (the affine) or turn contrast matching off"
        )


def fit_intensity_map(moving: Any, fixed: Any, bins: int = 64) -> IntensityMap:
    """The median fixed intensity for each of ``bins`` equal-count bins of the moving foreground intensity,
    over the voxels where both images are foreground (> 0), at the bins' mean moving intensities. Fit it on a
    roughly aligned pair (after the affine pre-alignment); misalignment flattens the map towards the mean, it
    does not reverse it. InputError with fewer than 1000 common foreground voxels (nothing to fit)."""
    _check_pair(moving, fixed, "fit_intensity_map")
    if bins < 2:
        raise InputError(f"fit_intensity_map: expected bins >= 2, got {bins}; fix: use e.g. 64")
    m, f = _common_foreground(moving, fixed, 0.0)
    _check_voxels(m.size, "fit_intensity_map")
    ids = _bin_ids(m, bins)
    counts = np.bincount(ids, minlength=bins)
    filled = counts > 0  # ties (e.g. a flat tissue intensity) can leave a bin empty
    x = np.bincount(ids, weights=m, minlength=bins)[filled] / counts[filled]
    # the median fixed intensity per bin: one sort of (bin, intensity) keys, the bins kept apart by a step
    # larger than any intensity; the median resists the misaligned voxels that pull a mean to the middle
    step = 2.0 * float(f.max()) + 1.0
    keys = np.sort(ids * step + f)
    starts = np.cumsum(counts) - counts
    lo, hi = starts + (counts - 1) // 2, starts + counts // 2
    y = ((keys[lo[filled]] + keys[hi[filled]]) / 2.0) - np.flatnonzero(filled) * step
    if x.size < 2:  # one intensity only: a constant map
        x, y = np.array([x[0], x[0]]), np.array([y[0], y[0]])
    return IntensityMap(tuple(x.tolist()), tuple(y.tolist()))


def fit_inversion_map(moving: Any, fixed: Any, levels: int = INVERSION_LEVELS) -> IntensityMap:
    """Histogram matching in reverse order: the moving intensity at quantile q of the common foreground
    (where both images are > 0) maps to the fixed intensity at quantile 1 − q, so the brightest moving
    tissue takes the darkest fixed intensity. For an inverted contrast (:func:`contrast_agreement`'s
    ``"inverted"``): it needs no voxel-wise agreement, so unlike :func:`fit_intensity_map`'s conditional
    median, which misalignment flattens towards the mean, it keeps the fixed image's whole contrast.
    InputError with fewer than 1000 common foreground voxels (nothing to fit)."""
    _check_pair(moving, fixed, "fit_inversion_map")
    if levels < 2:
        raise InputError(f"fit_inversion_map: expected levels >= 2, got {levels}; fix: use e.g. 256")
    m, f = _common_foreground(moving, fixed, 0.0)
    _check_voxels(m.size, "fit_inversion_map")
    q = np.linspace(0.0, 1.0, levels)
    # quantiles of a strided sample of at most ~64-128 k values (>= 256 per level): a full sort per image
    # cost ~40 ms on a brain's foreground, the sample a few
    step = max(1, m.size // QUANTILE_SAMPLE)
    xs = np.maximum.accumulate(np.quantile(m[::step], q))  # non-decreasing against float rounding
    ys = np.quantile(f[::step], q[::-1])
    return IntensityMap(tuple(xs.tolist()), tuple(ys.tolist()))


def refine_similarity(agreement: dict[str, Any], min_r: float | None = NCC_MIN_R) -> Similarity:
    """The refinement similarity for an unmatched pair from :func:`contrast_agreement`'s figures on the
    moving image warped by the network: NCC if the verdict is the same contrast *and* ``r`` reaches
    ``min_r`` (None: the verdict alone; no verdict: NCC, the training loss), else NGF. After the network a
    weak correlation that passes the linearity test (r² and η² both small) gives local NCC little to
    follow; before any deformable alignment (a zero flow) misalignment alone lowers r, so callers pass
    None there."""
    r = agreement.get("r")
    if r is None:
        return Similarity.ncc
    if not agreement["same_contrast"]:
        return Similarity.ngf
    return Similarity.ncc if min_r is None or r >= min_r else Similarity.ngf
