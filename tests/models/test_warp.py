"""SpatialTransformer / warp: scipy agreement, exact identity, sampler agreement, ONNX without GridSample."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import map_coordinates

from emorph_deploy.errors import InputError
from emorph_deploy.models.warp import SpatialTransformer, identity_grid, warp


@pytest.fixture(autouse=True)
def _single_thread():
    """2 shared cores: intra-op threads only contend on these tiny problems (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SIZE = (12, 14, 16)


def smooth_field(batch: int, size=SIZE, amplitude: float = 3.0, seed: int = 0) -> torch.Tensor:
    """Random smooth displacement (B, 3, D, H, W) in voxels, reaching outside the volume near the edges."""
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(batch, 3, 4, 4, 4, generator=g) * 2 - 1) * amplitude
    return F.interpolate(coarse, size=size, mode="trilinear", align_corners=True)


def smooth_image(batch: int, chans: int, size=SIZE, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, chans, 5, 5, 5, generator=g)
    return F.interpolate(coarse, size=size, mode="trilinear", align_corners=True)


def scipy_warp(src: torch.Tensor, flow: torch.Tensor, order: int, mode: str) -> np.ndarray:
    s = src.double().numpy()
    coords = (identity_grid(tuple(flow.shape[2:]), dtype=torch.float64).unsqueeze(0) + flow.double()).numpy()
    out = np.empty((s.shape[0], s.shape[1], *flow.shape[2:]))
    for b in range(s.shape[0]):
        for c in range(s.shape[1]):
            out[b, c] = map_coordinates(s[b, c], coords[b], order=order, mode=mode, cval=0.0)
    return out


# grid_sample "zeros" interpolates towards 0 outside the volume = scipy "grid-constant" (scipy's "constant"
# does not interpolate beyond the edge); "border" clamps = scipy "nearest".
@pytest.mark.parametrize("sampler", ["grid_sample", "gather"])
@pytest.mark.parametrize(("padding", "scipy_mode"), [("zeros", "grid-constant"), ("border", "nearest")])
@pytest.mark.parametrize(("mode", "order"), [("bilinear", 1), ("nearest", 0)])
def test_matches_scipy_map_coordinates(sampler, padding, scipy_mode, mode, order):
    src = torch.rand(2, 2, *SIZE, generator=torch.Generator().manual_seed(3))
    flow = smooth_field(2)
    if order == 0:  # keep clear of .5 ties where rounding conventions differ (half-even vs half-up)
        frac = flow - flow.floor()
        flow = torch.where((frac - 0.5).abs() < 1e-3, flow + 0.01, flow)
    ref = scipy_warp(src, flow, order, scipy_mode)
    out = warp(src, flow, mode=mode, sampler=sampler, padding=padding)
    assert out.shape == (2, 2, *SIZE)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-4, rtol=0)
    mod = SpatialTransformer(SIZE, mode=mode, sampler=sampler, padding=padding)
    np.testing.assert_allclose(mod(src, flow).numpy(), ref, atol=1e-4, rtol=0)


def test_zero_flow_is_exact_identity():
    src = torch.rand(2, 3, *SIZE)
    zero = torch.zeros(2, 3, *SIZE)
    for padding in ("zeros", "border"):
        for mode in ("bilinear", "nearest"):
            assert torch.equal(warp(src, zero, mode=mode, sampler="gather", padding=padding), src)
            assert torch.equal(warp(src, zero, mode="nearest", sampler="grid_sample", padding=padding), src)
            # bilinear grid_sample works on normalised coordinates: their float32 round trip is off by up to
            # ~(size-1)·1.2e-7 voxels, so it is an identity only to that precision (gather is exact)
            out = warp(src, zero, mode="bilinear", sampler="grid_sample", padding=padding)
            torch.testing.assert_close(out, src, atol=(max(SIZE) - 1) * 2.4e-7, rtol=0)
    # sizes with (size - 1) a power of two round-trip exactly through grid_sample's normalisation
    src = torch.rand(1, 1, 9, 17, 33)
    assert torch.equal(warp(src, torch.zeros(1, 3, 9, 17, 33)), src)


def test_channel_k_is_array_axis_k():
    src = torch.rand(1, 1, *SIZE)
    for k in range(3):
        flow = torch.zeros(1, 3, *SIZE)
        flow[:, k] = 1.0
        expected = torch.roll(src, shifts=-1, dims=2 + k)
        idx = [slice(None)] * 5
        idx[2 + k] = slice(0, SIZE[k] - 1)
        for sampler in ("grid_sample", "gather"):
            out = warp(src, flow, sampler=sampler, padding="zeros")
            torch.testing.assert_close(out[tuple(idx)], expected[tuple(idx)], atol=1e-5, rtol=0)
            last = [slice(None)] * 5
            last[2 + k] = SIZE[k] - 1
            assert out[tuple(last)].abs().max() < 1e-6  # sampled beyond the edge → zero padding


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_samplers_agree(padding, mode):
    src = smooth_image(3, 2)
    flow = smooth_field(3, amplitude=4.0, seed=5)
    if mode == "nearest":
        frac = flow - flow.floor()
        flow = torch.where((frac - 0.5).abs() < 1e-3, flow + 0.01, flow)
    a = warp(src, flow, mode=mode, sampler="grid_sample", padding=padding)
    b = warp(src, flow, mode=mode, sampler="gather", padding=padding)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # batch items are independent
    for i in range(3):
        one = warp(src[i : i + 1], flow[i : i + 1], mode=mode, sampler="gather", padding=padding)
        torch.testing.assert_close(one, b[i : i + 1], atol=1e-6, rtol=0)


