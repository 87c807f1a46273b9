"""Data layer: NIfTI IO with validation, RAS/world-coordinate resampling, the shared Preprocessing, synthetic
pairs with known deformations, and NIfTI datasets.

Heavy pieces (synthetic generator, datasets, demo) are imported lazily from their modules:
``emorph_deploy.data.synthetic``, ``emorph_deploy.data.datasets``, ``emorph_deploy.data.demo``.
"""

from __future__ import annotations

from emorph_deploy.data.nifti import (
    as_image,
    as_label_image,
    check_affine,
    label_dtype,
    load_label_map,
    load_volume,
    save_nifti_atomic,
)
from emorph_deploy.data.orientation import (
    RAS_TO_LPS,
    affine_ras_to_lps,
    reorient_array_to_ras,
    reorient_to_ras,
    voxel_sizes,
    voxel_to_world,
    world_to_voxel,
)
from emorph_deploy.data.preprocess import PRESETS, PreparedVolume, Preprocessing, Volume, normalise_intensity
from emorph_deploy.data.resample import (
    model_grid_affine,
    native_displacement_to_voxel_flow,
    resample_displacement,
    resample_to_grid,
    voxel_flow_to_world,
    world_flow_to_voxel,
)

__all__ = [
    "PRESETS",
    "RAS_TO_LPS",
    "PreparedVolume",
    "Preprocessing",
    "Volume",
    "affine_ras_to_lps",
    "as_image",
    "as_label_image",
    "check_affine",
    "label_dtype",
    "load_label_map",
    "load_volume",
    "model_grid_affine",
    "native_displacement_to_voxel_flow",
    "normalise_intensity",
    "reorient_array_to_ras",
    "reorient_to_ras",
    "resample_displacement",
    "resample_to_grid",
    "save_nifti_atomic",
    "voxel_flow_to_world",
    "voxel_sizes",
    "voxel_to_world",
    "world_flow_to_voxel",
    "world_to_voxel",
]
