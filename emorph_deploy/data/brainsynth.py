"""SynthMorph-style brain pairs: brain-shaped label maps, independent random contrasts, known labels.

Every pair is two *subjects* drawn from one anatomy (nilearn's MNI152 2009 T1 with its GM/WM maps, on the
model grid): each subject is the template under its own random smooth deformation (a stationary velocity
field integrated by scaling and squaring, up to ``max_disp_mm``) and its own residual affine (what
pre-alignment leaves: small rotation, scale, shear and translation). Registration must find the
correspondence between the two, whose ground truth is carried by the label maps, not by the intensities.
With ``known_flow`` the fixed subject is instead the moving subject under one more random subject map, so
the pair also carries its true displacement (``flow``) for a supervised endpoint-error loss.

Labels (``moving_labels``/``fixed_labels``, int64, 0 = background): every tissue class (CSF, GM, WM and,
for head pairs, extra-cerebral fluid, skull and scalp shells grown around the brain with random, smoothly
varying thickness) is split into ``parcels`` random smooth parcels drawn once per pair in template space, so
the soft-Dice loss supervises the deformation inside homogeneous tissue too, not only at tissue borders.

Intensities are synthesised per subject so that the model cannot rely on equal intensities:

- ``t1``: the template's own T1 intensities (same contrast, the common case);
- ``remap``: the T1 intensities through a random piecewise-linear lookup (monotone or not: inversion,
  T2-like orderings), with texture kept;
- ``labels``: a random mean per label plus within-label noise (SynthMorph's generative model).

A pair is same-contrast (both ``t1``, or both the same random lookup/means) with probability
``p_same_contrast``; otherwise the two subjects get independent contrasts. Then per image: Gaussian blur
(partial volume), a smooth multiplicative bias field, gamma, Rician-like noise inside the head, and the
project's intensity normalisation (percentiles of the nonzero voxels to [0, 1]).

All arithmetic is torch on the CPU, seeded by ``torch.Generator`` per pair: a pair is a deterministic
function of its seed. Shapes: images (1, D, H, W) float32; labels (1, D, H, W) int64; voxel units inside.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BrainSynthConfig", "BrainSynthPairs", "brain_pair", "heldout_pairs"]

#: Tissue classes of the base anatomy (before parcellation); 0 is background.
TISSUES = {1: "csf", 2: "gray matter", 3: "white matter", 4: "extra-cerebral fluid", 5: "skull", 6: "scalp"}
CONTRASTS = ("t1", "remap", "labels")


@dataclass(frozen=True)
class BrainSynthConfig:
    """Every knob of the brain-pair generator, with its default (lengths in mm unless said otherwise)."""

    parcels: int = 3  # random smooth parcels per tissue class (Dice supervision inside tissue)
    parcel_scale_mm: float = 40.0  # control spacing of the parcel noise
    max_disp_mm: float = 15.0  # largest displacement of one subject's nonlinear deformation
    velocity_spacing_mm: tuple[float, float] = (16.0, 48.0)  # range of the velocity control spacing
    # a second, fine-scale deformation (gyral scale: what distinct brains differ by after a smooth warp);
    # 0 = off, the generator then draws exactly the pairs it drew before this option existed
    fine_disp_mm: float = 0.0
    fine_spacing_mm: tuple[float, float] = (6.0, 12.0)
    rotation_deg: float = 6.0  # residual affine per subject: uniform ± per axis
    scale: float = 0.06  # ± relative, per axis
    shear: float = 0.03  # ± per off-diagonal term
    translation_mm: float = 6.0  # ± per axis
    # scales the four affine ranges above only: < 1 gives pairs as emorph's affine pre-alignment leaves them
    # (a small relative affine), so training spends itself on the nonlinear part
    affine_fraction: float = 1.0
    p_head: float = 0.5  # pairs with skull and scalp shells around the brain (else skull-stripped)
    p_same_contrast: float = 0.5
    p_t1_given_same: float = 0.6  # same-contrast pairs that keep the template's own T1 contrast
    contrast_weights: tuple[float, float, float] = (0.2, 0.4, 0.4)  # t1 / remap / labels, different pairs
    blur_sigma_vox: tuple[float, float] = (0.0, 1.0)
    bias_std: float = 0.3  # std of the log bias field
    gamma_std: float = 0.25  # std of log gamma
    noise_std: tuple[float, float] = (0.0, 0.05)
    amplitude: float = 1.0  # scales deformation and affine ranges (curriculum)
    # the fixed subject is the moving one under one more random subject map (deformations and residual
    # affine drawn as above), so the pair carries its true flow (``flow``) for a supervised endpoint loss;
    # False = two independent subjects, exactly the pairs drawn before this option existed
    known_flow: bool = False
    # share of pairs whose fixed subject is the moving one under a further subject map of random strength
    # (deformation and affine ranges × uniform 0..1): near-identical pairs, which teach the network that
    # identical anatomy needs no displacement (a network trained only on distinct subjects moves identical
    # images; docs/model_card.md); 0 = off, the generator then draws exactly the pairs it drew before
    p_same_subject: float = 0.0
    # share of pairs whose labels inside the head are random smooth shapes instead of tissue parcels, both
    # images in random per-label contrasts (SynthMorph's shapes): matching that cannot lean on the one
    # template anatomy every other pair is drawn from; 0 = off (no extra draw)
    p_shapes: float = 0.0
    shape_labels: tuple[int, int] = (12, 32)  # labels per shapes map, uniform in this range
    shape_scale_mm: tuple[float, float] = (8.0, 24.0)  # control spacing of the shapes' noise

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ anatomy
@dataclass(frozen=True)
class _Anatomy:
    t1: torch.Tensor  # (1, 1, D, H, W) float32 in [0, 1], brain only
    tissue: torch.Tensor  # (1, 1, D, H, W) int64, 0 bg, 1 CSF, 2 GM, 3 WM
    outside_mm: torch.Tensor  # (1, 1, D, H, W) float32, distance to the brain in mm (0 inside)
    spacing_mm: float


@functools.lru_cache(maxsize=4)
def _anatomy(shape: tuple[int, int, int], spacing_mm: float | None) -> _Anatomy:
    from scipy.ndimage import distance_transform_edt

    from emorph_deploy.data.synthetic import load_template

    sp = None if spacing_mm is None else (float(spacing_mm),) * 3
    tpl = load_template(shape, sp)
    spacing = float(tpl.affine[0, 0])
    brain = tpl.labels > 0
    outside = distance_transform_edt(~brain).astype(np.float32) * spacing
    as5 = lambda a: torch.from_numpy(np.ascontiguousarray(a))[None, None]  # noqa: E731
    return _Anatomy(
        as5(tpl.image.astype(np.float32)), as5(tpl.labels.astype(np.int64)), as5(outside), spacing
    )


# ------------------------------------------------------------------------------------------------ fields
def _uniform(g: torch.Generator, lo: float, hi: float, n: int = 1) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _smooth_field(
    g: torch.Generator, shape: tuple[int, ...], channels: int, spacing_vox: float
) -> torch.Tensor:
    """(1, C, D, H, W) smooth unit-variance noise: Gaussian noise on a grid ~``spacing_vox`` coarser,
    trilinearly upsampled (align_corners=True, so the coarse corners sit on the volume's corners)."""
    coarse = [max(2, math.ceil((s - 1) / spacing_vox) + 1) for s in shape]
    noise = torch.randn((1, channels, *coarse), generator=g)
    return F.interpolate(noise, size=tuple(shape), mode="trilinear", align_corners=True)


def _integrate(velocity: torch.Tensor, steps: int = 6) -> torch.Tensor:
    """Scaling and squaring of a stationary velocity (1, 3, D, H, W) in voxels → displacement (voxels)."""
    disp = velocity / (2**steps)
    for _ in range(steps):
        disp = disp + _warp(disp, disp, "bilinear", "border")
    return disp


@functools.lru_cache(maxsize=8)
def _identity(shape: tuple[int, ...]) -> torch.Tensor:
    """(1, 3, D, H, W) voxel coordinates (channel k = index along axis k); cached per shape, never written
    to (callers build new tensors from it)."""
    axes = [torch.arange(s, dtype=torch.float32) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def _sample(src: torch.Tensor, coords: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
    """``src`` (1, C, D, H, W) at voxel ``coords`` (1, 3, D', H', W') with align_corners=True."""
    shape = src.shape[2:]
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape]).view(1, 3, 1, 1, 1)
    grid = (coords * scale - 1.0).flip(1).permute(0, 2, 3, 4, 1)  # (1, D', H', W', 3) as (x=W, y=H, z=D)
    return F.grid_sample(src, grid, mode=mode, padding_mode=padding, align_corners=True)


def _warp(src: torch.Tensor, disp: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
    return _sample(src, _identity(tuple(disp.shape[2:])) + disp, mode, padding)


def _svf_displacement(
    g: torch.Generator,
    shape: tuple[int, int, int],
    spacing_mm: float,
    control_spacing_mm: tuple[float, float],
    max_disp_mm: float,
    min_downsample: int = 1,
    steps: int = 6,
) -> torch.Tensor:
    """(1, 3, D, H, W) displacement in voxels of a random diffeomorphism: a smooth stationary velocity
    (control spacing uniform in ``control_spacing_mm``, largest displacement uniform in 0..``max_disp_mm``)
    integrated by ``steps`` of scaling and squaring on a grid ``min_downsample``x coarser or more."""
    lo, hi = control_spacing_mm
    ctrl_vox = float(_uniform(g, lo, hi)) / spacing_mm
    # build and integrate the velocity on a grid ~4x coarser than its control spacing allows
    ds = max(min_downsample, int(ctrl_vox // 4))
    small = tuple(max(2, math.ceil((s - 1) / ds) + 1) for s in shape)
    vel = _smooth_field(g, small, 3, ctrl_vox / ds)
    norm = vel.pow(2).sum(1).sqrt().amax()
    disp_vox = float(_uniform(g, 0.0, max_disp_mm)) / spacing_mm
    vel = vel * (disp_vox / ds / max(float(norm), 1e-6))
    disp = _integrate(vel, steps) * ds  # → fine voxels
    return F.interpolate(disp, size=shape, mode="trilinear", align_corners=True)


def _subject_map(
    g: torch.Generator, shape: tuple[int, int, int], spacing_mm: float, cfg: BrainSynthConfig
) -> torch.Tensor:
    """Voxel coordinates (1, 3, D, H, W) in template space of one random subject: ``A x + t + u(x)``."""
    amp = cfg.amplitude
    disp = _svf_displacement(g, shape, spacing_mm, cfg.velocity_spacing_mm, cfg.max_disp_mm * amp)
    if cfg.fine_disp_mm > 0:  # compose: u(x) = u_fine(x) + u_coarse(x + u_fine(x))
        # integrated at half resolution with 4 squarings: a few voxels of displacement need no more, and a
        # full-resolution integration would double the cost of a pair
        fine = _svf_displacement(
            g, shape, spacing_mm, cfg.fine_spacing_mm, cfg.fine_disp_mm * amp, min_downsample=2, steps=4
        )
        disp = fine + _warp(disp, fine, "bilinear", "border")

    # the affine's own range: `affine_fraction` scales it, the deformations above keep `amplitude` only
    amp = cfg.amplitude * cfg.affine_fraction
    deg = math.radians(cfg.rotation_deg * amp)
    angles = _uniform(g, -deg, deg, 3).tolist()
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = math.cos(a), math.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    scale = np.diag(1.0 + _uniform(g, -cfg.scale * amp, cfg.scale * amp, 3).numpy())
    shear = np.eye(3)
    off = _uniform(g, -cfg.shear * amp, cfg.shear * amp, 6).numpy()
    shear[np.triu_indices(3, 1)] = off[:3]
    shear[np.tril_indices(3, -1)] = off[3:]
    lin = torch.from_numpy(rot @ scale @ shear).float()
    trans = _uniform(g, -cfg.translation_mm * amp, cfg.translation_mm * amp, 3).float() / spacing_mm
    centre = torch.tensor([(s - 1) / 2 for s in shape]).view(1, 3, 1, 1, 1)
    x = _identity(shape) - centre
    ax = torch.einsum("ij,bjdhw->bidhw", lin, x) + centre + trans.view(1, 3, 1, 1, 1)
    return ax + disp


# ------------------------------------------------------------------------------------------------ labels
def _template_labels(g: torch.Generator, anat: _Anatomy, head: bool, cfg: BrainSynthConfig) -> torch.Tensor:
    """Parcellated label map (1, 1, D, H, W) int64 in template space; 0 background."""
    shape = tuple(anat.tissue.shape[2:])
    tissue = anat.tissue.clone()
    if head:  # shells grown around the brain, thickness varying smoothly over the surface
        wiggle = _smooth_field(g, shape, 3, 30.0 / anat.spacing_mm)
        base = [_uniform(g, *r) for r in ((1.0, 4.0), (3.0, 8.0), (3.0, 10.0))]
        edges, acc = [], torch.zeros_like(anat.outside_mm)
        for k in range(3):
            acc = acc + (base[k] * (1.0 + 0.35 * wiggle[:, k : k + 1])).clamp_min(0.5).float()
            edges.append(acc)
        d = anat.outside_mm
        outside = d > 0
        tissue = torch.where(outside & (d <= edges[0]), torch.full_like(tissue, 4), tissue)
        tissue = torch.where(outside & (d > edges[0]) & (d <= edges[1]), torch.full_like(tissue, 5), tissue)
        tissue = torch.where(outside & (d > edges[1]) & (d <= edges[2]), torch.full_like(tissue, 6), tissue)
    k = max(1, cfg.parcels)
    if k == 1:
        return tissue
    parcel = _coarse_regions(g, shape, k, cfg.parcel_scale_mm / anat.spacing_mm)
    return torch.where(tissue > 0, (tissue - 1) * k + parcel + 1, torch.zeros_like(tissue))


def _coarse_regions(g: torch.Generator, shape: tuple[int, ...], k: int, scale_vox: float) -> torch.Tensor:
    """(1, 1, D, H, W) int64 region index 0..k-1: the argmax over ``k`` smooth noise channels of control
    spacing ``scale_vox`` voxels. The regions are coarse, so they are drawn at half resolution and repeated
    (the argmax over channels is the costly part)."""
    half = tuple((n + 1) // 2 for n in shape)
    region = _smooth_field(g, half, k, scale_vox / 2).argmax(1, keepdim=True)
    region = region.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    return region[:, :, : shape[0], : shape[1], : shape[2]]


def _shape_labels(
    g: torch.Generator, inside: torch.Tensor, spacing_mm: float, cfg: BrainSynthConfig
) -> torch.Tensor:
    """Random smooth shapes (1, 1, D, H, W) int64 labelled 1..K inside the boolean ``inside``, 0 outside
    (:func:`_coarse_regions`, as the parcels are drawn)."""
    k = int(torch.randint(cfg.shape_labels[0], cfg.shape_labels[1] + 1, (1,), generator=g))
    scale_vox = float(_uniform(g, *cfg.shape_scale_mm)) / spacing_mm
    lab = _coarse_regions(g, tuple(inside.shape[2:]), k, scale_vox)
    return torch.where(inside, lab + 1, torch.zeros_like(lab))


# ------------------------------------------------------------------------------------------------ contrast
@dataclass(frozen=True)
class _Contrast:
    kind: str
    lookup: torch.Tensor | None = None  # remap: values at evenly spaced T1 levels
    means: torch.Tensor | None = None  # labels: mean per label value
    stds: torch.Tensor | None = None


def _draw_contrast(g: torch.Generator, kind: str, n_labels: int) -> _Contrast:
    if kind == "remap":
        knots = int(torch.randint(3, 7, (1,), generator=g))
        return _Contrast(kind, lookup=torch.rand(knots, generator=g))
    if kind == "labels":
        means = torch.rand(n_labels, generator=g)
        means[0] = 0.0
        return _Contrast(kind, means=means, stds=torch.rand(n_labels, generator=g) * 0.08)
    return _Contrast("t1")


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma < 0.1:
        return img
    r = max(1, math.ceil(2.5 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * r + 1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        img = F.conv3d(F.pad(img, pad, mode="replicate"), k.view(shape))
    return img


def _render(
    g: torch.Generator,
    contrast: _Contrast,
    t1: torch.Tensor,
    labels: torch.Tensor,
    head_mask: torch.Tensor,
    cfg: BrainSynthConfig,
) -> torch.Tensor:
    """One subject's image (1, 1, D, H, W) in [0, 1] from its warped T1 and labels."""
    shape = tuple(t1.shape[2:])
    if contrast.kind == "labels":
        assert contrast.means is not None and contrast.stds is not None
        img = contrast.means[labels] + contrast.stds[labels] * torch.randn(t1.shape, generator=g)
    else:
        # non-brain head tissue has no T1 in the template: give each shell a random level, textured
        shell = torch.rand(8, generator=g)
        shell_level = shell[((labels - 1).clamp_min(0) // max(1, cfg.parcels) + 1).clamp_max(7)]
        base = torch.where(t1 > 0, t1, shell_level * (labels > 0))
        if contrast.kind == "remap":
            assert contrast.lookup is not None
            lut = contrast.lookup
            pos = base.clamp(0, 1) * (lut.numel() - 1)
            lo = pos.floor().long().clamp_max(lut.numel() - 2)
            frac = pos - lo
            img = lut[lo] * (1 - frac) + lut[lo + 1] * frac
        else:
            img = base
    img = img * (labels > 0)
    img = _blur(img, float(_uniform(g, *cfg.blur_sigma_vox)))
    if cfg.bias_std > 0:
        img = img * torch.exp(_smooth_field(g, shape, 1, 24.0) * float(_uniform(g, 0.0, cfg.bias_std)))
    img = img.clamp_min(0) ** math.exp(float(torch.randn(1, generator=g)) * cfg.gamma_std)
    sd = float(_uniform(g, *cfg.noise_std))
    if sd > 0:  # Rician-like: magnitude of a complex Gaussian inside the head
        img = (
            torch.sqrt(
                (img + sd * torch.randn(t1.shape, generator=g)) ** 2
                + (sd * torch.randn(t1.shape, generator=g)) ** 2
            )
            * head_mask
        )
    return _normalise(img)


def _normalise(img: torch.Tensor, percentiles: tuple[float, float] = (0.5, 99.5)) -> torch.Tensor:
    """The project's normalisation: percentiles of the nonzero voxels → [0, 1], clipped."""
    flat = img.reshape(-1)
    nz = flat[flat > 0]
    if nz.numel() < 16:
        return img.clamp(0, 1)
    if nz.numel() > 50_000:  # percentiles of a strided subset: same to ~1e-3, much cheaper
        nz = nz[:: nz.numel() // 50_000]
    q = torch.quantile(nz, torch.tensor([p / 100 for p in percentiles]))
    lo, hi = float(q[0]), float(q[1])
    if hi <= lo:
        return img.clamp(0, 1)
    return ((img - lo) / (hi - lo)).clamp(0, 1) * (img > 0)


# ------------------------------------------------------------------------------------------------ pairs
def _generator(seed: Any) -> torch.Generator:
    seq = np.random.SeedSequence(list(seed) if isinstance(seed, (tuple, list)) else int(seed))
    return torch.Generator().manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] >> 1))


def _choose_contrasts(g: torch.Generator, cfg: BrainSynthConfig) -> tuple[str, str, bool]:
    if float(torch.rand(1, generator=g)) < cfg.p_same_contrast:
        kind = (
            "t1"
            if float(torch.rand(1, generator=g)) < cfg.p_t1_given_same
            else CONTRASTS[1 + int(torch.randint(0, 2, (1,), generator=g))]
        )
        return kind, kind, True
    w = torch.tensor(cfg.contrast_weights, dtype=torch.float64)
    a, b = (CONTRASTS[int(torch.multinomial(w, 1, generator=g))] for _ in range(2))
    return a, b, a == b == "t1"


def _forced_contrasts(
    g: torch.Generator, cfg: BrainSynthConfig, n_labels: int, contrast: str | None
) -> tuple[_Contrast, _Contrast, bool]:
    """Moving and fixed contrasts and whether they are one: drawn, or with the relation forced."""
    kind_m, kind_f, same = _choose_contrasts(g, cfg)
    if contrast == "same":
        kind_f, same = kind_m, True
    elif contrast == "different":
        while kind_f == kind_m == "t1":
            kind_f = CONTRASTS[1 + int(torch.randint(0, 2, (1,), generator=g))]
        same = False
    c_m = _draw_contrast(g, kind_m, n_labels)
    return c_m, c_m if same else _draw_contrast(g, kind_f, n_labels), same


def brain_pair(
    shape: tuple[int, int, int] = (80, 96, 112),
    seed: Any = 0,
    spacing_mm: float | None = 2.0,
    config: BrainSynthConfig | None = None,
    contrast: str | None = None,
    render_seed: Any = None,
) -> dict[str, Any]:
    """One training/validation pair as a dict of tensors.

    ``moving``/``fixed`` (1, D, H, W) float32 in [0, 1]; ``moving_labels``/``fixed_labels`` (1, D, H, W)
    int64; ``same_contrast`` (scalar float tensor, 1 when both images share one contrast); ``contrast``
    (str, e.g. ``"t1/remap"``). ``contrast="same"`` / ``"different"`` forces the pair's contrast relation
    (held-out validation sets); ``None`` draws it. ``spacing_mm`` None fits the brain into the grid (tests).
    With ``config.known_flow``, also ``flow`` (3, D, H, W) float32 voxels: the true displacement, i.e. the
    fixed subject is the moving one sampled at ``x + flow(x)``.

    ``render_seed`` (with ``contrast`` forced) draws the contrasts and the rendering from their own seed,
    the anatomy and deformations from ``seed``: the "same" and "different" pairs of one ``(seed,
    render_seed)`` are then one geometry with an identical moving image, the fixed image rendered in the
    moving image's contrast or in another one (paired held-out sets, :func:`heldout_pairs`). ``None``: one
    seed draws everything (training pairs).
    """
    cfg = config or BrainSynthConfig()
    shape = tuple(int(s) for s in shape)
    anat = _anatomy(shape, spacing_mm)
    g = _generator(seed)
    head = float(torch.rand(1, generator=g)) < cfg.p_head
    labels_t = _template_labels(g, anat, head, cfg)
    shapes = cfg.p_shapes > 0 and float(torch.rand(1, generator=g)) < cfg.p_shapes
    if shapes:  # the head's outline kept, random shapes inside it
        labels_t = _shape_labels(g, labels_t > 0, anat.spacing_mm, cfg)
    n_labels = int(labels_t.max()) + 1
    if shapes:  # no T1 to render: random per-label means, one set for both images or two (training pairs)
        same = contrast == "same" or (
            contrast is None and float(torch.rand(1, generator=g)) < cfg.p_same_contrast
        )
        c_m = _draw_contrast(g, "labels", n_labels)
        c_f = c_m if same else _draw_contrast(g, "labels", n_labels)
        gr = g
    elif render_seed is not None:
        if contrast not in ("same", "different"):
            raise ValueError(f"render_seed needs contrast 'same' or 'different', got {contrast!r}")
        gr = _generator(render_seed)
        # both contrasts always drawn: a paired "same" pair consumes gr exactly as its "different" twin
        c_m, c_other, _ = _forced_contrasts(gr, cfg, n_labels, "different")
        c_f, same = (c_m, True) if contrast == "same" else (c_other, False)
    else:
        gr = g
        c_m, c_f, same = _forced_contrasts(g, cfg, n_labels, contrast)
    labels_f = labels_t.float()
    out: dict[str, Any] = {}
    known: dict[str, torch.Tensor] = {}  # one subject: each role's template coordinates, drawn up front
    # near-identical pairs: the relative map's ranges scaled by u ~ U(0, 1); no draw at all when off
    one_subject = cfg.p_same_subject > 0 and float(torch.rand(1, generator=g)) < cfg.p_same_subject
    if cfg.known_flow or one_subject:
        strength = float(torch.rand(1, generator=g)) if one_subject else 1.0
        # fixed(x) = moving(x + flow(x)): the fixed subject's template coordinates are the moving
        # subject's, sampled at x + flow(x) (border: the map continues flat outside the grid)
        known["moving"] = _subject_map(g, shape, anat.spacing_mm, cfg)
        rel = cfg if strength == 1.0 else replace(cfg, amplitude=cfg.amplitude * strength)
        flow = _subject_map(g, shape, anat.spacing_mm, rel) - _identity(shape)
        known["fixed"] = _warp(known["moving"], flow, "bilinear", "border")
        if cfg.known_flow:  # every pair carries it (a batch collates one set of keys)
            out["flow"] = flow[0]
    for role, con in (("moving", c_m), ("fixed", c_f)):
        # independent subjects: each drawn in turn (the draw order of the pairs before known_flow)
        coords = known[role] if known else _subject_map(g, shape, anat.spacing_mm, cfg)
        t1 = _sample(anat.t1, coords, "bilinear", "zeros")
        lab = _sample(labels_f, coords, "nearest", "zeros").round().long()
        img = _render(gr, con, t1, lab, (lab > 0).float(), cfg)
        out[role] = img[0].float()
        out[f"{role}_labels"] = lab[0]
    out["same_contrast"] = torch.tensor(1.0 if same else 0.0)
    out["contrast"] = f"{c_m.kind}/{c_f.kind}"
    out["head"] = head
    out["same_subject"] = bool(known)
    out["shapes"] = shapes
    return out


def heldout_pairs(
    n: int = 8,
    shape: tuple[int, int, int] = (80, 96, 112),
    spacing_mm: float | None = 2.0,
    contrast: str = "same",
    seed: int = 20261205,
    config: BrainSynthConfig | None = None,
    paired: bool = False,
) -> list[dict[str, Any]]:
    """``n`` held-out pairs with a fixed contrast relation (``"same"`` or ``"different"``), seeds never drawn
    by training (training seeds are ``(seed, epoch, index)`` with a 3-tuple; these are ``(seed, 7, i)``
    for "same" and ``(seed, 8, i)`` for "different", with ``seed`` 20261205, outside the training seed's
    use).

    ``paired=True``: pair i of both relations is one geometry (seed ``(seed, 9, i)``) with an identical
    moving image; only the fixed image's contrast differs (render seed ``(seed, 9, i, 1)``), so "different
    − same" measures the contrast alone, not two draws of anatomy (the validation suite's comparison).
    ``False`` keeps the two independent sets the training runs log as ``dice_same``/``dice_diff``."""
    if contrast not in ("same", "different"):
        raise ValueError(f"contrast must be 'same' or 'different', got {contrast!r}")
    if paired:
        return [
            brain_pair(shape, (seed, 9, i), spacing_mm, config, contrast, render_seed=(seed, 9, i, 1))
            for i in range(n)
        ]
    return [
        brain_pair(shape, (seed, 7 if contrast == "same" else 8, i), spacing_mm, config, contrast)
        for i in range(n)
    ]


class BrainSynthPairs(torch.utils.data.Dataset):
    """Map-style dataset of generated pairs; key ``(epoch, index)`` → seed ``(seed, epoch, index)``.

    ``ramp_epochs`` > 0 scales deformation and affine ranges from 40 % to 100 % over that many epochs (an
    easy start for a fresh network); ``contrast`` forces same/different pairs (validation sets).
    """

    def __init__(
        self,
        length: int,
        shape: tuple[int, int, int],
        seed: int = 0,
        spacing_mm: float | None = 2.0,
        config: BrainSynthConfig | None = None,
        ramp_epochs: int = 0,
        contrast: str | None = None,
    ) -> None:
        self.length = int(length)
        self.shape = tuple(int(s) for s in shape)
        self.seed = int(seed)
        self.spacing_mm = spacing_mm
        self.config = config or BrainSynthConfig()
        self.ramp_epochs = int(ramp_epochs)
        self.contrast = contrast
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def amplitude(self, epoch: int) -> float:
        if self.ramp_epochs <= 0:
            return self.config.amplitude
        return self.config.amplitude * min(1.0, 0.4 + 0.6 * epoch / self.ramp_epochs)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        if not 0 <= index < self.length:
            raise IndexError(index)
        cfg = replace(self.config, amplitude=self.amplitude(int(epoch)))
        item = brain_pair(
            self.shape, (self.seed, int(epoch), int(index)), self.spacing_mm, cfg, self.contrast
        )
        item["index"] = int(index)
        return item
