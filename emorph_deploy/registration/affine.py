"""Fast intensity-based affine pre-alignment (``--affine``) on a downsampled pair.

Both images are block-averaged to ~``spacing_mm`` (anti-aliased, no resampling; each coarser level from
the next finer one), normalised to [0, 1], and a 12-parameter affine ``T`` (fixed world → moving world, RAS
mm) maximises the global NCC between the fixed foreground voxels and the moving image sampled at ``T p``,
coarse-to-fine (2x ``spacing_mm``, then ``spacing_mm``), initialised by matching the intensity centres of
mass.

The optimiser is Levenberg-Marquardt on the NCC's Gauss-Newton model: each evaluation gathers the 8 trilinear
corners of every point once and returns the value and its exact gradient (the derivative of the
interpolant, as autograd of ``grid_sample`` would give), hence the NCC, its gradient and a 12x12
Gauss-Newton matrix from one (14, N) Gram product. It converges in 5-15 evaluations per level where Adam
needed 200 iterations: ~0.06-0.08 s on the demo pair (1.5 mm head to the 2 mm template), against 0.6-0.7 s,
with the same result (NCC on the 2 mm grid 0.485 both; a known affine recovered to 0.012 in the linear part
and 0.25 mm).

``T`` composes into the outputs: the moving image is resampled for the model with ``T`` folded into its affine
(``T^-1 @ A_moving``, no data copy), and the displacement written is ``d(p) = T(p + u(p)) - p``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["AffineConfig", "AffineResult", "affine_prealign"]


@dataclass(frozen=True)
class AffineConfig:
    """Settings of the affine pre-alignment. All defaults live here."""

    spacing_mm: float = 4.0  # finest level
    levels: int = 2  # coarse-to-fine levels (spacing_mm * 2**(levels-1) ... spacing_mm)
    iterations: tuple[int, ...] = (40, 20)  # at most, per level, coarse first (Levenberg-Marquardt steps)
    max_points: int = 12_000  # fixed foreground points per level (a fixed-seed subset beyond this)
    tolerance: float = 1e-5  # stop a level when an accepted step gains less NCC than this
    max_scale_change: float = 0.5  # reject solutions whose singular values leave [1/(1+x), 1+x]


@dataclass
class AffineResult:
    matrix: np.ndarray  # (4, 4) float64: fixed world (RAS mm) → moving world (RAS mm)
    ncc_init: float  # global NCC at the start of the finest level (after the coarse levels)
    ncc_final: float
    seconds: float


def _block_mean(t: torch.Tensor, f: list[int]) -> torch.Tensor:
    """Non-overlapping ``f``-block means of the C-contiguous (D, H, W) ``t`` (trailing partial blocks
    dropped, like ``avg_pool3d``) → (1, 1, d, h, w). torch's CPU ``avg_pool3d`` runs one thread per
    (batch, channel) plane, so the slabs of whole blocks along axis 0 go in as a batch: every core works,
    same sums."""
    if max(f) == 1:
        return t[None, None]
    nb = t.shape[0] // f[0]
    parts = max(1, min(torch.get_num_threads(), nb))
    per = nb // parts
    main = per * parts * f[0]
    body = F.avg_pool3d(t[:main].reshape(parts, 1, per * f[0], *t.shape[1:]), kernel_size=f, stride=f)
    body = body.reshape(1, 1, parts * per, *body.shape[3:])
    if main < nb * f[0]:
        tail = F.avg_pool3d(t[None, None, main : nb * f[0]], kernel_size=f, stride=f)
        body = torch.cat([body, tail], dim=2)
    return body


def _pooled(
    data: np.ndarray | torch.Tensor, affine: np.ndarray, target_mm: float
) -> tuple[torch.Tensor, np.ndarray]:
    """Block-average a 3D array to ~``target_mm`` voxels; return (1, 1, d, h, w) float32 and its affine.

    A Fortran-ordered array (nibabel's) is pooled as its reversed C-ordered view, not copied: the affine
    takes the axis reversal, so the world geometry is the same."""
    affine = np.asarray(affine, dtype=np.float64)
    if isinstance(data, torch.Tensor):
        t = data.contiguous()
    else:
        from emorph_deploy.sampling import c_order_view

        arr, p = c_order_view(np.asarray(data))
        affine = affine @ p
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype != torch.float32:
        t = t.float()
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    f = [max(1, min(round(target_mm / s), n // 2 or 1)) for s, n in zip(spacing, t.shape, strict=True)]
    scale = np.eye(4)
    scale[:3, :3] = np.diag(f)
    scale[:3, 3] = (np.asarray(f, dtype=np.float64) - 1) / 2
    return _block_mean(t, f).contiguous(), affine @ scale


def _pyramid(
    data: np.ndarray, affine: np.ndarray, finest_mm: float, levels: int
) -> list[tuple[torch.Tensor, np.ndarray]]:
    """Coarse-to-fine levels at ~``finest_mm * 2**k``: the finest block-averaged from the native voxels, each
    coarser one from the next finer level (cheap; blocks of whole finer voxels)."""
    out = [_pooled(data, affine, finest_mm)]
    for k in range(1, levels):
        t, a = out[-1]
        out.append(_pooled(t[0, 0], a, finest_mm * 2**k))
    return out[::-1]


def _normalise(t: torch.Tensor) -> torch.Tensor:
    nz = t[t > 0]
    if nz.numel() < 16:
        nz = t.reshape(-1)
    lo, hi = 0.0, 1.0
    if nz.numel():
        sub = nz[:: max(1, nz.numel() // 200_000)].numpy()
        lo, hi = (float(v) for v in np.quantile(sub, [0.01, 0.99]))  # numpy's selection: ~5x torch's sort
    if not hi > lo:
        lo, hi = float(t.min()), float(t.max())
    return ((t - lo) / max(hi - lo, 1e-12)).clamp_(0.0, 1.0)


def _com(t: torch.Tensor, affine: np.ndarray) -> np.ndarray:
    """Intensity centre of mass in world mm."""
    vol = t[0, 0].double()
    total = float(vol.sum())
    idx = []
    for ax in range(3):
        prof = vol.sum(dim=tuple(a for a in range(3) if a != ax))
        idx.append(float((prof * torch.arange(prof.numel(), dtype=torch.float64)).sum()) / max(total, 1e-12))
    return np.asarray(affine)[:3, :3] @ np.asarray(idx) + np.asarray(affine)[:3, 3]


def _world_points(flat: torch.Tensor, shape: tuple[int, ...], affine: np.ndarray) -> torch.Tensor:
    """World mm (N, 3) of the voxels with C-order flat indices ``flat`` in a volume of ``shape``."""
    _, h, w = shape
    ijk = torch.stack([flat // (h * w), (flat // w) % h, flat % w], dim=1).to(torch.float32)
    a = torch.as_tensor(affine, dtype=torch.float32)
    return ijk @ a[:3, :3].T + a[:3, 3]


def _axis_corners(x: torch.Tensor, n: int, stride: int) -> tuple[torch.Tensor, ...]:
    """One axis of trilinear sampling with zero padding: the two corners' flat offsets (clamped; ``(2, N)``
    int64), their weights and the weights' derivatives along the axis (``(2, N)`` float32, zero outside)."""
    lo = torch.floor(x)
    frac = x - lo
    lo = lo.long()
    idx = torch.stack([lo, lo + 1])  # (2, N)
    inside = ((idx >= 0) & (idx <= n - 1)).to(x.dtype)
    weight = torch.stack([1.0 - frac, frac]) * inside
    dweight = torch.stack([-inside[0], inside[1]])
    return idx.clamp_(0, n - 1).mul_(stride), weight, dweight


