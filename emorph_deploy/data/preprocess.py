"""The single preprocessing definition shared by training, calibration and inference (saved in checkpoints).

Pipeline for an intensity image: validate -> robust intensity normalisation on the native voxels (percentiles
of the nonzero voxels mapped to [0, 1], clipped) -> trilinear resampling in world coordinates onto the model
grid: a RAS-aligned grid of ``grid_shape`` voxels at ``spacing_mm`` centred on the reference (fixed) image's
field of view. Label maps are resampled with nearest neighbour and keep their values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from emorph_deploy.data.nifti import ImageLike, as_image, as_label_image
from emorph_deploy.data.resample import model_grid_affine, resample_to_grid
from emorph_deploy.errors import InputError

__all__ = ["PRESETS", "PreparedVolume", "Preprocessing", "Volume", "normalise_intensity"]

FORMAT = "emorph-preprocessing/1"


def normalise_intensity(
    data: np.ndarray,
    percentiles: tuple[float, float] = (0.5, 99.5),
    nonzero_only: bool = True,
    clip: bool = True,
) -> tuple[np.ndarray, float, float]:
    """Map the ``percentiles`` of the (nonzero) voxels to [0, 1]; return ``(float32 data, lo, hi)``.

    Falls back to the full min/max when the percentiles coincide (e.g. binary images); a constant image raises
    InputError.
    """
    data = np.asarray(data, dtype=np.float32)
    flat = data.ravel(order="K")  # a view for C- and Fortran-ordered volumes (order is irrelevant here)
    sample = flat[flat != 0] if nonzero_only else flat
    if sample.size == 0:
        sample = flat
    lo, hi = (float(v) for v in np.percentile(sample, percentiles))
    if not hi > lo:
        lo, hi = float(data.min()), float(data.max())
    if not hi > lo:
        raise InputError(
            f"image: expected an image with contrast, got a constant volume ({lo:g}); "
            "fix: check that the right file was passed"
        )
    out = (data - np.float32(lo)) / np.float32(hi - lo)
    if clip:
        np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False), lo, hi


@dataclass
class PreparedVolume:
    """A volume on the model grid.

    ``data``: (D, H, W) float32 in [0, 1] for images, int32 label values for label maps. ``affine``: the model
    grid's voxel-to-world (RAS mm) affine. ``source_affine`` / ``source_shape``: the native grid it came from
    (use them to map results back). ``intensity_range``: the (lo, hi) mapped to (0, 1).
    """

    data: np.ndarray  # (D, H, W)
    affine: np.ndarray  # (4, 4) model grid
    source_affine: np.ndarray  # (4, 4) native grid
    source_shape: tuple[int, int, int]
    is_label: bool = False
    intensity_range: tuple[float, float] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    def tensor(self):
        """torch tensor (1, D, H, W): float32 for images, int64 for labels."""
        import torch

        t = torch.from_numpy(np.ascontiguousarray(self.data))
        return (t.long() if self.is_label else t.float())[None]


#: Name used in docs/conventions.md.
Volume = PreparedVolume


@dataclass(frozen=True)
class Preprocessing:
    """Model-grid definition and intensity normalisation. All defaults live here.

    grid_shape: (D, H, W) voxels of the model grid (array axes 0, 1, 2 = R, A, S).
    spacing_mm: voxel size of the model grid in mm.
    orientation: model grid axes; only "RAS" is supported.
    percentiles: intensity percentiles (of nonzero voxels if ``nonzero_only``) mapped to 0 and 1.
    clip: clip normalised intensities to [0, 1].
    """

    grid_shape: tuple[int, int, int] = (160, 192, 224)
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    orientation: str = "RAS"
    percentiles: tuple[float, float] = (0.5, 99.5)
    nonzero_only: bool = True
    clip: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid_shape", tuple(int(s) for s in self.grid_shape))
        object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        if len(self.grid_shape) != 3 or min(self.grid_shape) < 2:
            raise InputError(
                f"preprocessing: expected grid_shape of 3 sizes >= 2, got {self.grid_shape}; "
                "fix: e.g. (160, 192, 224)"
            )
        if len(self.spacing_mm) != 3 or not all(np.isfinite(s) and s > 0 for s in self.spacing_mm):
            raise InputError(
                f"preprocessing: expected 3 positive spacings in mm, got {self.spacing_mm}; "
                "fix: e.g. (1, 1, 1)"
            )
        if self.orientation != "RAS":
            raise InputError(
                f"preprocessing: expected orientation 'RAS', got {self.orientation!r}; fix: use 'RAS'"
            )
        lo, hi = self.percentiles if len(self.percentiles) == 2 else (1.0, 0.0)
        if not (len(self.percentiles) == 2 and 0.0 <= lo < hi <= 100.0):
            raise InputError(
                f"preprocessing: expected percentiles (lo, hi) with 0 <= lo < hi <= 100, got "
                f"{self.percentiles}; fix: e.g. (0.5, 99.5)"
            )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        d = dict(d)
        fmt = d.pop("format", FORMAT)
        if fmt != FORMAT:
            raise InputError(
                f"preprocessing: expected format {FORMAT!r}, got {fmt!r}; fix: use a checkpoint "
                "written by a compatible emorph version"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(
                f"preprocessing: expected keys {sorted(known)}, got unknown {unknown}; fix: use a "
                "checkpoint written by a compatible emorph version"
            )
        return cls(**d)

    @classmethod
    def preset(cls, name: str) -> Preprocessing:
        """Named presets: ``"1mm"`` (160x192x224, default) and ``"2mm"`` (80x96x112 at 2 mm)."""
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise InputError(
                f"preprocessing: expected a preset in {sorted(PRESETS)}, got {name!r}; fix: pick one of those"
            ) from None

    # ------------------------------------------------------------------ grid
    def grid_affine(self, reference: Any) -> np.ndarray:
        """Model grid affine centred on the FOV of ``reference`` (nibabel image or (array-or-shape,
        affine))."""
        return model_grid_affine(reference, self.grid_shape, self.spacing_mm)

    def model_grid_affine(self, reference_img: Any) -> np.ndarray:
        """Alias of :meth:`grid_affine` (the name used in docs/conventions.md)."""
        return self.grid_affine(reference_img)

    # ------------------------------------------------------------------ apply
    def normalise(self, data: np.ndarray) -> tuple[np.ndarray, float, float]:
        return normalise_intensity(data, self.percentiles, self.nonzero_only, self.clip)

    def apply(
        self, img: ImageLike, reference: Any = None, is_label: bool = False, name: str | None = None
    ) -> PreparedVolume:
        """Validate ``img`` and bring it onto the model grid defined by ``reference`` (default: ``img``
        itself).

        ``img``/``reference``: path, nibabel image or (array, affine) pair. For registration pass the fixed
        image as ``reference`` for both fixed and moving. ``reference`` may also be a 4x4 grid affine already
        computed by :meth:`grid_affine`.
        """
        if is_label:
            vol = as_label_image(img, name=name or "label map")
        else:
            vol = as_image(img, name=name or "image")
        src = np.asanyarray(vol.dataobj)
        src_affine = np.asarray(vol.affine, dtype=np.float64)
        if reference is None:
            grid = self.grid_affine((src.shape, src_affine))
        elif isinstance(reference, np.ndarray) and reference.shape == (4, 4):
            grid = np.asarray(reference, dtype=np.float64)
        elif isinstance(reference, str) or hasattr(reference, "__fspath__"):
            grid = self.grid_affine(as_image(reference, name="reference"))
        else:
            grid = self.grid_affine(reference)
        if is_label:
            data = resample_to_grid(src, src_affine, self.grid_shape, grid, order=0, cval=0)
            data = data.astype(np.int32, copy=False)
            rng = None
        else:
            norm, lo, hi = self.normalise(src)
            data = resample_to_grid(norm, src_affine, self.grid_shape, grid, order=1, cval=0.0)
            np.clip(data, 0.0, 1.0, out=data)
            rng = (lo, hi)
        return PreparedVolume(
            data=np.ascontiguousarray(data),
            affine=grid,
            source_affine=src_affine,
            source_shape=tuple(int(s) for s in src.shape[:3]),
            is_label=is_label,
            intensity_range=rng,
        )


PRESETS: dict[str, dict[str, Any]] = {
    "1mm": {"grid_shape": (160, 192, 224), "spacing_mm": (1.0, 1.0, 1.0)},
    "2mm": {"grid_shape": (80, 96, 112), "spacing_mm": (2.0, 2.0, 2.0)},
}
