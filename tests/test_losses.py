"""Tests for emorph_deploy.losses (small volumes, explicit tolerances)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from emorph_deploy.errors import InputError
from emorph_deploy.losses import DiffusionLoss, NCCLoss, SoftDiceLoss, one_hot

torch.set_num_threads(1)

KINDS = ("gaussian", "box")


def textured(shape=(1, 1, 24, 24, 24), seed=0) -> torch.Tensor:
    """Smooth random texture in [0, 1] (noise blurred by a 3³ box, rescaled)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float32)
    x = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = (x - x.amin()) / (x.amax() - x.amin())
    return x


# ----------------------------------------------------------------------------------------------- NCC
@pytest.mark.parametrize("kind", KINDS)
def test_ncc_identical_is_zero_and_minimum(kind):
    loss = NCCLoss(kind=kind)
    x = textured()
    l0 = loss(x, x).item()
    assert abs(l0) <= 1e-3
    g = torch.Generator().manual_seed(1)
    perturbed = [
        x + 0.1 * torch.randn(x.shape, generator=g),  # noise
        torch.roll(x, shifts=2, dims=2),  # shift
        F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False),  # blur
        textured(seed=5),  # unrelated image
    ]
    for y in perturbed:
        assert l0 <= loss(x, y).item() + 1e-6
        assert l0 <= loss(y, x).item() + 1e-6
    # inverted contrast: the squared correlation makes it equivalent to identical (up to float rounding)
    assert abs(loss(x, 1.0 - x).item() - l0) <= 1e-4
    # genuinely different images are clearly worse
    assert loss(x, textured(seed=5)).item() > l0 + 0.3
    assert loss(x, torch.roll(x, shifts=2, dims=2)).item() > l0 + 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_ncc_range_and_symmetry(kind):
    loss = NCCLoss(kind=kind)
    x, y = textured(seed=2), textured(seed=3)
    lxy, lyx = loss(x, y).item(), loss(y, x).item()
    assert -1e-6 <= lxy <= 1.0 + 1e-6
    assert abs(lxy - lyx) <= 1e-6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("scale", "offset"), [(2.0, 0.3), (0.5, -0.2), (3.0, 5.0)])
def test_ncc_affine_intensity_invariance(kind, scale, offset):
    # eps is a stabiliser that (by design) breaks exact scale invariance in low-variance regions; with a
    # negligible eps the loss is invariant to a·x + b (a > 0) for either image, borders included.
    loss = NCCLoss(kind=kind, eps=1e-8)
    x = textured(seed=0)
    y = torch.roll(x, shifts=1, dims=3) + 0.05 * textured(seed=7)  # a partly correlated image
    base = loss(x, y).item()
    assert abs(loss(x, scale * y + offset).item() - base) <= 1e-3
    assert abs(loss(scale * x + offset, y).item() - base) <= 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_ncc_offset_invariance_default_eps(kind):
    # an intensity offset leaves local variances and covariance unchanged, so it holds with the default eps
    loss = NCCLoss(kind=kind)
    x = textured(seed=0)
    y = torch.roll(x, shifts=1, dims=3) + 0.05 * textured(seed=7)
    base = loss(x, y).item()
    for offset in (-0.3, 0.4, 2.0):
        assert abs(loss(x, y + offset).item() - base) <= 1e-3
        assert abs(loss(x + offset, y).item() - base) <= 1e-3


def test_ncc_batch_consistency_and_channels():
    loss = NCCLoss()
    x = torch.cat([textured(seed=0), textured(seed=1)])  # (2, 1, 24, 24, 24)
    y = torch.cat([textured(seed=2), torch.roll(textured(seed=1), 1, dims=4)])
    batched = loss(x, y).item()
    singles = (loss(x[:1], y[:1]).item() + loss(x[1:], y[1:]).item()) / 2
    assert abs(batched - singles) <= 1e-6
    # channels are independent images: (1, 2, ...) equals the batch of 2
    assert abs(loss(x.transpose(0, 1), y.transpose(0, 1)).item() - batched) <= 1e-6


