"""Affine transform files ITK, ANTs and SimpleITK exchange (``.mat``, ``.txt``/``.tfm``), read into and
written from the RAS maths of :mod:`emorph_deploy.data.orientation`.

Every transform here maps points of the output (fixed / reference) space to the input (moving) space, in
millimetres — ITK's convention for resampling.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from emorph_deploy.data.orientation import itk_params_to_ras, ras_to_itk_params
from emorph_deploy.errors import InputError

__all__ = ["read_itk_affine", "write_itk_affine"]

#: ITK's name for a 3D double-precision affine (the variable name inside ``.mat`` files).
ITK_AFFINE_NAME = "AffineTransform_double_3_3"
_AFFINE_NAMES = re.compile(r"^(AffineTransform|MatrixOffsetTransformBase)_(double|float)_3_3$")


def write_itk_affine(path: str | os.PathLike, matrix: np.ndarray) -> Path:
    """Write a 4x4 RAS point map (output world -> input world) as an ITK ``AffineTransform_double_3_3``
    file: MATLAB v4 binary for ``.mat`` (what ANTs writes), ITK's text format for ``.txt``/``.tfm``."""
    params, fixed = ras_to_itk_params(matrix)
    p = Path(path)
    if p.suffix.lower() == ".mat":
        from scipy.io import savemat

        savemat(str(p), {ITK_AFFINE_NAME: params[:, None], "fixed": fixed[:, None]}, format="4")
    else:
        p.write_text(
            "#Insight Transform File V1.0\n#Transform 0\n"
            f"Transform: {ITK_AFFINE_NAME}\n"
            f"Parameters: {' '.join(repr(float(v)) for v in params)}\n"
            f"FixedParameters: {' '.join(repr(float(v)) for v in fixed)}\n"
        )
    return p


def read_itk_affine(path: str | os.PathLike, *, name: str = "affine") -> np.ndarray:
    """An ITK/ANTs affine file (``.mat`` MATLAB v4 as ANTs writes it, or ``.txt``/``.tfm`` text) as a 4x4
    float64 RAS point map (output world -> input world); InputError for anything else."""
    p = Path(path)
    if not p.is_file():
        raise InputError(
            f"{name}: expected an existing ITK affine file, got a missing path {p}; fix: check it"
        )
    try:
        params, fixed = _read_mat(p) if p.suffix.lower() == ".mat" else _read_text(p)
        return itk_params_to_ras(params, fixed)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"{name}: expected an ITK AffineTransform_double_3_3 file (.mat/.txt/.tfm), got {p.name} "
            f"({type(exc).__name__}: {exc}); fix: pass an affine written by ANTs, ITK, SimpleITK or emorph"
        ) from exc


def _read_mat(p: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    mat = loadmat(str(p))
    keys = [k for k in mat if _AFFINE_NAMES.match(k)]
    if not keys:
        raise ValueError(f"no 3D affine variable among {sorted(k for k in mat if not k.startswith('__'))}")
    return np.asarray(mat[keys[0]], dtype=np.float64).ravel(), np.asarray(
        mat.get("fixed", np.zeros(3)), dtype=np.float64
    ).ravel()


def _read_text(p: Path) -> tuple[np.ndarray, np.ndarray]:
    fields: dict[str, str] = {}
    for line in p.read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("Transform", "Parameters", "FixedParameters"):
            fields.setdefault(key.strip(), value.strip())
    if not _AFFINE_NAMES.match(fields.get("Transform", "")):
        raise ValueError(f"the first transform is {fields.get('Transform', 'missing')!r}, not a 3D affine")
    params = np.array(fields["Parameters"].split(), dtype=np.float64)
    fixed = np.array(fields.get("FixedParameters", "0 0 0").split(), dtype=np.float64)
    return params, fixed
