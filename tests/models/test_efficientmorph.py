"""EfficientMorph forward: shapes, batch independence, gradients everywhere, input checks, ONNX export."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from emorph_deploy.errors import InputError
from emorph_deploy.models import EfficientMorph, create_model, warp
from emorph_deploy.models.layers.position import sinusoidal_encoding_3d


@pytest.fixture(autouse=True)
def _single_thread():
    """2 shared cores: intra-op threads only contend on these tiny problems (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SIZE = (16, 16, 24)
TINY = dict(
    img_size=SIZE,
    embed_dims=(16, 32),
    heads=(2, 4),
    patch_dim=8,
    decoder_widths=(16, 8),
    skip_width=8,
    flow_init_std=0.05,
)


def tiny(name="em-23-hires", seed=0, **kw) -> EfficientMorph:
    torch.manual_seed(seed)
    return create_model(name, **{**TINY, **kw})


def pair(batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, *SIZE, generator=g), torch.rand(batch, 1, *SIZE, generator=g)


@pytest.mark.parametrize("name", ["em-23-hires", "em-11-hires-cga", "em-23-hires-s-fr", "em-23-hires-s-frwc"])
def test_forward_shapes_and_warp(name):
    model = tiny(name).eval()
    moving, fixed = pair(2)
    with torch.no_grad():
        warped, flow = model(moving, fixed)
    assert warped.shape == (2, 1, *SIZE) and flow.shape == (2, 3, *SIZE)
    assert flow.abs().max() > 1e-3  # non-trivial field (flow_init_std=0.05)
    torch.testing.assert_close(warped, warp(moving, flow), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["em-23-hires", "em-23-hires-cga"])
@pytest.mark.parametrize("sampler", ["grid_sample", "gather"])
def test_batch_of_two_equals_two_batches_of_one(name, sampler):
    model = tiny(name, warp_sampler=sampler).eval()
    moving, fixed = pair(2)
    with torch.no_grad():
        warped, flow = model(moving, fixed)
        for i in range(2):
            w1, f1 = model(moving[i : i + 1], fixed[i : i + 1])
            torch.testing.assert_close(f1, flow[i : i + 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(w1, warped[i : i + 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["em-23-hires", "em-23-hires-cga", "em-23-hires-s-fr", "em-23-hires-s-frwc"])
def test_gradients_reach_every_parameter(name):
    model = tiny(name, drop_path=0.0).train()
    moving, fixed = pair(2)
    warped, flow = model(moving, fixed)
    loss = (warped - fixed).square().mean() + flow.square().mean()
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert p.grad.abs().max() > 0, pname


def test_drop_path_training_runs_and_eval_is_deterministic():
    model = tiny(drop_path=0.5).train()
    moving, fixed = pair(2)
    model(moving, fixed)[1].sum().backward()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(moving, fixed)[1], model(moving, fixed)[1], atol=0, rtol=0)


def test_wrong_input_shape_is_a_clear_error():
    model = tiny().eval()
    with pytest.raises(InputError, match=r"\(B, 1, 16, 16, 24\)"):
        model(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16))
    with pytest.raises(InputError):
        model(torch.rand(1, 1, *SIZE), torch.rand(2, 1, *SIZE))
    with pytest.raises(InputError):
        model(torch.rand(1, 1, *SIZE), torch.rand(1, 2, *SIZE))


def test_buffers_are_not_persistent_and_state_dict_round_trips():
    model = tiny()
    keys = set(model.state_dict())
    assert {n for n, _ in model.named_buffers()} == {"pos_enc.pe", "transformer.grid"}
    assert not keys & {"pos_enc.pe", "transformer.grid"}
    other = create_model(model.config)
    other.load_state_dict(model.state_dict(), strict=True)
    moving, fixed = pair()
    with torch.no_grad():
        a, b = other.eval()(moving, fixed)[1], model.eval()(moving, fixed)[1]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_position_encoding_values():
    pe = sinusoidal_encoding_3d((3, 4, 5), 4, 14)  # (D, H, W, C): 4 per axis + 2 zero channels
    assert pe.shape == (3, 4, 5, 14)
    w = 1.0 / 100.0  # 10000^(-2·1/4)
    torch.testing.assert_close(
        pe[2, 0, 0, :4],
        torch.tensor([np.sin(2.0), np.sin(2 * w), np.cos(2.0), np.cos(2 * w)]).float(),
        atol=1e-6,
        rtol=0,
    )
    # the H block depends on H only
    torch.testing.assert_close(pe[1, 3, 4, 4:8], pe[0, 3, 0, 4:8], atol=0, rtol=0)
    assert pe[..., 12:].abs().max() == 0


def _export(model, opset):
    onnx = pytest.importorskip("onnx", reason="onnx not installed")
    moving, fixed = pair()
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (moving, fixed),
        buf,
        dynamo=False,
        opset_version=opset,
        input_names=["moving", "fixed"],
        output_names=["warped", "flow"],
    )
    ops = {n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node}
    return buf.getvalue(), ops, moving, fixed


def _check_ort(data, model, moving, fixed):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    warped, flow = sess.run(None, {"moving": moving.numpy(), "fixed": fixed.numpy()})
    with torch.no_grad():
        w_ref, f_ref = model(moving, fixed)
    np.testing.assert_allclose(flow, f_ref.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(warped, w_ref.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["em-23-hires", "em-11-hires-cga", "em-23-hires-s-fr", "em-23-hires-s-frwc"])
def test_onnx_export_gather_opset17_has_no_gridsample_or_scatter(name):
    model = tiny(name, warp_sampler="gather").eval()
    data, ops, moving, fixed = _export(model, 17)
    assert "GridSample" not in ops and "ScatterND" not in ops, sorted(ops)
    assert {"MatMul", "Softmax", "GatherElements"} <= ops
    _check_ort(data, model, moving, fixed)


def test_onnx_export_grid_sample_opset20():
    model = tiny(warp_sampler="grid_sample").eval()
    data, ops, moving, fixed = _export(model, 20)
    assert "GridSample" in ops and "ScatterND" not in ops
    _check_ort(data, model, moving, fixed)


@pytest.mark.parametrize("name", ["em-23-hires", "em-11-hires-cga", "em-23-hires-s-fr", "em-23-hires-s-frwc"])
def test_eager_fast_path_equals_reference_ops(name):
    """The eager CPU fast kernels (SDPA, direct oneDNN convs, channels-last decoder and instance norm, split
    concat convs) change only float32 summation order: flow and warped image equal the reference ops."""
    from emorph_deploy.models.layers import fastpath

    model = tiny(name).eval()
    m, f = pair(batch=1)
    calls: list[str] = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append("sdpa")
        return real_sdpa(*a, **k)

    with torch.inference_mode():
        with fastpath.fast_path(False):
            w_ref, flow_ref = model(m, f)
        torch.nn.functional.scaled_dot_product_attention = spy
        try:
            assert fastpath.fast_path_enabled()
            w_fast, flow_fast = model(m, f)
        finally:
            torch.nn.functional.scaled_dot_product_attention = real_sdpa
    assert calls, "the fast path was not taken (no SDPA call)"
    assert float(flow_ref.abs().max()) > 1e-3  # non-vacuous: a real flow
    assert torch.allclose(flow_fast, flow_ref, atol=1e-5, rtol=0)
    assert torch.allclose(w_fast, w_ref, atol=1e-5, rtol=0)


def test_full_res_stage_starts_as_the_model_without_it():
    """A model with the full-resolution stage, given the weights of one without it, starts with (nearly)
    that model's flow: the stage's head is initialised at ~0 (what a warm start relies on). Once the head
    is non-zero the stage changes the flow at full resolution."""
    base = tiny(flow_init_std=0.05).eval()
    torch.manual_seed(3)
    wide = create_model("em-23-hires", **{**TINY, "flow_init_std": 1e-5, "full_res_width": 8}).eval()
    missing, unexpected = wide.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("full_res.") for k in missing)
    m, f = pair()
    with torch.no_grad():
        ref = base.forward_flow(m, f)
        got = wide.forward_flow(m, f)
        assert float(ref.abs().max()) > 1e-2  # non-vacuous
        assert float((got - ref).abs().max()) < 1e-3
        wide.full_res.head.weight.normal_(0, 0.1)
        moved = wide.forward_flow(m, f)
    assert float((moved - ref).abs().max()) > 1e-2


def _stage_and_inputs(kind):
    """A stage with a non-zero head and its inputs: ``(stage, args, output shape)``."""
    from emorph_deploy.models.layers import CascadeStage, FullResStage

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "full_res":  # (features at D/2, pair at D)
        args = (torch.randn(1, 6, 4, 5, 6, generator=g), torch.rand(1, 2, 8, 10, 12, generator=g))
        return FullResStage(6, 2, 4, init_std=0.1), args, (1, 3, 8, 10, 12)
    args = (torch.rand(1, 2, 16, 16, 24, generator=g), torch.randn(1, 6, 8, 8, 12, generator=g))
    return CascadeStage(2, 6, 4, init_std=0.1), args, (1, 3, 16, 16, 24)  # (pair at D, features at D/2)


@pytest.mark.parametrize("kind", ["full_res", "cascade"])
def test_stage_channels_last_equals_reference_ops(kind):
    """The full-resolution and cascade stages run channels-last (and through oneDNN directly in eager
    inference): values in training and inference, and gradients, equal the reference ops (what export
    sees) to float32 rounding."""
    from emorph_deploy.models.layers import fastpath

    stage, args, shape = _stage_and_inputs(kind)
    results = []
    for fast in (True, False):
        stage.zero_grad()
        with fastpath.fast_path(fast):
            out = stage(*args)
            with torch.no_grad():
                inferred = stage(*args)
        out.square().sum().backward()
        results.append((out.detach(), inferred, [p.grad.clone() for p in stage.parameters()]))
    (out_fast, inf_fast, grads_fast), (out_ref, inf_ref, grads_ref) = results
    assert out_fast.shape == shape and out_fast.is_contiguous() and inf_fast.is_contiguous()
    assert float(out_ref.abs().max()) > 1e-3  # non-vacuous
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inf_fast, inf_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_fast, grads_ref, strict=True):
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_full_res_stage_sees_the_warped_moving_image_with_input_warped():
    """``full_res_input="warped"``: the stage's image input is cat(moving warped by the D/2 flow, fixed)
    ("pair": the input pair as given). With the stage's head at zero the model's flow is the D/2 flow, so
    the image the stage saw must be the moving image warped by the model's own flow."""
    from emorph_deploy.models.warp import warp

    m, f = pair()
    for kind in ("pair", "warped"):
        torch.manual_seed(3)
        cfg = {**TINY, "flow_init_std": 0.05, "full_res_width": 4, "full_res_input": kind}
        model = create_model("em-23-hires", **cfg).eval()
        with torch.no_grad():
            model.full_res.head.weight.zero_()
        seen: list[torch.Tensor] = []
        model.full_res.register_forward_hook(lambda mod, args, out, seen=seen: seen.append(args[1].clone()))
        with torch.no_grad():
            warped, flow = model(m, f)
        (stage_in,) = seen
        assert float(flow.abs().max()) > 1e-2  # non-vacuous: the moving image does move
        torch.testing.assert_close(stage_in[:, 1:], f)
        expect = m if kind == "pair" else warp(m, flow)
        torch.testing.assert_close(stage_in[:, :1], expect, atol=1e-6, rtol=0)
        if kind == "warped":
            torch.testing.assert_close(stage_in[:, :1], warped, atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="full_res_input"):
        create_model("em-23-hires", **{**TINY, "full_res_width": 4, "full_res_input": "aligned"})