def test_ncc_gaussian_window_matches_dense_3d_kernel():
    """Separable Gaussian = dense 3D Gaussian with a normalised kernel (zero border, interior equal)."""
    loss = NCCLoss(window=5, sigma=1.0, border="zeros")
    k1 = loss.kernel.double()
    assert abs(k1.sum().item() - 1.0) <= 1e-6
    assert torch.allclose(k1, k1.flip(0), atol=1e-7)  # symmetric
    assert k1.argmax().item() == 2
    dense = (k1[:, None, None] * k1[None, :, None] * k1[None, None, :]).float()[None, None]
    x = textured((2, 3, 12, 13, 14))  # unequal axes: a filter along the wrong axis cannot pass
    ref = F.conv3d(x.reshape(6, 1, 12, 13, 14), dense, padding=2).reshape(x.shape)
    assert torch.allclose(loss._filter(x), ref, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_ncc_window_mass_is_filtered_ones(kind):
    loss = NCCLoss(window=7, kind=kind)
    x = textured((1, 1, 9, 11, 13))
    mass = loss._window_mass(x)
    assert torch.allclose(mass, loss._filter(torch.ones_like(x)), atol=1e-6)
    assert abs(mass[0, 0, 4, 5, 6].item() - 1.0) <= 1e-6  # interior: full window
    assert mass.min().item() > 0.0


def test_ncc_box_matches_avg_pool_interior():
    loss = NCCLoss(window=3, kind="box", border="zeros")
    x = textured((1, 1, 10, 10, 10))
    ref = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=True)
    assert torch.allclose(loss._filter(x), ref, atol=1e-6)


def test_ncc_zero_border_option_also_minimum_at_identity():
    loss = NCCLoss(border="zeros")
    x = textured()
    assert abs(loss(x, x).item()) <= 1e-3
    assert loss(x, torch.roll(x, 2, dims=2)).item() > loss(x, x).item()


@pytest.mark.parametrize("kind", KINDS)
def test_ncc_gradients_flow(kind):
    loss = NCCLoss(kind=kind)
    x = textured(seed=0)
    y = textured(seed=1).requires_grad_(True)
    out = loss(x, y)
    assert out.dim() == 0
    out.backward()
    assert y.grad is not None
    assert torch.isfinite(y.grad).all()
    assert y.grad.abs().sum().item() > 0.0


def test_ncc_rejects_bad_arguments():
    with pytest.raises(InputError):
        NCCLoss(window=8)
    with pytest.raises(InputError):
        NCCLoss(kind="triangle")
    with pytest.raises(InputError):
        NCCLoss(sigma=0.0)
    with pytest.raises(InputError):
        NCCLoss()(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 9))


def test_ncc_buffers_not_in_state_dict():
    assert NCCLoss().state_dict() == {}


# ----------------------------------------------------------------------------------------------- diffusion
def test_diffusion_constant_flow_is_zero():
    flow = torch.ones(2, 3, 8, 9, 10) * torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1, 1)
    assert DiffusionLoss()(flow).item() == 0.0


def test_diffusion_linear_ramp_analytic():
    d, h, w = 8, 9, 10
    alpha, beta = 0.3, -0.7
    i = torch.arange(d, dtype=torch.float64).view(d, 1, 1).expand(d, h, w)
    k = torch.arange(w, dtype=torch.float64).view(1, 1, w).expand(d, h, w)
    flow = torch.zeros(1, 3, d, h, w, dtype=torch.float64)
    flow[0, 0] = alpha * i  # ramp along axis 0 in channel 0
    assert abs(DiffusionLoss()(flow).item() - alpha**2 / 9) <= 1e-12
    flow[0, 2] = beta * k  # add a ramp along axis 2 in channel 2
    assert abs(DiffusionLoss()(flow).item() - (alpha**2 + beta**2) / 9) <= 1e-12
    # the same ramp along axis 1 in channel 1 (difference tensor of another shape: per-tensor means)
    flow2 = torch.zeros(2, 3, d, h, w, dtype=torch.float64)
    flow2[:, 1] = alpha * torch.arange(h, dtype=torch.float64).view(1, h, 1)
    assert abs(DiffusionLoss()(flow2).item() - alpha**2 / 9) <= 1e-12


def test_diffusion_gradients_flow():
    flow = (0.5 * torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(0))).requires_grad_()
    out = DiffusionLoss()(flow)
    assert out.dim() == 0 and out.item() > 0
    out.backward()
    assert torch.isfinite(flow.grad).all() and flow.grad.abs().sum().item() > 0


