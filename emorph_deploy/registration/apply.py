"""Apply saved transforms to any image: ``emorph apply`` (antsApplyTransforms' transform-list semantics).

A transform list ``[T1, T2, ..., Tn]`` maps every reference-grid point ``p`` (world mm) to the image's world
as ``Tn(...T2(T1(p)))``: the FIRST listed transform is applied to the points first, exactly as
``antsApplyTransforms -t T1 -t T2`` and ``ants.apply_transforms(transformlist=[T1, T2])`` do (ANTs' "the
last transform is applied first" speaks of the image: it is the pull-back of the same map). So ANTs'
registration output ``[Warp, Affine]`` reads ``p -> Affine(Warp(p))`` and its inverse ``[[Affine,1],
InverseWarp]``. (ITK's ``CompositeTransform`` applies its last-added transform to the points first: its
list is this one reversed.) Transforms are

* ITK/ANTs displacement fields (``displacement.nii.gz``, ``inverse_displacement.nii.gz``): 5D
  (X, Y, Z, 1, 3) vector NIfTI, LPS mm, ``T(p) = p + d(p)`` with ``d`` trilinear and border-extended
  (ITK's ``DisplacementFieldTransform``);
* ITK affines (``affine.mat`` and ``.txt``/``.tfm``), read by :func:`emorph_deploy.data.transforms.
  read_itk_affine` (output world -> input world); ``[affine.mat,1]`` (or ``(path, True)``) uses the
  inverse, as ANTs does.

``register`` composes its affine pre-alignment INTO ``displacement.nii.gz`` (``d(p) = T(p + u(p)) - p``)
and ``inverse_displacement.nii.gz`` (its exact inverse); ``affine.mat`` is the pre-alignment alone. So
``[displacement.nii.gz]`` on the fixed grid reproduces ``warped.nii.gz``, ``[inverse_displacement.nii.gz]``
on the moving grid takes fixed-space images (an atlas's labels) to the moving image, and ``affine.mat`` is
never listed together with either field (that would apply the pre-alignment twice).

The image is sampled with :func:`warp_to_native`'s rules, so the result reproduces ``warped.nii.gz`` /
``warped_labels.nii.gz``: ``linear`` is trilinear, border-extended up to half a voxel outside the image and
0 beyond (ITK's convention); ``nearest`` gathers the nearest voxel's value in the image's own dtype;
``label`` is ANTs' ``GenericLabel`` with linear weights: of the labels at the 8 surrounding voxels, the one
with the largest summed trilinear weight (ties: the smaller label), values and dtype kept.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from emorph_deploy.choices import Interp
from emorph_deploy.data.orientation import RAS_TO_LPS, voxel_sizes
from emorph_deploy.errors import InputError
from emorph_deploy.registration.native import (
    _add_matvec,
    _affine_coords_cf,
    _as_c_tensor,
    _channel_last,
    _nearest_take,
)
from emorph_deploy.sampling import grid_sample_3d, index_to_grid

__all__ = ["AFFINE_SUFFIXES", "FieldTransform", "apply_transforms", "load_transform", "parse_transform"]

AFFINE_SUFFIXES = (".mat", ".txt", ".tfm")
#: ``[file,1]`` / ``[file,0]``: ANTs' inverse syntax
_BRACKET = re.compile(r"^\[\s*(?P<path>.+?)\s*,\s*(?P<inv>[01])\s*\]$")
#: Output voxels per slab (linear / nearest; the label vote uses an eighth: it keeps 8 corners per voxel).
_SLAB_VOXELS = 1 << 20
#: A displacement field sampled this far outside its grid (voxels) is off its domain.
_OUTSIDE_VOXELS = 1.0
#: More than this fraction of a field's points off its domain is a wrong grid (an error, not a result).
_MAX_OUTSIDE = 0.1
_LPS = np.ascontiguousarray(RAS_TO_LPS[:3, :3])


@dataclass(frozen=True)
class FieldTransform:
    """A displacement field: ``p -> p + d(p)``; ``field`` (1, 3, K, J, I) float32 LPS mm as a C-ordered
    torch tensor of the file's (I, J, K) array, ``affine`` the file's voxel (I, J, K) -> RAS world map."""

    name: str
    field: torch.Tensor
    affine: np.ndarray
    shape: tuple[int, int, int]

    def to_grid(self) -> np.ndarray:
        """4x4 map world RAS mm -> ``grid_sample`` coordinates of :attr:`field` (its (K, J, I) tensor)."""
        reverse = np.eye(4)[[2, 1, 0, 3]]  # (i, j, k) -> (k, j, i)
        return index_to_grid(self.field.shape[2:]) @ reverse @ np.linalg.inv(self.affine)


def parse_transform(spec: Any) -> tuple[Path, bool]:
    """``(path, invert)`` of a transform given as a path, ``"[path,1]"`` (ANTs' inverse syntax) or a
    ``(path, invert)`` pair."""
    if isinstance(spec, tuple | list):
        if len(spec) != 2:
            raise InputError(
                f"transform: expected a path or a (path, invert) pair, got {spec!r}; fix: e.g. "
                "('affine.mat', True)"
            )
        return Path(spec[0]), bool(spec[1])
    text = os.fspath(spec)
    m = _BRACKET.match(text.strip())
    if m:
        return Path(m["path"]), m["inv"] == "1"
    return Path(text), False


def load_transform(spec: Any) -> np.ndarray | FieldTransform:
    """One transform of a list: a 4x4 RAS point map (output world -> input world; inverted for ``[f,1]``)
    or a :class:`FieldTransform`; InputError for a missing file or anything else."""
    path, invert = parse_transform(spec)
    name = f"transform {path.name}"
    if not path.is_file():
        raise InputError(
            f"{name}: expected an existing transform file, got a missing path {path}; fix: check it"
        )
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() in AFFINE_SUFFIXES:
        from emorph_deploy.data.transforms import read_itk_affine

        m = read_itk_affine(path, name=name)
        if invert:
            m = np.linalg.inv(m)
        return m
    if not suffixes.endswith((".nii", ".nii.gz")):
        raise InputError(
            f"{name}: expected an ITK/ANTs displacement field (.nii/.nii.gz) or an ITK affine "
            f"({'/'.join(AFFINE_SUFFIXES)}), got {path.name}; fix: pass displacement.nii.gz, "
            "inverse_displacement.nii.gz or affine.mat"
        )
    if invert:
        raise InputError(
            f"{name}: expected [file,1] only for an affine, got it for a displacement field; fix: list "
            "inverse_displacement.nii.gz (the field's inverse) instead"
        )
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as exc:
        raise InputError(
            f"{name}: expected a readable NIfTI displacement field, got {type(exc).__name__}: {exc}; "
            "fix: pass a field written by emorph register or ANTs"
        ) from exc
    if len(shape) != 5 or shape[3] != 1 or shape[4] != 3:
        hint = (
            "voxel_flow.nii.gz is Learn2Reg voxels, not ITK mm: pass displacement.nii.gz"
            if len(shape) == 4 and shape[3] == 3
            else "list the transforms first and the image to warp last"
            if len(shape) == 3
            else "pass an ITK/ANTs displacement field"
        )
        raise InputError(
            f"{name}: expected an ITK/ANTs displacement field (5D X,Y,Z,1,3 vector NIfTI in LPS mm), got "
            f"shape {shape}; fix: {hint}"
        )
    data = np.asarray(img.dataobj, dtype=np.float32).reshape(*shape[:3], 3)  # (I, J, K, 3)
    if not np.isfinite(data).all():
        raise InputError(f"{name}: expected finite displacements, got NaN/Inf; fix: re-create the field")
    field = torch.from_numpy(np.ascontiguousarray(data.transpose(3, 2, 1, 0)))[None]  # (1, 3, K, J, I)
    return FieldTransform(
        name=path.name, field=field, affine=np.asarray(img.affine, dtype=np.float64), shape=shape[:3]
    )


def _load_image(image: Any, interp: Interp) -> tuple[nib.Nifti1Image, bool]:
    """(validated image, values kept in their own dtype): ``label`` a label map; ``nearest`` a label map
    when the image is stored as unscaled integers (values and dtype kept), else float32 like ``linear``."""
    from emorph_deploy.data.nifti import as_image, as_label_image

    if interp is Interp.label:
        return as_label_image(image, name="image"), True
    if interp is Interp.nearest:
        try:
            hdr = image.header if isinstance(image, nib.spatialimages.SpatialImage) else None
            if hdr is None and isinstance(image, str | os.PathLike):
                hdr = nib.load(os.fspath(image)).header
            slope, inter = hdr.get_slope_inter() if hdr is not None else (None, None)
            integer = hdr is not None and np.dtype(hdr.get_data_dtype()).kind in "iub"
            unscaled = slope in (None, 1.0) and inter in (None, 0.0)
        except Exception:  # unreadable: as_image reports it in one line
            integer = unscaled = False
        if integer and unscaled:
            return as_label_image(image, name="image"), True
    return as_image(image, name="image"), False


def apply_transforms(
    transforms: Sequence[Any],
    image: Any,
    reference: Any,
    interp: Interp | str = Interp.linear,
) -> nib.Nifti1Image:
    """Warp ``image`` onto ``reference``'s grid through ``transforms`` (ANTs order: the first is applied to
    the points first; paths, ``"[affine.mat,1]"``, ``(path, invert)`` pairs, 4x4 RAS point maps or
    :class:`FieldTransform`). ``image``/``reference``: paths, nibabel images or ``(array, affine)`` pairs.

    Returns the image on the reference grid with the reference header (as ``warped.nii.gz``): float32 for
    ``linear``; for ``nearest``/``label`` the image's values and on-disk dtype, and its intent.
    InputError for a bad transform, image or reference, or a displacement field sampled mostly off its grid
    (the wrong ``reference``)."""
    from emorph_deploy.data.nifti import as_image, label_dtype
    from emorph_deploy.registration.pipeline import like_fixed

    interp = Interp.coerce(interp, "interp")
    if not transforms:
        raise InputError(
            "transforms: expected at least one transform, got none; fix: e.g. emorph apply "
            "displacement.nii.gz IMAGE --reference FIXED"
        )
    chain = [t if isinstance(t, FieldTransform) else _as_matrix(t) for t in transforms]
    ref_img = as_image(reference, name="reference")
    img, keep_values = _load_image(image, interp)
    data = _warp(chain, ref_img.shape[:3], ref_img.affine, np.asanyarray(img.dataobj), img.affine, interp)
    if keep_values:
        return like_fixed(data, ref_img, label_dtype(img), "emorph apply", intent=img.header)
    return like_fixed(data, ref_img, np.float32, "emorph apply", intensity=True)


def _as_matrix(t: Any) -> np.ndarray | FieldTransform:
    if isinstance(t, np.ndarray) and t.shape == (4, 4):
        return np.asarray(t, dtype=np.float64)
    return load_transform(t)


@torch.inference_mode()
def _warp(
    chain: list[np.ndarray | FieldTransform],
    ref_shape: tuple[int, ...],
    ref_affine: np.ndarray,
    data: np.ndarray,
    affine: np.ndarray,
    interp: Interp,
) -> np.ndarray:
    """The image ``data`` (grid ``affine``) sampled at the chain's image of every reference voxel:
    (I, J, K) Fortran order (NIfTI's), float32 or ``data``'s dtype for nearest/label."""
    big_i, big_j, big_k = (int(s) for s in ref_shape)
    q = np.zeros((4, 4))
    q[0, 2] = q[1, 1] = q[2, 0] = q[3, 3] = 1.0  # slab index o = (k, j, i) -> native (i, j, k)
    # consecutive affines fold into one pending 4x4 map; a field needs the points themselves
    stages: list[np.ndarray | FieldTransform] = [np.asarray(ref_affine, dtype=np.float64) @ q]
    for t in chain:
        if isinstance(t, FieldTransform) or isinstance(stages[-1], FieldTransform):
            stages.append(t)
        else:
            stages[-1] = t @ stages[-1]

    src, p_src = _as_c_tensor(data)
    keep = interp is not Interp.linear
    wide_unsigned = keep and data.dtype in (np.uint16, np.uint32, np.uint64)
    if not keep:
        src = src.to(torch.float32)
    elif wide_unsigned:  # torch lacks where/take for wide unsigned ints: through int64 (values kept)
        src = src.to(torch.int64)
    src_shape = tuple(int(s) for s in src.shape)
    to_src = index_to_grid(src_shape) @ p_src @ np.linalg.inv(np.asarray(affine, dtype=np.float64))
    out_dtype = data.dtype if keep else np.float32
    out = np.zeros((big_k, big_j, big_i), dtype=out_dtype)
    outside = {id(t): 0 for t in stages if isinstance(t, FieldTransform)}

    per_slab = _SLAB_VOXELS // (8 if interp is Interp.label else 1)
    step = max(1, per_slab // max(big_j * big_i, 1))
    for k0 in range(0, big_k, step):
        k1 = min(big_k, k0 + step)
        o0 = torch.arange(k0, k1, dtype=torch.float32)
        n = k1 - k0
        pts: torch.Tensor | None = None  # (3, N) world RAS mm, or None while still the slab's indices
        pending = np.eye(4)
        for st in stages:
            if not isinstance(st, FieldTransform):
                pending = st @ pending
                continue
            # d at the points (normalised field coordinates), then p + S d
            g = _points(st.to_grid() @ pending, pts, o0, big_j, big_i)
            outside[id(st)] += _count_outside(g, st.field.shape[2:])
            d = grid_sample_3d(
                st.field, _channel_last(g, n, big_j, big_i), mode="bilinear", padding_mode="border"
            )
            pts = _points(pending, pts, o0, big_j, big_i)
            _add_matvec(pts, _LPS, d.view(3, -1), accumulate=True)
            pending = np.eye(4)
        g = _points(to_src @ pending, pts, o0, big_j, big_i)  # (3, N) normalised image coordinates
        dst = torch.from_numpy(out[k0:k1].reshape(-1)) if not wide_unsigned else None
        if interp is Interp.linear:
            lim = torch.tensor([1.0 + 1.0 / max(src_shape[ax] - 1, 1) for ax in (2, 1, 0)])
            inside = (g[0].abs() <= lim[0]) & (g[1].abs() <= lim[1]) & (g[2].abs() <= lim[2])
            w = grid_sample_3d(src[None, None], _channel_last(g, n, big_j, big_i), padding_mode="border")
            torch.where(inside, w.view(-1), torch.zeros((), dtype=torch.float32), out=dst)
            continue
        vals = (
            _nearest_take(src, g, torch.empty(g.shape[1], dtype=src.dtype))
            if interp is Interp.nearest
            else _label_vote(src, g)
        )
        if dst is None:
            out[k0:k1].reshape(-1)[:] = vals.numpy().astype(out_dtype)
        else:
            dst.copy_(vals)

    n_out = big_i * big_j * big_k
    for st in stages:
        if isinstance(st, FieldTransform) and outside[id(st)] > _MAX_OUTSIDE * n_out:
            frac = outside[id(st)] / n_out
            raise InputError(
                f"transform {st.name}: expected the points to fall on its grid "
                f"({'x'.join(map(str, st.shape))} voxels of {_fmt_mm(st.affine)} mm), got "
                f"{100 * frac:.0f}% of the reference grid's points outside it; fix: pass as --reference "
                "the image the field was written on (displacement.nii.gz: the fixed image; "
                "inverse_displacement.nii.gz: the moving image)"
            )
    return out.T


def _fmt_mm(affine: np.ndarray) -> str:
    return "x".join(f"{v:g}" for v in np.round(voxel_sizes(affine), 2))


def _points(m: np.ndarray, pts: torch.Tensor | None, o0: torch.Tensor, j: int, i: int) -> torch.Tensor:
    """Rows 0-2 of the 4x4 ``m`` applied to the points ``pts`` (3, N), or to the slab's output indices
    when ``pts`` is None: (3, N) float32."""
    if pts is None:
        return _affine_coords_cf(m[:3], o0, (j, i))
    out = torch.empty_like(pts)
    out.copy_(torch.as_tensor(m[:3, 3], dtype=torch.float32)[:, None].expand_as(pts))
    return _add_matvec(out, m[:3, :3], pts, accumulate=True)


def _count_outside(g: torch.Tensor, shape: Sequence[int]) -> int:
    """Points of ``g`` (3, N) normalised more than :data:`_OUTSIDE_VOXELS` outside a grid of ``shape``
    (D, H, W)."""
    bad = torch.zeros(g.shape[1], dtype=torch.bool)
    for row, size in ((0, shape[2]), (1, shape[1]), (2, shape[0])):
        lim = 1.0 + 2.0 * _OUTSIDE_VOXELS / max(int(size) - 1, 1)
        bad |= g[row].abs() > lim
    return int(bad.sum())


def _label_vote(src: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """ANTs' GenericLabel with linear weights at ``g`` (3, N) normalised: the label of the 8 surrounding
    voxels of ``src`` (D, H, W) with the largest summed trilinear weight, the smaller on a tie; 0 more than
    half a voxel outside (edge voxels repeat within that half voxel, as for ``linear``)."""
    d, h, w = (int(s) for s in src.shape)
    idx0, idx1, t = [], [], []
    inside = torch.ones(g.shape[1], dtype=torch.bool)
    for row, size, stride in ((2, d, h * w), (1, h, w), (0, w, 1)):
        c = ((g[row] + 1) / 2) * (size - 1)
        inside &= (c >= -0.5) & (c <= size - 0.5)
        f = torch.floor(c)
        t.append(c - f)
        fi = f.to(torch.int64)
        idx0.append(fi.clamp(0, size - 1) * stride)
        idx1.append((fi + 1).clamp(0, size - 1) * stride)
    flat = src.reshape(-1)
    labels, weights = [], []
    for corner in range(8):
        bits = [(corner >> a) & 1 for a in range(3)]
        pick = [idx1[a] if bits[a] else idx0[a] for a in range(3)]
        labels.append(flat.take(pick[0] + pick[1] + pick[2]))
        wgt = t[0] if bits[0] else 1 - t[0]
        for a in (1, 2):
            wgt = wgt * (t[a] if bits[a] else 1 - t[a])
        weights.append(wgt)
    lab, wts = torch.stack(labels), torch.stack(weights)  # (8, N)
    best_label = lab[0].clone()
    # only voxels whose 8 neighbours disagree need a vote (boundaries: a small share of a label map)
    mixed = (lab[1:] != lab[0]).any(0).nonzero().squeeze(1)
    if mixed.numel():
        lab, wts = lab[:, mixed], wts[:, mixed]
        score = wts.clone()  # score[a] = summed weight of the corners holding corner a's label
        for a in range(8):
            for b in range(a + 1, 8):
                same = (lab[a] == lab[b]).to(wts.dtype)
                score[a].addcmul_(same, wts[b])
                score[b].addcmul_(same, wts[a])
        top = score >= score.max(0).values - 1e-6  # ties (to rounding) go to the smaller label
        ceiling = torch.full_like(lab, int(lab.max()))
        best_label[mixed] = torch.where(top, lab, ceiling).min(0).values
    return torch.where(inside, best_label, torch.zeros((), dtype=src.dtype))