def test_cascade_stage_starts_as_the_model_without_it_and_sees_the_flow_so_far():
    """A model with the cascade stage, given the weights of one without it, starts with (nearly) that
    model's flow (the stage's head starts at ~0: what a warm start relies on). The stage's image input is
    cat(moving warped by the flow so far, fixed); once its head is non-zero it changes the flow."""
    from emorph_deploy.models.warp import warp

    base = tiny(flow_init_std=0.05, full_res_width=4, full_res_input="warped").eval()
    torch.manual_seed(3)
    cfg = {**TINY, "flow_init_std": 1e-5, "full_res_width": 4, "full_res_input": "warped", "cascade_width": 4}
    model = create_model("em-23-hires", **cfg).eval()
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("cascade.") for k in missing)
    seen: list[torch.Tensor] = []
    model.cascade.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    m, f = pair()
    with torch.no_grad():
        ref = base.forward_flow(m, f)
        got = model.forward_flow(m, f)
        assert float(ref.abs().max()) > 1e-2  # non-vacuous: the moving image does move
        assert float((got - ref).abs().max()) < 1e-3
        (stage_in,) = seen
        torch.testing.assert_close(stage_in[:, 1:], f)
        torch.testing.assert_close(stage_in[:, :1], warp(m, ref), atol=1e-4, rtol=0)
        model.cascade.head.weight.normal_(0, 0.1)
        moved = model.forward_flow(m, f)
    assert float((moved - ref).abs().max()) > 1e-2