def test_diffusion_rejects_non_5d():
    with pytest.raises(InputError):
        DiffusionLoss()(torch.zeros(3, 8, 8, 8))


# -------------------------------------------------------------------------------------------- folding
def test_folding_determinant_matches_qc_jacobian_inside():
    """FoldingLoss.determinant equals QC's np.gradient-style det(I + ∇u) on the interior voxels."""
    import numpy as np

    from emorph_deploy.losses import FoldingLoss
    from emorph_deploy.qc import jacobian_determinant_fast

    flow = 0.6 * torch.randn(1, 3, 9, 10, 11, generator=torch.Generator().manual_seed(0))
    ref = jacobian_determinant_fast(flow.numpy())[1:-1, 1:-1, 1:-1]
    assert (ref <= 0).mean() > 0.01  # the field folds somewhere: the test sees both signs
    np.testing.assert_allclose(FoldingLoss.determinant(flow)[0].numpy(), ref, atol=1e-5)


def test_folding_zero_without_folds_and_pushes_back_where_folded():
    from emorph_deploy.losses import FoldingLoss

    loss = FoldingLoss(margin=0.05)
    i = torch.arange(8, dtype=torch.float32)
    stretch = torch.zeros(1, 3, 8, 8, 8)
    stretch[:, 0] = 0.5 * i[:, None, None]  # det 1.5 everywhere
    assert loss(torch.zeros(1, 3, 6, 6, 6)).item() == 0.0 and loss(stretch).item() == 0.0
    squash = torch.zeros(1, 3, 8, 8, 8)
    squash[:, 0] = -1.5 * i[:, None, None]  # det −0.5 everywhere: 0.05 + 0.5 per voxel
    assert loss(squash).item() == pytest.approx(0.55, abs=1e-6)
    flow = squash.clone().requires_grad_()
    loss(flow).backward()  # descending the penalty raises ∂u_0/∂x_0 back towards > −0.95
    assert flow.grad[0, 0, 0].mean() > 0 > flow.grad[0, 0, -1].mean()
    with pytest.raises(InputError):
        loss(torch.zeros(1, 3, 2, 8, 8))
    with pytest.raises(InputError):
        FoldingLoss(margin=-0.1)


