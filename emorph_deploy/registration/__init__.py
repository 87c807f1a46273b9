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

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emorph_deploy.registration.affine import AffineConfig, AffineResult, affine_prealign
    from emorph_deploy.registration.defaults import DEFAULTS, RegistrationDefaults
    from emorph_deploy.registration.native import (
        NativeWarp,
        itk_displacement_image,
        voxel_flow,
        voxel_flow_image,
        warp_to_native,
    )
    from emorph_deploy.registration.pipeline import OUTPUT_FILES, Registrar, Result, default_artifact

#: public name -> its module; imported on first use so that the light submodules (``defaults``) do not pull
#: torch into the CLI's start-up
_EXPORTS = {
    "AffineConfig": "affine",
    "AffineResult": "affine",
    "affine_prealign": "affine",
    "DEFAULTS": "defaults",
    "RegistrationDefaults": "defaults",
    "NativeWarp": "native",
    "itk_displacement_image": "native",
    "voxel_flow": "native",
    "voxel_flow_image": "native",
    "warp_to_native": "native",
    "OUTPUT_FILES": "pipeline",
    "Registrar": "pipeline",
    "Result": "pipeline",
    "default_artifact": "pipeline",
}

__all__ = [
    "DEFAULTS",
    "OUTPUT_FILES",
    "AffineConfig",
    "AffineResult",
    "NativeWarp",
    "Registrar",
    "RegistrationDefaults",
    "Result",
    "affine_prealign",
    "default_artifact",
    "itk_displacement_image",
    "voxel_flow",
    "voxel_flow_image",
    "warp_to_native",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