def test_cascade_width_must_not_be_negative():
    with pytest.raises(InputError, match="cascade_width"):
        create_model("em-23-hires", **{**TINY, "cascade_width": -2})


def test_full_res_width_must_not_be_negative():
    with pytest.raises(InputError, match="full_res_width"):
        create_model("em-23-hires", **{**TINY, "full_res_width": -1})


def test_fast_path_switch_restores_and_reference_is_what_export_sees():
    from emorph_deploy.models.layers import fastpath

    assert fastpath.fast_path_enabled()
    with fastpath.fast_path(False):
        assert not fastpath.fast_path_enabled()
        assert fastpath.reference_ops_required()
    assert fastpath.fast_path_enabled() and not fastpath.reference_ops_required()


@pytest.mark.parametrize("shape", [(1, 3, 5, 6, 7), (2, 4, 1, 3, 2), (1, 2, 4, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_upsample_matches_interpolate(shape, channels_last):
    """The separable ×2 trilinear upsampling equals F.interpolate (align_corners=False) to float32 rounding,
    including size-1 axes; channels-last inputs keep PyTorch's kernel (bit-identical)."""
    import torch.nn.functional as F

    from emorph_deploy.models.layers.upsample import upsample2x_separable, upsample2x_trilinear

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    ref = F.interpolate(x, scale_factor=2.0, mode="trilinear", align_corners=False)
    sep = upsample2x_separable(x)
    assert sep.shape == ref.shape and sep.is_contiguous()
    assert torch.allclose(sep, ref, atol=1e-6, rtol=0)
    with torch.inference_mode():
        out = upsample2x_trilinear(x)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    if not x.is_contiguous():  # channels-last: PyTorch's kernel
        assert torch.equal(out, ref)


def test_fast_upsample_only_in_eager_inference(monkeypatch):
    """The model's flow upsampling takes the separable path in eager inference, never with autograd or with
    the fast path off (export and training see F.interpolate)."""
    import emorph_deploy.models.layers.upsample as up
    from emorph_deploy.models.layers.fastpath import fast_path

    calls = []
    real = up.upsample2x_separable
    monkeypatch.setattr(up, "upsample2x_separable", lambda x: calls.append(tuple(x.shape)) or real(x))
    model = create_model("em-23-hires-s", img_size=(16, 16, 16)).eval()
    m, f = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.inference_mode():
        fast = model.forward_flow(m, f)
    assert (1, 3, 8, 8, 8) in calls  # the flow head's output (NCDHW)
    calls.clear()
    with torch.inference_mode(), fast_path(False):
        ref = model.forward_flow(m, f)
    grad_flow = model.forward_flow(m, f)
    assert calls == []
    assert torch.allclose(fast, ref, atol=1e-5) and torch.allclose(grad_flow.detach(), ref, atol=1e-5)