@pytest.mark.parametrize("name", ["diffusion", "folding"])
def test_penalty_value_and_grad_equal_autograd(name):
    """The closed-form gradients refinement uses equal autograd's on a field that folds in places."""
    from emorph_deploy.losses import FoldingLoss

    loss = DiffusionLoss() if name == "diffusion" else FoldingLoss(margin=0.05)
    flow = 0.6 * torch.randn(2, 3, 7, 8, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = flow.clone().requires_grad_()
    value_ref = loss(ref)
    value_ref.backward()
    value, grad = loss.value_and_grad(flow)
    if name == "folding":
        assert 0.01 < float((FoldingLoss.determinant(flow) < 0.05).double().mean()) < 0.9  # both cases seen
    assert abs(float(value) - float(value_ref)) <= 1e-12
    assert grad.shape == flow.shape and float(grad.abs().max()) > 0
    assert float((grad - ref.grad).abs().max()) <= 1e-12
    _, grad0 = loss.value_and_grad(torch.zeros(1, 3, 5, 5, 5))  # no folds, no differences: zero gradient
    assert float(grad0.abs().max()) == 0.0


# ----------------------------------------------------------------------------------------------- Dice
def label_map(shape=(2, 1, 12, 12, 12), n=4, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, shape, generator=g)


def test_one_hot_values_and_shape():
    lab = label_map()
    oh = one_hot(lab, [0, 1, 2, 3])
    assert oh.shape == (2, 4, 12, 12, 12) and oh.dtype == torch.float32
    assert torch.equal(oh.sum(1), torch.ones(2, 12, 12, 12))
    assert torch.equal(oh.argmax(1, keepdim=True), lab)
    assert torch.equal(one_hot(lab, 4), oh)
    assert torch.equal(one_hot(lab.float(), range(4)), oh)
    # sparse label values: unlisted values are zero everywhere
    sparse = one_hot(lab * 10, [0, 20])
    assert torch.equal(sparse[:, 1:2], (lab == 2).float())
    assert torch.equal(sparse.sum(1, keepdim=True), ((lab == 0) | (lab == 2)).float())
    with pytest.raises(InputError):
        one_hot(lab[:, 0], 4)


def test_soft_dice_identical_is_zero():
    oh = one_hot(label_map(), 4)
    assert abs(SoftDiceLoss()(oh, oh).item()) <= 1e-6
    assert abs(SoftDiceLoss(include_background=False)(oh, oh).item()) <= 1e-6
    assert abs(SoftDiceLoss(squared=False)(oh, oh).item()) <= 1e-6


def test_soft_dice_known_value_and_background_option():
    # label 1: 8 voxels vs 8 voxels overlapping in 4 → dice 0.5; background dice computed by hand
    a = torch.zeros(1, 1, 4, 4, 4, dtype=torch.int64)
    b = torch.zeros_like(a)
    a[0, 0, 0:2, 0:2, 0:2] = 1
    b[0, 0, 1:3, 0:2, 0:2] = 1
    pa, pb = one_hot(a, 2), one_hot(b, 2)
    dice_fg = 2 * 4 / 16
    dice_bg = 2 * 52 / (56 + 56)
    assert abs(SoftDiceLoss(eps=0.0, include_background=False)(pa, pb).item() - (1 - dice_fg)) <= 1e-6
    expected = 1 - (dice_fg + dice_bg) / 2
    assert abs(SoftDiceLoss(eps=0.0)(pa, pb).item() - expected) <= 1e-6


def test_soft_dice_gradients_flow():
    lab = label_map(n=3)
    logits = torch.randn(2, 3, 12, 12, 12, generator=torch.Generator().manual_seed(3), requires_grad=True)
    out = SoftDiceLoss()(logits.softmax(1), one_hot(lab, 3))
    assert 0.0 < out.item() < 1.0
    out.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum().item() > 0


# ----------------------------------------------------------------------------------------------- MIND-SSC
def test_mind_pairs_are_the_twelve_sqrt2_pairs():
    from emorph_deploy.losses import MINDSSCLoss

    pairs = MINDSSCLoss().pairs
    assert len(pairs) == 12 and len(set(pairs)) == 12
    for p, q in pairs:
        assert sum(abs(c) for c in p) == 1 and sum(abs(c) for c in q) == 1
        assert sum((a - b) ** 2 for a, b in zip(p, q, strict=True)) == 2


def test_mind_descriptor_range_and_identical_is_zero():
    from emorph_deploy.losses import MINDSSCLoss

    loss, x = MINDSSCLoss(), textured()
    d = loss.descriptor(x)
    assert d.shape == (1, 12, 24, 24, 24)
    assert float(d.amin()) > 0.0 and float(d.amax()) <= 1.0 + 1e-6
    assert float(d.amax(dim=1).amin()) == pytest.approx(1.0, abs=1e-6)  # the closest pair has distance min
    assert float(loss(x, x)) == 0.0


def _shift_loss(loss, x: torch.Tensor, k: int) -> float:
    """loss between a 20³ crop and the same crop moved by k voxels along every axis."""
    a = x[..., 2:22, 2:22, 2:22]
    b = x[..., 2 + k : 22 + k, 2 + k : 22 + k, 2 + k : 22 + k]
    return float(loss(a, b))


@pytest.mark.parametrize(
    ("name", "remap", "tol"),
    [
        ("negation", lambda x: 1.0 - x, 1e-6),
        ("affine", lambda x: 3.0 * x + 2.0, 1e-6),
        ("gamma 0.5 (monotone)", lambda x: x.sqrt(), 0.2),
        ("exp (monotone)", lambda x: torch.exp(2.0 * x), 0.2),
    ],
)
def test_mind_invariant_to_intensity_remaps(name, remap, tol):
    """Affine maps (negation included): equal to float rounding. Monotone non-linear maps: the loss stays
    below ``tol`` × the loss of a 1-voxel shift of the unchanged image."""
    from emorph_deploy.losses import MINDSSCLoss

    loss, x = MINDSSCLoss(), textured(seed=3)
    remapped = float(loss(x, remap(x)))
    if tol < 1e-3:
        assert remapped < tol, (name, remapped)
    else:
        one_voxel = _shift_loss(loss, x, 1)
        assert remapped < tol * one_voxel, (name, remapped, one_voxel)


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_mind_box_matches_replicate_padded_average(radius):
    """MIND's separable box (banded matrices) = a (2r+1)³ mean over a replicate-padded copy."""
    from emorph_deploy.losses import MINDSSCLoss

    x = textured((1, 2, 9, 10, 11), seed=3)
    k = 2 * radius + 1
    ref = F.avg_pool3d(F.pad(x, (radius,) * 6, mode="replicate"), k, stride=1)
    assert torch.allclose(MINDSSCLoss(radius=radius)._box(x), ref, atol=1e-6)


def test_mind_decreases_as_a_shift_is_undone():
    from emorph_deploy.losses import MINDSSCLoss, NGFLoss

    x = textured(seed=5)
    for loss in (MINDSSCLoss(), MINDSSCLoss(radius=1, dilation=1), NGFLoss()):
        values = [_shift_loss(loss, x, k) for k in (2, 1, 0)]
        assert values[0] > values[1] > values[2], (loss, values)
    # and across an inversion: the loss against the inverted image orders the shifts the same way
    mind = MINDSSCLoss()
    a = x[..., 2:22, 2:22, 2:22]
    inv = [float(mind(a, 1.0 - x[..., 2 + k : 22 + k, 2 + k : 22 + k, 2 + k : 22 + k])) for k in (2, 1, 0)]
    assert inv[0] > inv[1] > inv[2] and inv[2] < 1e-6, inv


def test_mind_gradients_flow_and_rejects_bad_arguments():
    from emorph_deploy.losses import MINDSSCLoss

    x, y = textured(seed=1), textured(seed=2).requires_grad_(True)
    MINDSSCLoss()(x, y).backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum().item() > 0.0
    for kwargs in ({"radius": -1}, {"dilation": 0}, {"eps": 0.0}):
        with pytest.raises(InputError):
            MINDSSCLoss(**kwargs)
    with pytest.raises(InputError):
        MINDSSCLoss().descriptor(torch.zeros(1, 2, 8, 8, 8))
    with pytest.raises(InputError):
        MINDSSCLoss()(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 9))
    assert MINDSSCLoss().state_dict() == {}


