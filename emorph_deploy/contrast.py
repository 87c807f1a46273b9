"""Contrast between two roughly aligned images on the model grid: do they share one, and if not, a map that
gives the moving image the fixed image's contrast.

- :func:`contrast_agreement`: inside the common foreground, is the fixed intensity a positive, mostly
  *linear* function of the moving one? (Figures and a verdict.)
- :func:`fit_intensity_map`: the fixed intensity expected for each moving intensity (a conditional mean,
  :class:`IntensityMap`), fitted on a roughly aligned pair. Applied to the moving image before the network
  and the refinement (:class:`~emorph_deploy.registration.Registrar`'s ``match_contrast``), an inverted or
  remapped contrast becomes one the network and local NCC handle as same-contrast; the outputs still warp
  the moving image as given.
- :func:`similarity_after_matching`: the refinement similarity for a matched pair: local NCC when the
  matched image correlates with the fixed one as well as same-contrast pairs do, otherwise normalised
  gradient fields (the map is then too loose a fit, e.g. tissues that share one moving intensity).

Images are (1, 1, D, H, W) or (D, H, W) tensors in [0, 1] whose background is 0 (the model-grid images of
:class:`~emorph_deploy.registration.Registrar`). Figures behind the choices: ``docs/model_card.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch

from emorph_deploy.choices import Similarity
from emorph_deploy.errors import InputError

__all__ = [
    "LINEAR_SHARE",
    "MATCHED_NCC_MIN_R",
    "IntensityMap",
    "contrast_agreement",
    "fit_intensity_map",
    "similarity_after_matching",
]

#: contrast_agreement's rule: same contrast iff r > 0 and r² ≥ LINEAR_SHARE · η² (see its docstring)
LINEAR_SHARE = 0.5

#: similarity_after_matching: local NCC when the matched moving image, warped by the network, correlates
#: with the fixed image at least this much (Pearson r in the common foreground), else NGF. On the
#: validation suite matched real pairs with an inverted contrast reached r 0.61-0.77 (NCC the better
#: refinement), synthetic pairs whose contrast merges tissues 0.34-0.49 (NGF the better one).
MATCHED_NCC_MIN_R = 0.55

#: fewest common-foreground voxels for a verdict or a map
MIN_VOXELS = 1000


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1).float()


def contrast_agreement(
    moving: torch.Tensor, fixed: torch.Tensor, bins: int = 32, threshold: float = 0.02
) -> dict[str, Any]:
    """Do two roughly aligned images share a contrast? Figures and verdict, measured on the common foreground.

    Inside the voxels where both images exceed ``threshold`` (the background of skull-stripped, [0, 1]
    normalised images is 0), with ``r`` the Pearson correlation of the two intensities and ``η²`` the
    correlation ratio of the fixed intensity given the moving one (``bins`` equal-count bins of the moving
    intensity; η² = the share of the fixed image's variance explained by *any* function of the moving
    intensity, r² = the share explained by a *linear* one, so r² ≤ η² up to binning): the contrast is the
    same iff ``r > 0`` and ``r² ≥ LINEAR_SHARE · η²`` (0.5). Misalignment lowers r² and η² together; an
    inverted contrast makes r negative; a non-monotone remap (tissue order changed) leaves η² well above
    r². Fewer than 1000 foreground voxels: no verdict (``same_contrast`` True, NCC — the training loss).

    Returns ``{"r", "eta2", "linear_share", "foreground_voxels", "same_contrast"}``.
    """
    m, f = _flat(moving), _flat(fixed)
    fg = (m > threshold) & (f > threshold)
    n = int(fg.sum())
    if n < MIN_VOXELS:
        return {"r": None, "eta2": None, "linear_share": None, "foreground_voxels": n, "same_contrast": True}
    m, f = m[fg].double(), f[fg].double()
    mc, fc = m - m.mean(), f - f.mean()
    var_f = float((fc * fc).mean())
    r = float((mc * fc).mean() / ((mc * mc).mean().sqrt() * var_f**0.5 + 1e-12))
    order = torch.argsort(m)
    ids = torch.empty_like(order)
    ids[order] = torch.arange(n) * bins // n  # equal-count bins of the moving intensity
    counts = torch.bincount(ids, minlength=bins).double()
    sums = torch.bincount(ids, weights=fc, minlength=bins)
    eta2 = float((sums * sums / counts.clamp(min=1)).sum() / n / (var_f + 1e-12))
    share = r * r / max(eta2, 1e-12)
    return {
        "r": r,
        "eta2": eta2,
        "linear_share": share,
        "foreground_voxels": n,
        "same_contrast": bool(r > 0 and share >= LINEAR_SHARE),
    }


@dataclass(frozen=True)
class IntensityMap:
    """A moving intensity → fixed intensity map, piecewise linear through ``(moving_levels[k],
    fixed_levels[k])`` (increasing moving levels; constant beyond the ends). Background (intensity ≤ 0)
    stays 0. ``__call__`` takes any tensor and returns a float32 tensor of its shape."""

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

    def __call__(self, moving: torch.Tensor) -> torch.Tensor:
        x = moving.float()
        xs = torch.tensor(self.moving_levels, dtype=torch.float32, device=x.device)
        ys = torch.tensor(self.fixed_levels, dtype=torch.float32, device=x.device)
        i = torch.bucketize(x, xs).clamp(1, len(xs) - 1)  # segment [xs[i-1], xs[i]]
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        t = ((x - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0.0, 1.0)
        return torch.where(x > 0, y0 + t * (y1 - y0), torch.zeros((), device=x.device))

    def to_dict(self) -> dict[str, Any]:
        return {"moving_levels": list(self.moving_levels), "fixed_levels": list(self.fixed_levels)}


def fit_intensity_map(moving: torch.Tensor, fixed: torch.Tensor, bins: int = 64) -> IntensityMap:
    """The mean fixed intensity for each of ``bins`` equal-count bins of the moving foreground intensity,
    over the voxels where both images are foreground (> 0): E[fixed | moving], sampled at the bins' mean
    moving intensities. Fit it on a roughly aligned pair (after the affine pre-alignment); misalignment
    flattens the map towards the mean, it does not reverse it. InputError with fewer than 1000 common
    foreground voxels (nothing to fit)."""
    if moving.shape != fixed.shape:
        raise InputError(
            f"fit_intensity_map: expected two images of one shape, got {tuple(moving.shape)} and "
            f"{tuple(fixed.shape)}; fix: pass both images on the model grid"
        )
    if bins < 2:
        raise InputError(f"fit_intensity_map: expected bins >= 2, got {bins}; fix: use e.g. 64")
    m, f = _flat(moving), _flat(fixed)
    both = (m > 0) & (f > 0)
    n = int(both.sum())
    if n < MIN_VOXELS:
        raise InputError(
            f"fit_intensity_map: expected at least {MIN_VOXELS} voxels where both images are foreground, "
            f"got {n}; fix: pre-align the images (the affine) or turn contrast matching off"
        )
    m, f = m[both].double(), f[both].double()
    order = torch.argsort(m)
    ids = torch.empty_like(order)
    ids[order] = torch.arange(n) * bins // n  # equal-count bins of the moving intensity
    counts = torch.bincount(ids, minlength=bins).double()
    x = torch.bincount(ids, weights=m, minlength=bins) / counts
    y = torch.bincount(ids, weights=f, minlength=bins) / counts
    return IntensityMap(tuple(float(v) for v in x), tuple(float(v) for v in y))


def similarity_after_matching(warped_matched: torch.Tensor, fixed: torch.Tensor) -> tuple[Similarity, float]:
    """The refinement similarity for a contrast-matched pair and the Pearson r it rests on: NCC if the
    matched moving image (warped by the network's flow) correlates with the fixed image by at least
    :data:`MATCHED_NCC_MIN_R` in the common foreground, else NGF."""
    r = contrast_agreement(warped_matched, fixed)["r"]
    if r is None:  # too little foreground to judge: the training loss
        return Similarity.ncc, float("nan")
    return (Similarity.ncc if r >= MATCHED_NCC_MIN_R else Similarity.ngf), float(r)