def _trilinear_with_gradient(vol: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``vol`` (D, H, W) at array coordinates ``idx`` (3, N) (zeros outside, like
    ``grid_sample(padding_mode="zeros", align_corners=True)``) and their exact derivatives along array axes
    0, 1, 2: returns (4, N) = value, d/da0, d/da1, d/da2. One gather of the 8 corners."""
    flat = vol.reshape(-1)
    (o0, w0, d0), (o1, w1, d1), (o2, w2, d2) = (
        _axis_corners(idx[a], vol.shape[a], vol.stride(a)) for a in range(3)
    )
    corners = flat.take(o0[:, None, None] + o1[None, :, None] + o2[None, None, :])  # (2, 2, 2, N)
    along2 = torch.stack([(corners * w2).sum(2), (corners * d2).sum(2)])  # (2, 2, 2, N): [value | d2, a0, a1]
    along1 = (along2 * w1).sum(2)  # (2, 2, N): [value | d2, a0]
    dalong1 = (along2[0] * d1).sum(1)  # (2, N): d1 by a0
    value = (along1[0] * w0).sum(0)
    return torch.stack([value, (along1[0] * d0).sum(0), (dalong1 * w0).sum(0), (along1[1] * w0).sum(0)])


def _centred_unit(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(x - mean) / ||x - mean|| and that norm (float64)."""
    xc = x.double() - x.double().mean()
    norm = float(torch.linalg.vector_norm(xc))
    return xc / max(norm, 1e-12), norm


class _Level:
    """The NCC of one pyramid level as a function of the 12 affine parameters, with its Gauss-Newton model.

    Parameters ``theta`` (float64, 12): ``lin`` (3x3, row-major; ``T_lin = I + lin``) then the translation
    (mm); ``T p = (I + lin)(p - c) + c + t``. ``evaluate`` samples the moving value and its exact gradient at
    ``T p`` for every fixed point and returns the NCC ``rho``, its gradient ``g`` and the Gauss-Newton matrix
    ``H`` of the residual ``f^ - m^`` (both centred, unit norm), so that ``rho(theta + d) ≈ rho + g.d -
    d.H.d / 2``.
    """

    def __init__(
        self, mv: torch.Tensor, mv_aff: np.ndarray, p_c: torch.Tensor, fvals: torch.Tensor, c: np.ndarray
    ) -> None:
        self.vol = mv[0, 0].contiguous()  # (D, H, W)
        self.w2i = np.linalg.inv(mv_aff)  # moving world → array index
        self.w2i_lin = torch.as_tensor(self.w2i[:3, :3], dtype=torch.float32)
        self.p_c = p_c.T.contiguous()  # (3, N) float32, fixed points minus the centre c (mm)
        self.c = np.asarray(c, dtype=np.float64)
        f_hat, _ = _centred_unit(fvals)
        self.f_hat64 = f_hat  # (N,) float64
        self.f_hat = f_hat.float()

    def evaluate(self, theta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        lin = np.eye(3) + theta[:9].reshape(3, 3)
        m_lin, m_off = self.w2i[:3, :3], self.w2i[:3, 3]
        # moving array coordinates of T p, one (3, N) GEMM: M (I + lin) (p - c) + M (c + t) + m_off
        mat = torch.as_tensor(m_lin @ lin, dtype=torch.float32)
        off = torch.as_tensor(m_lin @ (self.c + theta[9:]) + m_off, dtype=torch.float32)
        s = _trilinear_with_gradient(self.vol, torch.addmm(off[:, None], mat, self.p_c))  # (4, N)
        m_hat, m_norm = _centred_unit(s[0])
        rho = float(self.f_hat64 @ m_hat)
        grad_q = self.w2i_lin.T @ s[1:]  # (3, N) d m / d world at T p
        d = torch.cat([(grad_q[:, None, :] * self.p_c[None]).reshape(9, -1), grad_q])  # (12, N) d m / d theta
        rows = torch.cat([d - d.mean(dim=1, keepdim=True), m_hat.float()[None], self.f_hat[None]])  # (14, N)
        gram = (rows @ rows.T).double().numpy()
        h, b_m, b_f = gram[:12, :12], gram[:12, 12], gram[:12, 13]
        m_norm = max(m_norm, 1e-12)
        grad = (b_f - rho * b_m) / m_norm
        gn = (h - np.outer(b_m, b_m)) / m_norm**2
        return rho, grad, gn


def _fit_level(
    level: _Level, theta: np.ndarray, iterations: int, tol: float
) -> tuple[np.ndarray, float, float]:
    """Levenberg-Marquardt ascent of the NCC from ``theta``; returns (theta, rho at start, rho at end).

    A step is taken only if it raises the NCC; the level ends when a step gains less than ``tol``, when the
    Gauss-Newton model predicts less than that, after three failed steps in a row (each with 10x the
    damping), or after ``iterations`` evaluations."""
    rho, grad, gn = level.evaluate(theta)
    rho0 = rho
    damping = 1e-3
    rejected = 0
    for _ in range(iterations):
        diag = np.diag(gn).copy()
        diag = np.maximum(diag, 1e-9 * max(float(diag.max()), 1e-30))
        try:
            step = np.linalg.solve(gn + damping * np.diag(diag), grad)
        except np.linalg.LinAlgError:
            damping *= 10.0
            continue
        if float(grad @ step - 0.5 * step @ gn @ step) < tol:  # the model's predicted gain: converged
            break
        cand = theta + step
        rho_c, grad_c, gn_c = level.evaluate(cand)
        if np.isfinite(rho_c) and rho_c > rho:
            gain = rho_c - rho
            theta, rho, grad, gn = cand, rho_c, grad_c, gn_c
            damping = max(damping * 0.3, 1e-7)
            if gain < tol:
                break
            rejected = 0
        else:
            damping *= 10.0
            rejected += 1
            if rejected == 3:  # three shrinking steps in a row fail: at the interpolation's noise floor
                break
    return theta, rho0, rho


def affine_prealign(
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    config: AffineConfig | None = None,
) -> AffineResult:
    """Fit ``T`` (fixed world → moving world) so that ``moving(T p) ≈ fixed(p)``; see the module docstring."""
    import time

    cfg = config or AffineConfig()
    t0 = time.perf_counter()
    c: np.ndarray | None = None
    theta = np.zeros(12)
    ncc_init = ncc_final = float("nan")
    levels = max(1, cfg.levels)
    iters = tuple(cfg.iterations) + (cfg.iterations[-1],) * max(0, levels - len(cfg.iterations))
    fixed_levels = _pyramid(fixed, fixed_affine, cfg.spacing_mm, levels)
    moving_levels = _pyramid(moving, moving_affine, cfg.spacing_mm, levels)
    for level in range(levels):
        (fx, fx_aff), (mv, mv_aff) = fixed_levels[level], moving_levels[level]
        fx = _normalise(fx)
        mv = _normalise(mv)
        if c is None:
            com_f, com_m = _com(fx, fx_aff), _com(mv, mv_aff)
            c = com_f
            theta[9:] = com_m - com_f
        fvals = fx.reshape(-1)
        flat = (fvals > 0.02).nonzero()[:, 0]  # foreground of the fixed image (plus a margin of blur)
        if flat.numel() <= 64:
            flat = torch.arange(fvals.numel())
        if flat.numel() > cfg.max_points:
            gen = torch.Generator().manual_seed(level)
            flat = flat[torch.randperm(flat.numel(), generator=gen)[: cfg.max_points]]
        pts = _world_points(flat, tuple(fx.shape[2:]), fx_aff)  # (N, 3) world mm
        fvals = fvals[flat]
        p_c = pts - torch.as_tensor(c, dtype=torch.float32)
        level_fit = _Level(mv, mv_aff, p_c, fvals, c)
        theta, rho0, ncc_final = _fit_level(level_fit, theta, iters[level], cfg.tolerance)
        if level == levels - 1:
            ncc_init = rho0
    assert c is not None
    m_lin = np.eye(3) + theta[:9].reshape(3, 3)
    sv = np.linalg.svd(m_lin, compute_uv=False)
    lim = 1.0 + cfg.max_scale_change
    if not (np.all(np.isfinite(sv)) and sv.min() > 1.0 / lim and sv.max() < lim and np.linalg.det(m_lin) > 0):
        m_lin = np.eye(3)  # degenerate fit: keep the centre-of-mass translation only
    out = np.eye(4)
    out[:3, :3] = m_lin
    out[:3, 3] = c + theta[9:] - m_lin @ c
    return AffineResult(
        matrix=out, ncc_init=ncc_init, ncc_final=float(ncc_final), seconds=time.perf_counter() - t0
    )