# ----------------------------------------------------------------------------------------------- NGF
def test_ngf_range_and_affine_invariance():
    from emorph_deploy.losses import NGFLoss

    loss, x, y = NGFLoss(), textured(seed=1), textured(seed=2)
    same = float(loss(x, x))
    assert 0.0 <= same < 0.05  # the ε terms keep identical images just above 0
    assert abs(float(loss(x, 1.0 - x)) - same) < 1e-6
    assert abs(float(loss(x, 4.0 * x + 1.0)) - same) < 1e-5
    assert same < float(loss(x, y)) <= 1.0
    with pytest.raises(InputError):
        NGFLoss(eta=0.0)
    with pytest.raises(InputError):
        loss(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 9))


def test_prepared_fixed_image_equals_the_two_image_losses():
    """NCC's and NGF's ``prepare(b)`` + ``*_to(a, ·)`` (refinement's per-level cache of the fixed image) equal
    the plain two-image forms: the five-map local NCC written out with a dense 3D window, and NGF, values and
    gradients."""
    from emorph_deploy.losses import NGFLoss

    a, b = textured((1, 1, 10, 11, 12), seed=4), textured((1, 1, 10, 11, 12), seed=5)
    ncc = NCCLoss(window=5, sigma=1.0)
    k = ncc.kernel.double()
    dense = (k[:, None, None] * k[None, :, None] * k[None, None, :])[None, None]

    def local_cc_dense(x, y):  # the textbook form, float64, window renormalised at the borders
        x, y = x.double(), y.double()
        mean = lambda z: F.conv3d(z, dense, padding=2) / F.conv3d(torch.ones_like(z), dense, padding=2)  # noqa: E731
        mx, my = mean(x), mean(y)
        cov = mean(x * y) - mx * my
        vx, vy = (mean(x * x) - mx * mx).clamp(min=0), (mean(y * y) - my * my).clamp(min=0)
        return (cov * cov + ncc.eps) / (vx * vy + ncc.eps)

    ga, gr = a.clone().requires_grad_(), a.clone().double().requires_grad_()
    fast, ref = ncc.local_cc_to(ga, ncc.prepare(b)), local_cc_dense(gr, b)
    assert float((fast.double() - ref).abs().max()) < 1e-4  # float32 cancellation in E[x²] − E[x]²
    fast.mean().backward()
    ref.mean().backward()
    assert float((ga.grad.double() - gr.grad).abs().max()) < 1e-3 * float(gr.grad.abs().max())
    assert torch.equal(ncc.local_cc(a, b), ncc.local_cc_to(a, ncc.prepare(b)))
    ngf = NGFLoss()
    assert torch.equal(ngf.cos2(a, b), ngf.cos2_to(a, ngf.prepare(b)))
    with pytest.raises(InputError):
        ncc.local_cc_to(a[..., :-1], ncc.prepare(b))
    with pytest.raises(InputError):
        ngf.cos2_to(a[..., :-1], ngf.prepare(b))


