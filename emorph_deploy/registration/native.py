"""Map a model-grid displacement back to the fixed image's native voxel grid; warp the original moving
image there.

For every fixed native voxel ``o`` (world position ``p = A_f o``, RAS mm):

* the model-grid flow is interpolated (trilinear) at ``p``'s model-grid position ``A_m^-1 p`` and converted to
  world mm: ``u(p) = A_m[:3, :3] @ flow``;
* the moving-world point is ``T(p + u(p))`` (``T`` = optional affine pre-alignment, fixed → moving world);
* the ORIGINAL moving image (native grid, native intensities) is sampled there: trilinear for intensities,
  nearest with the original values and dtype for labels. Points more than half a voxel outside the moving
  image are 0 (ITK's convention, so SimpleITK reproduces the result).

The displacement written for ITK/ANTs is ``d(p) = T(p + u(p)) - p`` in LPS mm.

Everything is folded into per-call 4x4 matrices so the hot loop is: the flow at the slab's voxels (three 1-D
interpolations when the grids are axis-aligned, else a ``grid_sample``), row-wise axpys for the displacement
and the moving coordinates (channel-first, passed to ``grid_sample`` as a strided view), one ``grid_sample``
of the moving image, and for labels one gather of the nearest voxel's value in the labels' own dtype —
float32, in slabs along the last native axis, writing straight into Fortran-ordered outputs (NIfTI's on-disk
order, so saving needs no transpose). Fortran-ordered inputs (nibabel's) are read through reversed views.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from emorph_deploy.data.orientation import RAS_TO_LPS, axis_map, index_map
from emorph_deploy.data.resample import separable_lerp
from emorph_deploy.sampling import c_order_view, grid_sample_3d, index_to_grid

__all__ = [
    "NativeWarp",
    "inverse_displacement",
    "invert_grid_flow",
    "itk_displacement_image",
    "jacobian_determinant_native",
    "voxel_flow",
    "voxel_flow_image",
    "warp_to_native",
]

#: Voxels per slab: bounds the temporaries (~24 MB per (N, 3) float32 tensor).
_SLAB_VOXELS = 1 << 21
_LPS = np.ascontiguousarray(RAS_TO_LPS[:3, :3])  # RAS <-> LPS for vectors (its own inverse)
_ZERO = torch.zeros((), dtype=torch.float32)


@dataclass
class NativeWarp:
    """Outputs on the fixed native grid (all Fortran-ordered (I, J, K, ...) views, NIfTI's on-disk order)."""

    warped: np.ndarray  # (I, J, K) float32
    displacement_lps: np.ndarray  # (I, J, K, 3) float32, LPS mm, ITK convention
    warped_labels: np.ndarray | None  # (I, J, K) original label dtype


def _as_c_tensor(arr: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """C-contiguous tensor of a 3D array, plus the 4x4 map native index → tensor index: a zero-copy reversed
    view of a Fortran-ordered array (:func:`~emorph_deploy.sampling.c_order_view`), a copy of other
    non-contiguous layouts."""
    view, p = c_order_view(arr)
    return torch.from_numpy(np.ascontiguousarray(view)), p


def _affine_coords_cf(
    m: np.ndarray, o0: torch.Tensor, plane_shape: tuple[int, int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows of ``m`` (r x 4) applied to output indices (o0 slab, all o1, all o2), channel-first:
    (r, n·J·I) float32, rows contiguous (written into ``out`` when given)."""
    mt = torch.as_tensor(m, dtype=torch.float32)
    o1 = torch.arange(plane_shape[0], dtype=torch.float32)
    o2 = torch.arange(plane_shape[1], dtype=torch.float32)
    plane = mt[:, 3, None, None] + o1[:, None] * mt[:, 1, None, None] + o2 * mt[:, 2, None, None]  # (r, J, I)
    col = o0[:, None, None] * mt[:, 0, None, None, None]  # (r, n, 1, 1)
    r, n = mt.shape[0], o0.shape[0]
    if out is None:
        return (plane[:, None] + col).view(r, -1)  # (r, n·J·I)
    torch.add(plane[:, None], col, out=out.view(r, n, *plane_shape))
    return out


def _add_matvec(out: torch.Tensor, m: np.ndarray, f: torch.Tensor, *, accumulate: bool) -> torch.Tensor:
    """``out (r, N) (+)= m (r, c) @ f (c, N)`` for a small ``m``, as row-wise axpys that skip zero entries
    (a 3-deep GEMM is memory-bound: MKL takes ~3x longer, and an axis-aligned ``m`` needs one axpy per
    row)."""
    for r in range(m.shape[0]):
        first = not accumulate
        for c in range(m.shape[1]):
            if m[r, c] == 0.0:
                continue
            if first:
                torch.mul(f[c], float(m[r, c]), out=out[r])
                first = False
            else:
                out[r].add_(f[c], alpha=float(m[r, c]))
        if first:  # an all-zero row
            out[r].zero_()
    return out


def _nearest_take(src: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour sampling of the C-contiguous 3D ``src`` (D, H, W), any dtype, at the normalised
    ``(x, y, z)`` coordinates ``g`` (3, N) into ``out`` (N,): ``grid_sample``'s rule exactly
    (``align_corners=True``, round half to even, 0 outside ``[0, size - 1]`` after rounding), as one gather
    of the source values in their own dtype instead of a float ``grid_sample``."""
    d, h, w = (int(s) for s in src.shape)
    idx = None
    inside = None
    for row, size, stride in ((2, d, h * w), (1, h, w), (0, w, 1)):
        c = torch.round(((g[row] + 1) / 2) * (size - 1))
        ok = (c >= 0) & (c <= size - 1)
        inside = ok if inside is None else inside.logical_and_(ok)
        ci = c.clamp_(0, size - 1).to(torch.int64)
        idx = ci.mul_(stride) if idx is None else idx.add_(ci, alpha=stride)
    vals = src.reshape(-1).take(idx)
    return torch.where(inside, vals, torch.zeros((), dtype=src.dtype), out=out)


def _channel_last(g_cf: torch.Tensor, n: int, j: int, i: int) -> torch.Tensor:
    """(3, n·J·I) channel-first coordinates as a (1, n, J, I, 3) grid_sample grid: a strided view, no copy."""
    return g_cf.view(3, n, j, i).permute(1, 2, 3, 0)[None]


@torch.inference_mode()
def warp_to_native(
    flow: np.ndarray | torch.Tensor,
    grid_affine: np.ndarray,
    fixed_shape: tuple[int, int, int],
    fixed_affine: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    *,
    pre_affine: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    labels_affine: np.ndarray | None = None,
) -> NativeWarp:
    """Warp the native moving image (and labels) onto the fixed native grid with a model-grid flow.

    ``flow`` is (3, d, h, w) or (1, 3, d, h, w) float32 in model-grid voxels (channel k along array axis k);
    ``grid_affine`` maps model-grid indices to world RAS mm; ``pre_affine`` maps fixed world → moving world
    (applied after the deformation); ``labels`` may have its own grid (``labels_affine``, default: the
    moving's).
    """
    flow_t = torch.as_tensor(flow, dtype=torch.float32)
    if flow_t.ndim == 4:
        flow_t = flow_t[None]
    flow_t = flow_t.contiguous()  # (1, 3, d, h, w)
    grid_shape = tuple(int(s) for s in flow_t.shape[2:])
    fixed_shape = tuple(int(s) for s in fixed_shape)
    big_i, big_j, big_k = fixed_shape
    a_f = np.asarray(fixed_affine, dtype=np.float64)
    a_m = np.asarray(grid_affine, dtype=np.float64)
    t_pre = np.eye(4) if pre_affine is None else np.asarray(pre_affine, dtype=np.float64)
    has_pre = not np.allclose(t_pre, np.eye(4), atol=1e-12)

    # Output tensors are indexed o = (k, j, i) (C order) == (i, j, k) Fortran order.
    q = np.zeros((4, 4))
    q[0, 2] = q[1, 1] = q[2, 0] = q[3, 3] = 1.0  # o → native (i, j, k)
    p_of_o = a_f @ q  # o → world
    r_m = a_m[:3, :3]

    # Flow sampling: o → model-grid index; separable 1D interpolations when axis-aligned, else grid_sample.
    o_to_q = index_map(a_m, p_of_o)
    amap = axis_map(o_to_q)
    g_flow = (index_to_grid(grid_shape) @ o_to_q)[:3]
    flow3 = flow_t[0]
    if amap is not None and any(b != a for a, (b, _, _) in enumerate(amap)):
        # transpose the (small) model-grid flow once into the output's axis order, instead of every
        # upsampled slab: flow axis b then feeds output axis b
        src_of = {b: a for a, (b, _, _) in enumerate(amap)}
        flow3 = flow3.permute(0, *(1 + src_of[b] for b in range(3))).contiguous()
        amap = [(b, amap[src_of[b]][1], amap[src_of[b]][2]) for b in range(3)]
    # World displacement (LPS) = S T_lin R_m f + S ((T - I) p)
    lin_d = _LPS @ t_pre[:3, :3] @ r_m
    aff_d = _LPS @ ((t_pre - np.eye(4)) @ p_of_o)[:3] if has_pre else None

    mov_t, p_mov = _as_c_tensor(moving)
    if mov_t.dtype != torch.float32:
        mov_t = mov_t.to(torch.float32)
    mov_shape = tuple(int(s) for s in mov_t.shape)
    to_mov = (
        index_to_grid(mov_shape) @ p_mov @ np.linalg.inv(np.asarray(moving_affine, dtype=np.float64)) @ t_pre
    )
    g_mov = (to_mov @ p_of_o)[:3]
    l_mov = to_mov[:3, :3] @ r_m
    lim_mov = torch.tensor([1.0 + 1.0 / max(mov_shape[ax] - 1, 1) for ax in (2, 1, 0)])
    mov5 = mov_t[None, None]

    lab_src = None
    if labels is not None:
        lab_arr = np.asarray(labels)
        lab_t, p_lab = _as_c_tensor(lab_arr)
        lab_shape = tuple(int(s) for s in lab_t.shape)
        a_lab = np.asarray(moving_affine if labels_affine is None else labels_affine, dtype=np.float64)
        same_grid = (
            lab_shape == mov_shape
            and np.array_equal(p_lab, p_mov)
            and np.allclose(a_lab, np.asarray(moving_affine, dtype=np.float64), rtol=0, atol=1e-9)
        )
        if not same_grid:
            to_lab = index_to_grid(lab_shape) @ p_lab @ np.linalg.inv(a_lab) @ t_pre
            g_lab = (to_lab @ p_of_o)[:3]
            l_lab = to_lab[:3, :3] @ r_m
        labels_out = np.zeros((big_k, big_j, big_i), dtype=lab_arr.dtype)
        # the gather runs in the labels' own dtype; torch lacks `where`/`take` for wide unsigned ints, which
        # go through int64 (uint64 wraps there and back: values kept)
        wide_unsigned = lab_arr.dtype in (np.uint16, np.uint32, np.uint64)
        lab_src = torch.from_numpy(lab_t.numpy().astype(np.int64)) if wide_unsigned else lab_t
        labels_out_t = torch.from_numpy(labels_out) if not wide_unsigned else None

    warped_out = torch.empty((big_k, big_j, big_i), dtype=torch.float32)
    disp_out = torch.empty((3, big_k, big_j, big_i), dtype=torch.float32)

    step = max(1, _SLAB_VOXELS // max(big_j * big_i, 1))
    if (big_j * big_i) % 2 and step > 1:  # even voxel counts per slab: grid_sample_3d splits without a tail
        step -= step % 2
    for k0 in range(0, big_k, step):
        k1 = min(big_k, k0 + step)
        n = k1 - k0
        nvox = n * big_j * big_i
        o0 = torch.arange(k0, k1, dtype=torch.float32)
        if amap is not None:
            out_index = (np.arange(k0, k1), np.arange(big_j), np.arange(big_i))
            f = separable_lerp(flow3, amap, out_index, "border").contiguous()  # (3, n, J, I)
        else:
            grid_q = _channel_last(_affine_coords_cf(g_flow, o0, (big_j, big_i)), n, big_j, big_i)
            f = grid_sample_3d(flow_t, grid_q, mode="bilinear", padding_mode="border")  # (1, 3, n, J, I)
        f2 = f.view(3, nvox)
        # displacement (LPS mm), channel-first straight into the output slab
        d_slab = disp_out[:, k0:k1].view(3, nvox)
        if aff_d is not None:
            _affine_coords_cf(aff_d, o0, (big_j, big_i), out=d_slab)
        _add_matvec(d_slab, lin_d, f2, accumulate=aff_d is not None)
        # moving sampling grid (normalised), computed channel-first (contiguous rows for the axpys and the
        # inside test) and handed to grid_sample as a channel-last strided view
        g = _add_matvec(_affine_coords_cf(g_mov, o0, (big_j, big_i)), l_mov, f2, accumulate=True)  # (3, nvox)
        inside = g[0].abs() <= lim_mov[0]
        inside &= g[1].abs() <= lim_mov[1]
        inside &= g[2].abs() <= lim_mov[2]
        w = grid_sample_3d(mov5, _channel_last(g, n, big_j, big_i), mode="bilinear", padding_mode="border")
        torch.where(inside, w.view(nvox), _ZERO, out=warped_out[k0:k1].view(nvox))
        if lab_src is not None:
            if same_grid:
                gl = g
            else:
                gl = _add_matvec(_affine_coords_cf(g_lab, o0, (big_j, big_i)), l_lab, f2, accumulate=True)
            if labels_out_t is not None:
                _nearest_take(lab_src, gl, labels_out_t[k0:k1].view(nvox))
            else:
                vals = _nearest_take(lab_src, gl, torch.empty(nvox, dtype=lab_src.dtype))
                labels_out[k0:k1].reshape(-1)[:] = vals.numpy().astype(labels_out.dtype)

    warped = warped_out.numpy().T  # (I, J, K), Fortran order
    disp = disp_out.numpy().transpose(3, 2, 1, 0)  # (I, J, K, 3), Fortran order
    lab = labels_out.T if labels is not None else None
    return NativeWarp(warped=warped, displacement_lps=disp, warped_labels=lab)


@torch.inference_mode()
def invert_grid_flow(
    flow: np.ndarray | torch.Tensor, *, iterations: int = 50, tol: float = 1e-2
) -> torch.Tensor:
    """Inverse of the model-grid map ``x -> x + u(x)`` by fixed-point iteration ``w <- -u(x + w)``.

    ``flow`` (3, D, H, W) (or (1, 3, D, H, W)) float32 voxels; returns ``w`` (1, 3, D, H, W) float32 voxels
    with ``x + w(x) + u(x + w(x)) = x`` (``u`` trilinear, border-extended as in :func:`warp_to_native`).
    The iteration contracts wherever ``|grad u| < 1``, i.e. for any folding-free field; it stops when no
    voxel moves by more than ``tol`` voxels."""
    u = torch.as_tensor(flow, dtype=torch.float32)
    u = (u if u.ndim == 5 else u[None]).contiguous()
    shape = tuple(int(s) for s in u.shape[2:])
    n = torch.as_tensor(index_to_grid(shape)[:3, :3].diagonal().copy(), dtype=torch.float32)  # per (x, y, z)
    base = torch.stack(
        torch.meshgrid(*[torch.linspace(-1.0, 1.0, s) for s in shape], indexing="ij")[::-1], dim=-1
    )[None]  # (1, D, H, W, 3) normalised (x, y, z)
    w = -u
    for _ in range(iterations):
        g = base + w.permute(0, 2, 3, 4, 1).flip(-1) * n
        w_new = -grid_sample_3d(u, g, mode="bilinear", padding_mode="border")
        delta = float((w_new - w).abs().max())
        w = w_new
        if delta < tol:
            break
    return w


@torch.inference_mode()
def inverse_displacement(
    flow: np.ndarray | torch.Tensor,
    grid_affine: np.ndarray,
    moving_shape: tuple[int, int, int],
    moving_affine: np.ndarray,
    *,
    pre_affine: np.ndarray | None = None,
    polish: int = 1,
) -> np.ndarray:
    """The exact inverse of :func:`warp_to_native`'s map as an ITK displacement on the moving grid.

    The forward map is ``p -> T(p + u(p))`` (fixed world -> moving world); for every moving voxel at world
    ``q`` this returns ``v(q) = T^-1(q) + w(T^-1(q)) - q`` in LPS mm, ``w`` the model-grid inverse of ``u``
    (:func:`invert_grid_flow`, then ``polish`` fixed-point steps at each moving voxel's own position, so
    the result inverts the trilinear forward map rather than an interpolated inverse): ITK/ANTs resample
    the fixed image onto the moving grid with it. ``flow``
    (3, d, h, w) model-grid voxels; returns (I, J, K, 3) float32 LPS mm, Fortran order (the moving grid's).
    """
    u = torch.as_tensor(flow, dtype=torch.float32)
    u = (u if u.ndim == 5 else u[None]).contiguous()
    w = invert_grid_flow(u)
    grid_shape = tuple(int(s) for s in w.shape[2:])
    big_i, big_j, big_k = (int(s) for s in moving_shape)
    a_g = np.asarray(grid_affine, dtype=np.float64)
    t_inv = np.eye(4) if pre_affine is None else np.linalg.inv(np.asarray(pre_affine, dtype=np.float64))
    q = np.zeros((4, 4))
    q[0, 2] = q[1, 1] = q[2, 0] = q[3, 3] = 1.0  # o = (k, j, i) -> native (i, j, k)
    q_of_o = np.asarray(moving_affine, dtype=np.float64) @ q  # o -> moving world
    g_w = (index_to_grid(grid_shape) @ np.linalg.inv(a_g) @ t_inv @ q_of_o)[:3]  # o -> normalised model grid
    aff_v = _LPS @ ((t_inv - np.eye(4)) @ q_of_o)[:3]  # S (T^-1 q - q)
    lin_v = _LPS @ a_g[:3, :3]  # model voxels -> LPS mm
    n_xyz = torch.as_tensor(index_to_grid(grid_shape)[:3, :3].diagonal().copy(), dtype=torch.float32)[:, None]
    out = torch.empty((3, big_k, big_j, big_i), dtype=torch.float32)
    step = max(1, _SLAB_VOXELS // max(big_j * big_i, 1))
    for k0 in range(0, big_k, step):
        k1 = min(big_k, k0 + step)
        n = k1 - k0
        o0 = torch.arange(k0, k1, dtype=torch.float32)
        g = _affine_coords_cf(g_w, o0, (big_j, big_i))
        wv = grid_sample_3d(w, _channel_last(g, n, big_j, big_i), mode="bilinear", padding_mode="border")
        for _ in range(polish):  # the same fixed point at this voxel's own position, from w's estimate
            gp = g + wv.reshape(3, -1).flip(0) * n_xyz
            wv = -grid_sample_3d(
                u, _channel_last(gp, n, big_j, big_i), mode="bilinear", padding_mode="border"
            )
        slab = out[:, k0:k1].view(3, -1)
        _affine_coords_cf(aff_v, o0, (big_j, big_i), out=slab)
        _add_matvec(slab, lin_v, wv.reshape(3, -1), accumulate=True)
    return out.numpy().transpose(3, 2, 1, 0)


def jacobian_determinant_native(displacement_lps: np.ndarray, fixed_affine: np.ndarray) -> np.ndarray:
    """det of the Jacobian of ``p -> p + d(p)`` on the fixed grid, (I, J, K) float32 Fortran order.

    ``d`` (I, J, K, 3) LPS mm; the determinant is that of ``I + dv/do`` with ``v`` the displacement in fixed
    voxels (similar matrices: the same determinant as in world mm), central differences inside."""
    from emorph_deploy.qc import jacobian_determinant_fast

    v = voxel_flow(displacement_lps, fixed_affine)  # (I, J, K, 3), Fortran order
    # channels reordered (k, j, i) to match the spatial axes (K, J, I): rows and columns permuted alike
    det = jacobian_determinant_fast(np.ascontiguousarray(v.transpose(3, 2, 1, 0)[::-1]))
    return det.T


def itk_displacement_image(displacement_lps: np.ndarray, fixed_affine: np.ndarray, header=None):
    """ITK/ANTs displacement field: 5D (X, Y, Z, 1, 3) float32 NIfTI, intent "vector", LPS mm, on the grid
    ``fixed_affine``, with the qform/sform codes of ``header`` (the grid image's; default 1/1)."""
    import nibabel as nib

    from emorph_deploy.data.nifti import header_codes

    i, j, k = displacement_lps.shape[:3]
    data = np.reshape(displacement_lps, (i, j, k, 1, 3), order="F")  # a view for Fortran-ordered input
    img = nib.Nifti1Image(data, fixed_affine)
    hdr = img.header
    hdr.set_intent("vector", (), name="")
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_data_dtype(np.float32)
    qcode, scode = header_codes(header)
    img.set_qform(fixed_affine, code=qcode)
    img.set_sform(fixed_affine, code=scode)
    hdr["descrip"] = b"emorph ITK displacement (LPS mm)"
    return img


def voxel_flow(displacement_lps: np.ndarray, fixed_affine: np.ndarray) -> np.ndarray:
    """Learn2Reg convention: the displacement in fixed-grid voxels, (X, Y, Z, 3) float32.

    ``moving_voxel = fixed_voxel + flow`` when both images share the fixed grid (Learn2Reg's setting);
    in general it is the world displacement expressed in fixed voxel units.
    """
    lin = np.linalg.inv(np.asarray(fixed_affine, dtype=np.float64)[:3, :3]) @ _LPS  # LPS mm → fixed voxels
    i, j, k = displacement_lps.shape[:3]
    flat = displacement_lps.reshape(-1, 3, order="F").T  # (3, N), C-contiguous view for Fortran-ordered input
    out = lin.astype(np.float32) @ flat  # (3, N)
    return out.reshape(3, k, j, i).transpose(3, 2, 1, 0)  # (I, J, K, 3), Fortran order


def voxel_flow_image(displacement_lps: np.ndarray, fixed_affine: np.ndarray):
    """:func:`voxel_flow` as a 4D (X, Y, Z, 3) float32 NIfTI on the fixed grid."""
    import nibabel as nib

    img = nib.Nifti1Image(voxel_flow(displacement_lps, fixed_affine), fixed_affine)
    img.header.set_intent("vector", (), name="")
    img.header["descrip"] = b"emorph voxel flow (Learn2Reg, fixed voxels)"
    img.set_qform(fixed_affine, code=1)
    img.set_sform(fixed_affine, code=1)
    return img
