"""Native-space registration: the embeddable :class:`Registrar` API, ITK transform export, affine
pre-alignment.

Example::

    from emorph_deploy.registration import Registrar

    reg = Registrar.load("checkpoints/em-23-hires.json", backend="auto")  # once; engine kept warm
    res = reg.register("fixed.nii.gz", "moving.nii.gz", labels="moving_seg.nii.gz")
    res.warped, res.displacement, res.warped_labels, res.qc  # nibabel images + dict, nothing on disk
    res.save("out/", force=False)  # warped, warped_labels, displacement (ITK), qc.json, qc.png
"""

from __future__ import annotations

from emorph_deploy.registration.affine import AffineConfig, AffineResult, affine_prealign
from emorph_deploy.registration.native import (
    NativeWarp,
    itk_displacement_image,
    voxel_flow,
    voxel_flow_image,
    warp_to_native,
)
from emorph_deploy.registration.pipeline import OUTPUT_FILES, Registrar, Result, default_artifact

__all__ = [
    "OUTPUT_FILES",
    "AffineConfig",
    "AffineResult",
    "NativeWarp",
    "Registrar",
    "Result",
    "affine_prealign",
    "default_artifact",
    "itk_displacement_image",
    "voxel_flow",
    "voxel_flow_image",
    "warp_to_native",
]
