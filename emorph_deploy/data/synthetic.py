"""Synthetic training/validation pairs with known deformations (no data needed).

Two generators, both seeded and deterministic per seed (numpy ``default_rng``; torch only for CPU
interpolation):

- :func:`synth_pair` (SynthMorph-style): random smooth label map (argmax of smooth noise channels) ->
  per-label random intensities + within-label texture, blur; a random smooth deformation; per-image Gaussian
  noise, multiplicative smooth bias field and gamma.
- :func:`template_pair`: nilearn's bundled MNI152 2009 T1 with GM/WM maps (loaded offline) on the requested
  grid, a random "subject" deformation, then the same pair construction. Labels: 0 background, 1 CSF/other
  brain, 2 GM, 3 WM.

**Flow convention** (same as the model, docs/conventions.md): ``flow`` (3, D, H, W) in voxels, channel k along
array axis k, and ``fixed(x) = moving(x + flow(x))`` with align_corners=True sampling — i.e. ``warp(moving,
flow)`` reproduces ``fixed`` before the per-image intensity augmentation (exactly when ``augment=False``), and
``fixed_labels = warp(moving_labels, flow, mode="nearest")``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from emorph_deploy.data.preprocess import normalise_intensity
from emorph_deploy.data.resample import grid_coordinates, resample_to_grid, sample_at_voxel_coords

__all__ = [
    "SyntheticPair",
    "SyntheticPairs",
    "TemplateVolumes",
    "augment_intensity",
    "integrate_velocity",
    "iter_pairs",
    "labels_to_image",
    "load_template",
    "random_displacement",
    "random_label_map",
    "smooth_noise",
    "synth_pair",
    "template_pair",
    "warp_numpy",
]

Seed = int | np.random.Generator | tuple[int, ...] | list[int] | None


def _rng(seed: Seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------------------
def _coarse_shape(shape: tuple[int, ...], scale: float) -> tuple[int, int, int]:
    return tuple(max(2, int(np.ceil(s / scale)) + 1) for s in shape[:3])  # type: ignore[return-value]


def _upsample_affine(coarse: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Affine placing a coarse grid's corners on the fine grid's corners (fine voxel units)."""
    a = np.eye(4)
    a[:3, :3] = np.diag([(s - 1) / (c - 1) for s, c in zip(shape[:3], coarse[:3], strict=True)])
    return a


def smooth_noise(
    shape: tuple[int, int, int], rng: Seed = None, channels: int = 1, scale: float = 16.0, std: float = 1.0
) -> np.ndarray:
    """Smooth random field (C, D, H, W) float32: Gaussian noise on a grid ``scale`` times coarser, trilinearly
    upsampled (control-point spacing ~``scale`` voxels)."""
    from scipy.ndimage import gaussian_filter

    rng = _rng(rng)
    coarse = _coarse_shape(shape, scale)
    noise = rng.standard_normal((channels, *coarse)).astype(np.float32) * np.float32(std)
    noise = np.stack([gaussian_filter(c, 0.5, mode="nearest") for c in noise])
    return resample_to_grid(
        noise, _upsample_affine(coarse, shape), shape, np.eye(4), order=1, padding="border"
    )