def test_gather_gradients_match_grid_sample():
    src = smooth_image(1, 1)
    flow0 = smooth_field(1, amplitude=2.0)
    grads = []
    for sampler in ("grid_sample", "gather"):
        flow = flow0.clone().requires_grad_(True)
        s = src.clone().requires_grad_(True)
        warp(s, flow, sampler=sampler, padding="border").square().sum().backward()
        grads.append((flow.grad, s.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_gather_indices_stay_exact_in_bf16(padding):
    """Computed in bf16 (8 mantissa bits, as OpenVINO's bf16 path runs a graph's elementwise ops), the
    gather sampler still samples the right voxels: its indices are integer arithmetic, so only the
    trilinear weights carry bf16 rounding. Float coordinates (~30 here) or flattened indices (~3·10^4)
    in bf16 would be off by voxels."""
    size = (24, 28, 32)
    src = smooth_image(1, 1, size=size)
    flow = smooth_field(1, amplitude=3.0, seed=3, size=size)
    ref = warp(src.bfloat16().float(), flow.bfloat16().float(), sampler="grid_sample", padding=padding)
    got = warp(src.bfloat16(), flow.bfloat16(), sampler="gather", padding=padding).float()
    assert float((got - ref).abs().max()) < 0.02  # weights to 2^-8; the image spans [0, 1]


def test_bad_arguments():
    with pytest.raises(InputError):
        SpatialTransformer(SIZE, mode="bicubic")
    with pytest.raises(InputError):
        warp(torch.rand(1, 1, *SIZE), torch.zeros(1, 2, *SIZE))
    with pytest.raises(InputError, match="size"):
        SpatialTransformer(SIZE)(torch.rand(1, 1, 8, 8, 8), torch.zeros(1, 3, 8, 8, 8))
    assert "grid" not in SpatialTransformer(SIZE).state_dict()


def test_gather_sampler_exports_without_gridsample():
    onnx = pytest.importorskip("onnx", reason="onnx not installed")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    mod = SpatialTransformer(SIZE, sampler="gather", padding="zeros").eval()
    src, flow = smooth_image(1, 1), smooth_field(1)
    buf = io.BytesIO()
    torch.onnx.export(mod, (src, flow), buf, dynamo=False, opset_version=17, input_names=["src", "flow"])
    ops = {n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node}
    assert "GridSample" not in ops and "ScatterND" not in ops
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"src": src.numpy(), "flow": flow.numpy()})[0]
    np.testing.assert_allclose(out, mod(src, flow).numpy(), atol=1e-5, rtol=0)


def test_eager_warp_uses_the_thread_split_sampler(monkeypatch):
    """Eager CPU warps go through sampling.grid_sample_3d (split into a batch of views) and equal the
    reference op bit for bit; with the fast path off (as during export) the plain op runs."""
    from emorph_deploy import sampling
    from emorph_deploy.models.layers.fastpath import fast_path

    monkeypatch.setattr(sampling, "_MIN_POINTS_PER_PART", 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    calls: list[int] = []
    real = sampling.F.grid_sample

    def spy(inp, grid, **kw):
        calls.append(int(grid.shape[0]))
        return real(inp, grid, **kw)

    monkeypatch.setattr(sampling.F, "grid_sample", spy)
    g = torch.Generator().manual_seed(4)
    src = torch.rand(1, 1, 8, 9, 10, generator=g)
    flow = torch.randn(1, 3, 8, 9, 10, generator=g) * 2
    for mode in ("bilinear", "nearest"):
        calls.clear()
        fast = warp(src, flow, mode=mode)
        assert calls == [2]
        calls.clear()
        with fast_path(False):
            ref = warp(src, flow, mode=mode)
        assert calls == [1]  # one plain batch-1 call (F is torch.nn.functional, spied on as a whole)
        assert torch.equal(fast, ref)


def test_compose_is_the_flow_of_two_warps_in_sequence():
    """compose(first, second) sampled at each point equals the point moved by ``second`` then by ``first``
    (exact against scipy on the flow components), and warping by it equals warping twice up to
    interpolation."""
    from emorph_deploy.models.warp import compose

    first, second = smooth_field(1, amplitude=1.5, seed=4), smooth_field(1, amplitude=1.5, seed=5)
    total = compose(first, second)
    ref = second.double().numpy() + scipy_warp(first, second, order=1, mode="nearest")
    np.testing.assert_allclose(total.numpy(), ref, atol=1e-4)
    assert torch.equal(compose(torch.zeros_like(first), second), second)  # the identity first
    # a linear image: trilinear sampling is exact on it, so one warp by the composition equals two warps
    # wherever both stay inside the grid (|flows| <= 1.5 voxels each, 3 voxels from the edges)
    grid = identity_grid(SIZE).unsqueeze(0)
    img = 0.5 * grid[:, :1] - 0.25 * grid[:, 1:2] + 0.125 * grid[:, 2:]
    twice = warp(warp(img, first), second)
    once = warp(img, total)
    inner = (slice(None), slice(None), *(slice(3, -3),) * 3)
    assert (once - twice)[inner].abs().max() < 1e-4
