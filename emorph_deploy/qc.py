"""Registration quality control: fast deformation statistics and the ``qc.png`` figure.

* :func:`jacobian_determinant_fast` — float32 torch version of
  :func:`emorph_deploy.metrics.jacobian_determinant` (same central differences, one-sided at the faces)
  for the registration hot path.
* :func:`deformation_stats` — fraction of J ≤ 0, SDlogJ (true std of log J over J > 0) and the Learn2Reg
  variant, min/max J.
* :func:`fixed_foreground` / :func:`region_ncc` — the region ``qc.json``'s NCC is measured in (the fixed
  mask, or the fixed image's foreground: the background's agreement says nothing about the registration).
* :func:`deformable_check` / :func:`deformable_warning` — did the deformable stage (network, refinement)
  lower the similarity below the pre-aligned start? ``qc.json``'s ``deformable_check`` and the CLI's warning;
  :func:`warnings_of` — every warning line of a ``qc`` (register, demo, batch summaries).
* :func:`label_overlap` — Dice before/after of the fixed labels and the (warped) moving labels.
* :func:`orthogonal_slices` — the three centre slices (model grid) that the figure needs, so a result keeps a
  few KB instead of whole volumes.
* :func:`qc_figure_png` — three orthogonal slices × (fixed, moving, warped, checkerboard, deformation grid,
  Jacobian map) rendered with matplotlib's Agg canvas (no pyplot, no global state: thread-safe).
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

__all__ = [
    "DEFORMABLE_TOLERANCE",
    "deformable_check",
    "deformable_warning",
    "deformation_stats",
    "fixed_foreground",
    "jacobian_determinant_fast",
    "label_overlap",
    "orthogonal_slices",
    "qc_figure_png",
    "region_ncc",
    "warnings_of",
]

#: fixed_foreground: a voxel is foreground when the smoothed fixed image exceeds this share of its 99th
#: percentile (low enough for dark CSF next to tissue; the holes left inside are filled)
FOREGROUND_SHARE = 0.1
#: fewer foreground voxels than this share of the grid: no usable foreground, the whole grid is used
MIN_FOREGROUND = 0.01


PLANES = (
    "axial",
    "coronal",
    "sagittal",
)  # model grid is RAS: axial = fixed axis 2, coronal = 1, sagittal = 0
_PLANE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}


def jacobian_determinant_fast(flow: Any) -> np.ndarray:
    """det(I + ∇u) for a voxel displacement (3, D, H, W) (or (1, 3, D, H, W)); float32 (D, H, W).

    Matches ``np.gradient`` (central differences inside, one-sided first differences at the faces).
    """
    import torch

    u = torch.as_tensor(np.asarray(flow), dtype=torch.float32)
    if u.ndim == 5:
        u = u[0]

    def grad(x: torch.Tensor, axis: int) -> torch.Tensor:
        n = x.shape[axis]
        g = torch.empty_like(x)
        if n < 2:
            g.zero_()
            return g
        sl = [slice(None)] * x.ndim

        def s(a: int | slice) -> tuple:
            sl2 = list(sl)
            sl2[axis] = a
            return tuple(sl2)

        if n > 2:
            torch.sub(x[s(slice(2, None))], x[s(slice(None, -2))], out=g[s(slice(1, -1))])
            g[s(slice(1, -1))] *= 0.5
        g[s(0)] = x[s(1)] - x[s(0)]
        g[s(-1)] = x[s(-1)] - x[s(-2)]
        return g

    # g[i][j] = ∂u_i/∂x_j (u: (3, D, H, W), spatial axis j → tensor axis j)
    g = [[grad(u[i], j) for j in range(3)] for i in range(3)]
    for i in range(3):
        g[i][i] += 1.0
    # cofactor expansion along the first row, with fused multiply-adds into few full-size temporaries
    c = torch.mul(g[1][1], g[2][2]).addcmul_(g[1][2], g[2][1], value=-1.0)
    det = torch.mul(g[0][0], c)
    torch.mul(g[1][0], g[2][2], out=c).addcmul_(g[1][2], g[2][0], value=-1.0)
    det.addcmul_(g[0][1], c, value=-1.0)
    torch.mul(g[1][0], g[2][1], out=c).addcmul_(g[1][1], g[2][0], value=-1.0)
    det.addcmul_(g[0][2], c)
    return det.numpy()


def deformation_stats(jac: np.ndarray) -> dict[str, float]:
    """Fraction of J ≤ 0, std of log J over J > 0 (``sdlogj``), Learn2Reg's ``sdlogj_l2r``, min/max J."""
    import torch

    j = torch.as_tensor(jac).reshape(-1)
    n = j.numel()
    n_nonpos = int(torch.count_nonzero(j <= 0))
    n_pos = n - n_nonpos
    # logs in the input precision; CPU reductions accumulate float32 in double (sdlogj to ~1e-8 relative)
    if n_pos <= 1:
        sd = float("nan")
    elif n_nonpos == 0:
        sd = float(torch.log(j).std(unbiased=False))
    else:  # folds: log(1) = 0 stands in for J ≤ 0 (no masked copy), then their share is taken out again
        lg = torch.log(torch.where(j > 0, j, torch.ones((), dtype=j.dtype)))
        mean = float(lg.sum(dtype=torch.float64)) / n_pos
        ss = float((lg - mean).square_().sum(dtype=torch.float64)) - n_nonpos * mean * mean
        sd = max(ss, 0.0) ** 0.5 / n_pos**0.5
    l2r = float(torch.log((j + 3.0).clamp(1e-9, 1e9)).std(unbiased=False))
    lo, hi = torch.aminmax(j)
    return {
        "frac_jac_nonpos": float(n_nonpos / max(n, 1)),
        "sdlogj": sd,
        "sdlogj_l2r": l2r,
        "jac_min": float(lo),
        "jac_max": float(hi),
    }


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(mask)`` (face connectivity) as one connected-component labelling of
    the background: the background components that touch the volume's border stay background, the rest
    (the holes) become foreground. Same result; binary_fill_holes propagates a dilation through the volume
    and took ~3x longer on the 80x96x112 model grid."""
    from scipy.ndimage import label

    lab, n = label(~np.asarray(mask, dtype=bool))
    border = np.zeros(n + 1, dtype=bool)
    for axis in range(lab.ndim):
        for end in (0, -1):
            border[np.take(lab, end, axis=axis)] = True
    border[0] = False  # label 0 is the foreground itself
    return ~border[lab]


def fixed_foreground(fixed: np.ndarray, sigma: float = 1.0) -> np.ndarray | None:
    """The foreground of a fixed image (D, H, W) in [0, 1] as a boolean mask: the image smoothed by a
    Gaussian of ``sigma`` voxels above :data:`FOREGROUND_SHARE` of its 99th percentile, holes filled.
    None when that leaves less than :data:`MIN_FOREGROUND` of the grid (no usable foreground)."""
    from scipy.ndimage import gaussian_filter

    smooth = gaussian_filter(np.asarray(fixed, dtype=np.float32), sigma, truncate=2.0)
    positive = smooth[smooth > 0]
    if positive.size == 0:
        return None
    top = float(np.percentile(positive[:: max(1, positive.size // 200_000)], 99))
    fg = fill_holes(smooth > FOREGROUND_SHARE * top)
    return fg if np.count_nonzero(fg) >= MIN_FOREGROUND * fg.size else None


def region_ncc(fixed: np.ndarray, other: np.ndarray, region: np.ndarray | None) -> float:
    """Global NCC of two same-shape volumes over the voxels of the boolean ``region`` (None: all)."""
    from emorph_deploy.metrics import ncc_global_float32

    if region is None:
        return ncc_global_float32(fixed, other)
    return ncc_global_float32(fixed[region], other[region])


#: deformable_check: the deformable stage "lowered" the similarity when its NCC ends more than this below
#: the pre-aligned start (a flow that changes nothing scores the start exactly; interpolation alone costs
#: far less than this)
DEFORMABLE_TOLERANCE = 0.005


def deformable_check(
    fixed: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    region: np.ndarray | None,
    min_ncc: float | None = None,
) -> dict[str, Any]:
    """NCC of the fixed image with the moving image as the deformable stage got it (``start``: pre-aligned,
    in the fixed contrast when it was matched) and as it left it (``end``: warped by the flow), inside
    ``region``; all (D, H, W) on the model grid. ``lowered`` when it fell by more than
    :data:`DEFORMABLE_TOLERANCE`. ``min_ncc`` (matched contrasts): below it at the end the NCC of a loosely
    matched image says little, so the pair is not judged.

    Returns ``{"judged", "ncc_start", "ncc_end", "lowered"}`` (``reason`` when not judged)."""
    a, b = region_ncc(fixed, start, region), region_ncc(fixed, end, region)
    out: dict[str, Any] = {"judged": True, "ncc_start": a, "ncc_end": b, "lowered": False}
    if not (math.isfinite(a) and math.isfinite(b)):
        return {**out, "judged": False, "reason": "NCC undefined (a constant image in the region)"}
    if min_ncc is not None and b < min_ncc:
        reason = f"matched contrast: NCC {b:.2f} after the flow, below {min_ncc:g}, too weak to judge by"
        return {**out, "judged": False, "reason": reason}
    return {**out, "lowered": b < a - DEFORMABLE_TOLERANCE}


def deformable_warning(qc: dict[str, Any]) -> str | None:
    """The CLI's one-line warning when ``qc``'s ``deformable_check`` found the deformable stage lowering the
    similarity below the pre-aligned start, else None."""
    check = qc.get("deformable_check") or {}
    if not check.get("lowered"):
        return None
    start = "the affine pre-alignment" if qc.get("affine_prealignment") else "no registration"
    return (
        f"warning: the deformable registration ended below {start} by NCC ({qc.get('qc_region')}: "
        f"{check['ncc_start']:.4f} -> {check['ncc_end']:.4f}); inspect qc.png, or try more refinement "
        "(e.g. --refine 20)"
    )


def warnings_of(qc: dict[str, Any]) -> list[str]:
    """Every one-line warning the CLI prints for a registration's ``qc``: a rejected affine pre-alignment
    (:func:`~emorph_deploy.registration.affine.rejection_warning`), then a deformable stage that ended below
    its start (:func:`deformable_warning`)."""
    from emorph_deploy.registration.affine import rejection_warning

    return [w for w in (rejection_warning(qc), deformable_warning(qc)) if w is not None]


def label_overlap(
    fixed_labels: np.ndarray, before: np.ndarray, after: np.ndarray
) -> dict[str, float | dict[int, float]]:
    """Dice of the fixed labels with the moving labels before and after registration (all on one grid):
    the means over the labels present in both (:func:`emorph_deploy.metrics.mean_dice`, NaN when none) and
    the per-label values."""
    from emorph_deploy.metrics import dice_per_label

    out: dict[str, float | dict[int, float]] = {}
    for key, moved in (("before", before), ("after", after)):
        per = dice_per_label(fixed_labels, moved)
        out[f"dice_{key}"] = float(np.mean(list(per.values()))) if per else float("nan")
        out[f"dice_per_label_{key}"] = per
    return out


def _plane(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(vol, index, axis=axis)


def orthogonal_slices(
    fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, flow: np.ndarray, jac: np.ndarray
) -> dict[str, dict[str, np.ndarray]]:
    """Centre slices (copies) for the figure: per plane, images plus the two in-plane flow components."""
    out: dict[str, dict[str, np.ndarray]] = {}
    shape = fixed.shape
    for name in PLANES:
        ax = _PLANE_AXIS[name]
        idx = shape[ax] // 2
        inplane = [a for a in range(3) if a != ax]
        out[name] = {
            "fixed": np.array(_plane(fixed, ax, idx), dtype=np.float32),
            "moving": np.array(_plane(moving, ax, idx), dtype=np.float32),
            "warped": np.array(_plane(warped, ax, idx), dtype=np.float32),
            "jac": np.array(_plane(jac, ax, idx), dtype=np.float32),
            # flow components along the two in-plane array axes (rows, cols of the 2D slice)
            "flow_r": np.array(_plane(flow[inplane[0]], ax, idx), dtype=np.float32),
            "flow_c": np.array(_plane(flow[inplane[1]], ax, idx), dtype=np.float32),
        }
    return out


def _checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    r = np.arange(a.shape[0])[:, None] * tiles // max(a.shape[0], 1)
    c = np.arange(a.shape[1])[None, :] * tiles // max(a.shape[1], 1)
    return np.where((r + c) % 2 == 0, a, b)


def _gray(x: np.ndarray) -> np.ndarray:
    g = np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0)
    return np.repeat(g[..., None], 3, axis=-1)


def _grid_panel(base: np.ndarray, flow_r: np.ndarray, flow_c: np.ndarray, up: int) -> np.ndarray:
    """Fixed slice (dimmed) with the deformed grid lines x + u(x) in red, ``up``-times upsampled."""
    n0, n1 = base.shape
    rgb = np.kron(_gray(base) * 0.45 + 0.25, np.ones((up, up, 1)))
    step = max(2, math.ceil(max(n0, n1) / 16))
    dense = np.arange(0, max(n0, n1) - 1 + 1e-6, 1.0 / (2 * up))

    def draw(r: np.ndarray, c: np.ndarray) -> None:
        ri = np.clip(np.rint(r * up + (up - 1) / 2).astype(int), 0, n0 * up - 1)
        ci = np.clip(np.rint(c * up + (up - 1) / 2).astype(int), 0, n1 * up - 1)
        ok = (r >= -0.5) & (r <= n0 - 0.5) & (c >= -0.5) & (c <= n1 - 0.5)
        rgb[ri[ok], ci[ok]] = (0.9, 0.1, 0.1)

    def sample(field: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:  # bilinear
        r = np.clip(r, 0, n0 - 1)
        c = np.clip(c, 0, n1 - 1)
        r0 = np.minimum(np.floor(r).astype(int), max(n0 - 2, 0))
        c0 = np.minimum(np.floor(c).astype(int), max(n1 - 2, 0))
        r1, c1 = np.minimum(r0 + 1, n0 - 1), np.minimum(c0 + 1, n1 - 1)
        wr, wc = r - r0, c - c0
        top = field[r0, c0] * (1 - wc) + field[r0, c1] * wc
        bot = field[r1, c0] * (1 - wc) + field[r1, c1] * wc
        return top * (1 - wr) + bot * wr

    for i in range(0, n0, step):  # lines of constant row
        c = dense[dense <= n1 - 1]
        r = np.full_like(c, float(i))
        draw(r + sample(flow_r, r, c), c + sample(flow_c, r, c))
    for j in range(0, n1, step):  # lines of constant column
        r = dense[dense <= n0 - 1]
        c = np.full_like(r, float(j))
        draw(r + sample(flow_r, r, c), c + sample(flow_c, r, c))
    return rgb


def _jacobian_rgb(jac: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm

    vmax = max(2.0, float(np.nanmax(jac)) if jac.size else 2.0)
    vmin = min(0.0, float(np.nanmin(jac)) if jac.size else 0.0)
    norm = TwoSlopeNorm(vcenter=1.0, vmin=min(vmin, 0.99), vmax=vmax)
    rgb = colormaps["RdBu_r"](norm(jac))[..., :3]
    rgb[jac <= 0] = (0.0, 0.0, 0.0)  # folding in black
    return rgb


def qc_figure_png(
    slices: dict[str, dict[str, np.ndarray]], title: str = "", panel_px: int = 150, dpi: int = 100
) -> bytes:
    """Render the QC figure (rows: axial, coronal, sagittal; columns: fixed, moving, warped, checkerboard,
    deformation grid, Jacobian (blue < 1 < red, black ≤ 0)) and return PNG bytes.

    The panels are composed into one RGB mosaic with numpy and drawn on a single Agg axes (a figure with
    18 matplotlib axes takes seconds; this takes a fraction of one).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = ("fixed", "moving", "warped", "checkerboard", "deformation grid", "Jacobian det.")
    sizes = [slices[p]["fixed"].shape for p in PLANES]
    up = max(1, round(panel_px / max(max(s) for s in sizes)))
    ph = max(s[1] for s in sizes) * up  # display: first in-plane axis horizontal, second vertical
    pw = max(s[0] for s in sizes) * up
    gap = 4
    mosaic = np.ones((len(PLANES) * (ph + gap), len(cols) * (pw + gap), 3))

    def place(r: int, c: int, rgb: np.ndarray) -> None:
        img = np.flipud(np.transpose(rgb, (1, 0, 2)))  # (rows = 2nd axis, flipped: origin lower)
        y0 = r * (ph + gap) + (ph - img.shape[0]) // 2
        x0 = c * (pw + gap) + (pw - img.shape[1]) // 2
        mosaic[y0 : y0 + img.shape[0], x0 : x0 + img.shape[1]] = img

    for r, name in enumerate(PLANES):
        s = slices[name]
        k = np.ones((up, up, 1))
        panels = [
            np.kron(_gray(x), k)
            for x in (s["fixed"], s["moving"], s["warped"], _checkerboard(s["fixed"], s["warped"]))
        ]
        panels.append(_grid_panel(s["fixed"], s["flow_r"], s["flow_c"], up))
        panels.append(np.kron(_jacobian_rgb(s["jac"]), k))
        for c, p in enumerate(panels):
            place(r, c, p)
    h, w = mosaic.shape[:2]
    top, left = 40, 70
    fig = Figure(figsize=((w + left) / dpi, (h + top) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((left / (w + left), 0.0, w / (w + left), h / (h + top)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for c, label in enumerate(cols):
        fig.text(
            (left + c * (pw + gap) + pw / 2) / (w + left),
            1 - (top - 4) / (h + top),
            label,
            ha="center",
            va="bottom",
            fontsize=9,
        )
    for r, name in enumerate(PLANES):
        fig.text(
            4 / (w + left),
            1 - (top + r * (ph + gap) + ph / 2) / (h + top),
            name,
            ha="left",
            va="center",
            fontsize=9,
        )
    if title:
        fig.text(0.5, 1 - 4 / (h + top), title, ha="center", va="top", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