def random_label_map(
    shape: tuple[int, int, int], n_labels: int = 16, rng: Seed = None, scale: float = 12.0
) -> np.ndarray:
    """Random smooth label map (D, H, W) int32 with values 0..n_labels-1 (argmax of smooth noise channels)."""
    from scipy.ndimage import gaussian_filter

    rng = _rng(rng)
    coarse = _coarse_shape(shape, scale)
    noise = rng.standard_normal((n_labels, *coarse)).astype(np.float32)
    noise = np.stack([gaussian_filter(c, 0.5, mode="nearest") for c in noise])
    up = _upsample_affine(coarse, shape)
    out = np.empty(shape, dtype=np.int32)
    step = max(1, (1 << 20) // (shape[1] * shape[2]))  # bound memory: n_labels x ~1M voxels per chunk
    for s in range(0, shape[0], step):
        sl = slice(s, min(s + step, shape[0]))
        coords = grid_coordinates(up, shape, np.eye(4), sl)
        vals = sample_at_voxel_coords(noise, coords, order=1, padding="border")  # (n, d, H, W)
        out[sl] = np.argmax(vals, axis=0)
    return out


def labels_to_image(
    labels: np.ndarray,
    rng: Seed = None,
    texture_std: float = 0.05,
    blur_sigma: tuple[float, float] = (0.3, 1.0),
) -> np.ndarray:
    """Per-label random mean intensity + smooth within-label texture, then a random Gaussian blur; [0, 1]
    float32.
    """
    from scipy.ndimage import gaussian_filter

    rng = _rng(rng)
    n = int(labels.max()) + 1
    means = rng.uniform(0.0, 1.0, size=n).astype(np.float32)
    stds = rng.uniform(0.0, texture_std, size=n).astype(np.float32)
    texture = smooth_noise(labels.shape, rng, 1, scale=4.0)[0]
    img = means[labels] + stds[labels] * texture
    sigma = float(rng.uniform(*blur_sigma))
    if sigma > 0:
        img = gaussian_filter(img, sigma, mode="nearest")
    out, _, _ = normalise_intensity(img, (0.0, 100.0), nonzero_only=False)
    return out


def augment_intensity(
    img: np.ndarray,
    rng: Seed = None,
    noise_std: float = 0.03,
    bias_strength: float = 0.3,
    gamma_std: float = 0.2,
    bias_scale: float = 32.0,
) -> np.ndarray:
    """Multiplicative smooth bias field ``exp(b)``, gamma ``exp(N(0, gamma_std))``, Gaussian noise; clip to
    [0, 1].

    The zero background stays zero (noise is added only where the image is nonzero).
    """
    rng = _rng(rng)
    img = np.asarray(img, dtype=np.float32)
    fg = img > 0
    out = img.copy()
    if bias_strength > 0:
        bias = smooth_noise(img.shape, rng, 1, scale=bias_scale, std=bias_strength)[0]
        out *= np.exp(bias)
    if gamma_std > 0:
        out = np.clip(out, 0.0, None) ** np.float32(np.exp(rng.normal(0.0, gamma_std)))
    if noise_std > 0:
        out += (rng.standard_normal(img.shape).astype(np.float32) * np.float32(noise_std)) * fg
    out = np.clip(out, 0.0, None)
    hi = float(np.percentile(out[fg], 99.5)) if fg.any() else float(out.max())
    if hi > 0:
        out /= np.float32(hi)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def warp_numpy(
    src: np.ndarray,
    flow: np.ndarray,
    order: int = 1,
    padding: Literal["zeros", "border"] = "zeros",
    method: Literal["torch", "scipy"] = "torch",
) -> np.ndarray:
    """``out(x) = src(x + flow(x))`` for src (D, H, W) or (C, D, H, W), flow (3, D, H, W) in voxels."""
    shape = flow.shape[1:]
    coords = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    coords += flow
    return sample_at_voxel_coords(src, coords, order=order, padding=padding, method=method)


def integrate_velocity(velocity: np.ndarray, steps: int = 7) -> np.ndarray:
    """Scaling and squaring of a stationary velocity field (3, D, H, W) in voxels -> displacement
    (float32)."""
    disp = np.asarray(velocity, dtype=np.float32) / np.float32(2**steps)
    for _ in range(steps):
        disp = disp + warp_numpy(disp, disp, order=1, padding="border")
    return disp.astype(np.float32)


def random_displacement(
    shape: tuple[int, int, int],
    rng: Seed = None,
    max_disp: float = 4.0,
    scale: float = 16.0,
    diffeomorphic: bool = True,
    steps: int = 7,
) -> np.ndarray:
    """Random smooth displacement (3, D, H, W) float32 in voxels.

    The smooth field (velocity if ``diffeomorphic``, else the displacement itself) is scaled so its largest
    vector norm equals ``max_disp`` voxels; ``diffeomorphic=True`` integrates it by scaling and squaring. For
    speed the field is built and integrated on a grid ``scale / 4`` times coarser and trilinearly upsampled
    (the returned field is the ground truth by construction: pairs are warped with exactly this array).
    """
    rng = _rng(rng)
    shape = tuple(int(s) for s in shape)
    ds = max(1, int(scale // 4))
    small = tuple(max(2, int(np.ceil((s - 1) / ds)) + 1) for s in shape)
    factors = np.asarray([(s - 1) / (c - 1) for s, c in zip(shape, small, strict=True)], dtype=np.float64)
    field_ = smooth_noise(small, rng, 3, scale=scale / ds).astype(np.float64)  # (3, *small) in fine voxels
    norm = float(np.sqrt((field_**2).sum(0)).max())
    if norm > 0:
        field_ *= max_disp / norm
    field_ /= factors.reshape(3, 1, 1, 1)  # -> coarse voxels
    if diffeomorphic:
        field_ = integrate_velocity(field_.astype(np.float32), steps).astype(np.float64)
    field_ *= factors.reshape(3, 1, 1, 1)  # -> fine voxels
    if small == shape:
        return field_.astype(np.float32)
    return resample_to_grid(
        field_.astype(np.float32), _upsample_affine(small, shape), shape, np.eye(4), order=1, padding="border"
    )


# ------------------------------------------------------------------------------------------------------------
# pairs
# ------------------------------------------------------------------------------------------------------------
@dataclass
class SyntheticPair:
    """A training/validation pair with ground truth. ``fixed(x) ≈ moving(x + flow(x))``.

    moving, fixed: (D, H, W) float32 in [0, 1]; moving_labels, fixed_labels: (D, H, W) int32;
    flow: (3, D, H, W) float32 voxel displacement (channel k along array axis k).
    """

    moving: np.ndarray
    fixed: np.ndarray
    moving_labels: np.ndarray
    fixed_labels: np.ndarray
    flow: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def to_tensors(self) -> dict[str, Any]:
        """Tensors with a channel axis: images and labels (1, D, H, W) float32 / int64, flow (3, D, H, W)."""
        import torch

        return {
            "moving": torch.from_numpy(np.ascontiguousarray(self.moving))[None].float(),
            "fixed": torch.from_numpy(np.ascontiguousarray(self.fixed))[None].float(),
            "moving_labels": torch.from_numpy(np.ascontiguousarray(self.moving_labels))[None].long(),
            "fixed_labels": torch.from_numpy(np.ascontiguousarray(self.fixed_labels))[None].long(),
            "flow": torch.from_numpy(np.ascontiguousarray(self.flow)).float(),
        }

    def __getitem__(self, key: str) -> Any:  # dict-style access
        return getattr(self, key)


def _finish_pair(
    moving: np.ndarray,
    moving_labels: np.ndarray,
    rng: np.random.Generator,
    max_disp: float,
    scale: float,
    diffeomorphic: bool,
    augment: bool,
    meta: dict[str, Any],
    fixed_override: Callable[[np.ndarray], np.ndarray] | None = None,
) -> SyntheticPair:
    shape = moving.shape
    flow = random_displacement(shape, rng, max_disp=max_disp, scale=scale, diffeomorphic=diffeomorphic)
    fixed_labels = warp_numpy(moving_labels, flow, order=0)
    fixed = warp_numpy(moving, flow, order=1) if fixed_override is None else fixed_override(fixed_labels)
    if augment:
        moving = augment_intensity(moving, rng)
        fixed = augment_intensity(fixed, rng)
    return SyntheticPair(
        moving=np.ascontiguousarray(moving, dtype=np.float32),
        fixed=np.ascontiguousarray(np.clip(fixed, 0, 1), dtype=np.float32),
        moving_labels=moving_labels.astype(np.int32),
        fixed_labels=fixed_labels.astype(np.int32),
        flow=flow,
        meta=meta,
    )


def synth_pair(
    shape: tuple[int, int, int] = (64, 64, 64),
    seed: Seed = 0,
    n_labels: int = 16,
    max_disp: float = 4.0,
    flow_scale: float = 16.0,
    label_scale: float = 12.0,
    diffeomorphic: bool = True,
    augment: bool = True,
    independent_contrast: bool = False,
) -> SyntheticPair:
    """SynthMorph-style pair at any grid ``shape``.

    ``independent_contrast=True`` synthesises the fixed image from the warped labels with new random
    intensities (multi-contrast training); then only the labels, not the intensities, follow ``fixed =
    warp(moving, flow)``.
    """
    shape = tuple(int(s) for s in shape)
    rng = _rng(seed)
    labels = random_label_map(shape, n_labels, rng, scale=label_scale)
    moving = labels_to_image(labels, rng)
    override = (lambda fl: labels_to_image(fl, rng)) if independent_contrast else None
    meta = {
        "kind": "synth",
        "seed": seed if not isinstance(seed, np.random.Generator) else None,
        "max_disp": max_disp,
        "diffeomorphic": diffeomorphic,
    }
    return _finish_pair(moving, labels, rng, max_disp, flow_scale, diffeomorphic, augment, meta, override)


# ------------------------------------------------------------------------------------------------------------
# MNI152 template (nilearn, offline)
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TemplateVolumes:
    """MNI152 2009 on a model grid: image (D, H, W) float32 [0, 1], labels int32 (0 bg, 1 CSF/other, 2 GM, 3
    WM).
    """

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray  # (4, 4) RAS grid


LABEL_NAMES = {0: "background", 1: "csf/other brain", 2: "gray matter", 3: "white matter"}


_MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@functools.lru_cache(maxsize=1)
def _mni_native() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNI152 2009 T1, GM, WM at 1 mm, each rescaled to max 1 (what nilearn's ``load_mni152_*`` return).

    Reads the files nilearn ships in ``nilearn/datasets/data`` directly (fast: importing ``nilearn.datasets``
    takes seconds); falls back to ``nilearn.datasets.load_mni152_*_template(resolution=1)``. Never downloads.
    """
    import importlib.util
    from pathlib import Path

    import nibabel as nib

    spec = importlib.util.find_spec("nilearn")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data" if spec else None
    if folder is not None and all((folder / f).is_file() for f in _MNI_FILES.values()):
        imgs = [nib.load(str(folder / _MNI_FILES[k])) for k in ("t1", "gm", "wm")]
    else:  # pragma: no cover - other nilearn layouts
        from nilearn import datasets

        imgs = [
            datasets.load_mni152_template(resolution=1),
            datasets.load_mni152_gm_template(resolution=1),
            datasets.load_mni152_wm_template(resolution=1),
        ]
    arrays = []
    for img in imgs:
        a = np.asarray(img.get_fdata(), dtype=np.float32)
        arrays.append(a / a.max())
    return arrays[0], arrays[1], arrays[2], np.asarray(imgs[0].affine, dtype=np.float64)


def mni152_images(resolution: int = 1):
    """MNI152 2009 (T1, GM, WM) as nibabel images, offline. ``resolution`` 1 is nilearn's data as shipped;
    other values are resampled here (trilinear, RAS grid with the same FOV centre)."""
    import nibabel as nib

    t1, gm, wm, aff = _mni_native()
    if resolution == 1:
        return tuple(nib.Nifti1Image(a.copy(), aff) for a in (t1, gm, wm))
    if float(resolution).is_integer():  # anti-aliased block average
        *arrays, grid = _block_average([t1, gm, wm], aff, int(resolution))
        return tuple(nib.Nifti1Image(np.ascontiguousarray(a, dtype=np.float32), grid) for a in arrays)
    shape = tuple(int(np.ceil((s - 1) / resolution)) + 1 for s in t1.shape)
    grid = np.eye(4)
    grid[:3, :3] = np.diag([float(resolution)] * 3)
    grid[:3, 3] = aff[:3, 3]
    out = resample_to_grid(np.stack([t1, gm, wm]), aff, shape, grid, order=1)
    return tuple(nib.Nifti1Image(a, grid) for a in out)


def _block_average(arrays: list[np.ndarray], affine: np.ndarray, k: int) -> list:
    """Anti-aliased k-fold downsampling (mean over k^3 blocks) with the matching affine; k <= 1: unchanged."""
    if k <= 1:
        return [*arrays, affine]
    shape = tuple((s // k) * k for s in arrays[0].shape)
    out = []
    for a in arrays:
        a = a[: shape[0], : shape[1], : shape[2]]
        out.append(a.reshape(shape[0] // k, k, shape[1] // k, k, shape[2] // k, k).mean(axis=(1, 3, 5)))
    new_aff = affine.copy()
    new_aff[:3, :3] = affine[:3, :3] * k
    new_aff[:3, 3] = affine[:3, :3] @ np.full(3, (k - 1) / 2) + affine[:3, 3]
    return [*out, new_aff]


@functools.lru_cache(maxsize=4)
def _template_cached(
    shape: tuple[int, int, int], spacing: tuple[float, float, float] | None
) -> TemplateVolumes:
    t1, gm, wm, aff = _mni_native()
    brain = np.argwhere(t1 > 0)
    lo_w = aff[:3, :3] @ brain.min(0) + aff[:3, 3]
    hi_w = aff[:3, :3] @ brain.max(0) + aff[:3, 3]
    lo_w, hi_w = np.minimum(lo_w, hi_w), np.maximum(lo_w, hi_w)
    if spacing is None:  # isotropic spacing fitting the brain (+8% margin) into the grid
        s = float(np.max((hi_w - lo_w) * 1.08 / (np.asarray(shape) - 1)))
        spacing = (s, s, s)
    sp = np.asarray(spacing, dtype=np.float64)
    t1, gm, wm, mask, aff = _block_average([t1, gm, wm, (t1 > 0).astype(np.float32)], aff, int(sp.min()))
    grid = np.eye(4)
    grid[:3, :3] = np.diag(sp)
    grid[:3, 3] = (lo_w + hi_w) / 2 - sp * (np.asarray(shape) - 1) / 2
    stack = np.stack([t1, gm, wm])
    img, gm_r, wm_r = resample_to_grid(stack, aff, shape, grid, order=1)
    brain_r = resample_to_grid(mask, aff, shape, grid, order=1) > 0.5
    probs = np.stack([np.clip(1.0 - gm_r - wm_r, 0, 1), gm_r, wm_r])
    labels = (np.argmax(probs, axis=0) + 1).astype(np.int32) * brain_r
    img = img * brain_r
    img, _, _ = normalise_intensity(img, (0.5, 99.5))
    img.setflags(write=False)
    labels.setflags(write=False)
    return TemplateVolumes(image=img, labels=labels.astype(np.int32), affine=grid)


def load_template(
    shape: tuple[int, int, int] = (64, 64, 64), spacing: tuple[float, float, float] | None = None
) -> TemplateVolumes:
    """MNI152 T1 + 4-class labels resampled to a RAS grid of ``shape`` centred on the brain.

    ``spacing`` (mm) defaults to the isotropic spacing that fits the brain into the grid. Works offline
    (nilearn's packaged files; never downloads). Arrays are read-only (cached).
    """
    sp = None if spacing is None else tuple(float(s) for s in spacing)
    return _template_cached(tuple(int(s) for s in shape), sp)


def template_pair(
    shape: tuple[int, int, int] = (64, 64, 64),
    seed: Seed = 0,
    spacing: tuple[float, float, float] | None = None,
    max_disp: float = 4.0,
    subject_disp: float = 3.0,
    flow_scale: float = 16.0,
    diffeomorphic: bool = True,
    augment: bool = True,
) -> SyntheticPair:
    """Pair built from the MNI152 template: moving = template under a random "subject" deformation
    (``subject_disp`` voxels), fixed = moving warped by the returned ``flow`` (``max_disp`` voxels)."""
    rng = _rng(seed)
    tpl = load_template(shape, spacing)
    moving = np.array(tpl.image, dtype=np.float32)
    labels = np.array(tpl.labels, dtype=np.int32)
    if subject_disp > 0:
        phi = random_displacement(
            tpl.image.shape, rng, max_disp=subject_disp, scale=flow_scale, diffeomorphic=diffeomorphic
        )
        moving = warp_numpy(moving, phi, order=1)
        labels = warp_numpy(labels, phi, order=0)
    meta = {
        "kind": "template",
        "seed": seed if not isinstance(seed, np.random.Generator) else None,
        "max_disp": max_disp,
        "affine": tpl.affine,
    }
    return _finish_pair(moving, labels, rng, max_disp, flow_scale, diffeomorphic, augment, meta)


# ------------------------------------------------------------------------------------------------------------
# iteration
# ------------------------------------------------------------------------------------------------------------
try:  # torch Dataset base when torch is available (it is a core dependency)
    from torch.utils.data import Dataset as _Dataset
except ImportError:  # pragma: no cover
    _Dataset = object  # type: ignore[assignment,misc]


class SyntheticPairs(_Dataset):  # type: ignore[misc,valid-type]
    """Map-style dataset of ``length`` synthetic pairs; item i is generated from seed ``(seed, epoch, i)``.

    kind: "synth" (random label maps), "template" (MNI152-based) or "mix" (alternating). Items are dicts of
    tensors (see :meth:`SyntheticPair.to_tensors`), so the default DataLoader collate works. ``set_epoch(e)``
    draws new pairs per epoch (validation sets simply never call it).
    """

    def __init__(
        self,
        length: int = 100,
        shape: tuple[int, int, int] = (64, 64, 64),
        seed: int = 0,
        kind: Literal["synth", "template", "mix"] = "synth",
        **kwargs: Any,
    ) -> None:
        if kind not in ("synth", "template", "mix"):
            raise ValueError(f"kind must be 'synth', 'template' or 'mix', got {kind!r}")
        self.length = int(length)
        self.shape = tuple(int(s) for s in shape)
        self.seed = int(seed)
        self.kind = kind
        self.kwargs = kwargs
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def pair(self, index: int) -> SyntheticPair:
        if not 0 <= index < self.length:
            raise IndexError(index)
        seed = (self.seed, self.epoch, int(index))
        use_template = self.kind == "template" or (self.kind == "mix" and index % 2 == 1)
        if use_template:
            return template_pair(self.shape, seed, **self.kwargs)
        return synth_pair(self.shape, seed, **self.kwargs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.pair(index).to_tensors()
        item["index"] = int(index)
        return item


def iter_pairs(
    n: int | None = None,
    shape: tuple[int, int, int] = (64, 64, 64),
    seed: int = 0,
    kind: Literal["synth", "template", "mix"] = "synth",
    **kwargs: Any,
):
    """Yield ``n`` (or infinitely many) :class:`SyntheticPair` s, deterministic for a given seed."""
    i = 0
    ds = SyntheticPairs(1, shape, seed, kind, **kwargs)
    while n is None or i < n:
        ds.length = i + 1
        yield ds.pair(i)
        i += 1