def test_gaussian_smoothing_matches_a_dense_convolution():
    """gaussian_smoothing(sigma) = three 1-D Gaussian convolutions with zero padding (a conv3d reference),
    channels independent; sigma 0 is the identity; a negative sigma is an InputError."""
    from emorph_deploy.losses import gaussian_smoothing

    gen = torch.Generator().manual_seed(0)
    for sigma, x in (
        (0.7, torch.randn(1, 3, 9, 11, 13, generator=gen)),
        (1.3, torch.randn(1, 3, 9, 11, 13, generator=gen)),
        (1.3, torch.randn(2, 1, 2, 3, 9, generator=gen)),  # axes shorter than the window
    ):
        r = max(1, round(2 * sigma))
        t = torch.arange(-r, r + 1, dtype=torch.float64)
        k = torch.exp(-(t * t) / (2 * sigma * sigma))
        k = (k / k.sum()).float()
        ref = x.reshape(-1, 1, *x.shape[2:])  # (N·C, 1, D, H, W): channels as a batch
        ref = F.conv3d(ref, k.view(1, 1, -1, 1, 1), padding=(r, 0, 0))
        ref = F.conv3d(ref, k.view(1, 1, 1, -1, 1), padding=(0, r, 0))
        ref = F.conv3d(ref, k.view(1, 1, 1, 1, -1), padding=(0, 0, r)).reshape(x.shape)
        assert torch.allclose(gaussian_smoothing(sigma)(x), ref, atol=1e-5)
    assert gaussian_smoothing(0.0)(x) is x
    assert gaussian_smoothing(0.7)(torch.ones(1, 1, 5, 5, 5))[0, 0, 2, 2, 2] == pytest.approx(1.0)
    with pytest.raises(InputError, match="sigma"):
        gaussian_smoothing(-1.0)


def test_endpoint_error_known_values_mask_and_gradient():
    from emorph_deploy.losses import endpoint_error

    true = torch.zeros(1, 3, 4, 5, 6)
    flow = true.clone()
    flow[:, 0], flow[:, 1] = 3.0, 4.0  # |(3, 4, 0)| = 5 everywhere
    assert float(endpoint_error(flow, true)) == pytest.approx(5.0, rel=1e-6)
    assert float(endpoint_error(true, true)) == pytest.approx(0.0, abs=1e-3)
    mask = torch.zeros(1, 1, 4, 5, 6, dtype=torch.bool)
    mask[..., :2, :, :] = True
    flow[:, :, 2:] = 0.0  # error only outside the mask
    assert float(endpoint_error(flow, true, mask)) == pytest.approx(5.0, rel=1e-6)
    assert float(endpoint_error(flow, true, torch.zeros_like(mask))) == 0.0  # empty mask: no error
    f = torch.zeros(1, 3, 4, 5, 6, requires_grad=True)
    endpoint_error(f, true).backward()  # finite at zero error
    assert bool(torch.isfinite(f.grad).all())
    with pytest.raises(InputError, match="endpoint_error"):
        endpoint_error(torch.zeros(1, 2, 4, 5, 6), torch.zeros(1, 2, 4, 5, 6))
