"""Test-time refinement (``emorph_deploy.refine``): loss decreases, steps=0 is the identity, the network is
untouched, deterministic, and Dice improves on a deformed-template pair starting from zero flow."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is needed for refinement")

from emorph_deploy.errors import InputError  # noqa: E402
from emorph_deploy.refine import RefineConfig, refine_flow, refine_loss  # noqa: E402

GRID = (40, 40, 40)


@pytest.fixture(scope="module")
def pair():
    from emorph_deploy.data.synthetic import template_pair

    p = template_pair(GRID, seed=10_000)  # held-out seed (training draws (0, epoch, index))
    return {
        "moving": torch.from_numpy(p.moving)[None, None],
        "fixed": torch.from_numpy(p.fixed)[None, None],
        "moving_labels": torch.from_numpy(p.moving_labels)[None, None].float(),
        "fixed_labels": p.fixed_labels,
    }


def _gm_wm_dice(pair, flow) -> float:
    from emorph_deploy.metrics import dice_per_label
    from emorph_deploy.models.warp import warp

    warped = warp(pair["moving_labels"], flow, mode="nearest")[0, 0].numpy().round().astype(np.int32)
    d = dice_per_label(warped, pair["fixed_labels"], labels=[2, 3])
    return float(np.mean(list(d.values())))


def test_steps_zero_returns_input_unchanged(pair):
    flow0 = torch.randn(1, 3, *GRID) * 0.5
    before = flow0.clone()
    out = refine_flow(pair["moving"], pair["fixed"], flow0, steps=0)
    assert torch.equal(out, before)
    assert torch.equal(flow0, before)
    assert not out.requires_grad


def test_loss_decreases_and_deterministic(pair):
    m = pair["moving"][..., 8:32, 8:32, 8:32].contiguous()  # 24³ crop: cheap
    f = pair["fixed"][..., 8:32, 8:32, 8:32].contiguous()
    zero = torch.zeros(1, 3, 24, 24, 24)
    losses: list[float] = []
    a = refine_flow(m, f, zero, steps=5, lr=0.2, levels=1, losses=losses)
    b = refine_flow(m, f, zero, steps=5, lr=0.2, levels=1)
    assert len(losses) == 5
    l0 = float(refine_loss(m, f, zero))
    l1 = float(refine_loss(m, f, a))
    assert abs(losses[0] - l0) < 1e-5
    assert l1 < l0 - 0.02, (l0, l1)
    assert torch.equal(a, b)  # deterministic on the CPU
    assert not a.requires_grad and a.shape == (1, 3, 24, 24, 24) and a.dtype == torch.float32
    assert torch.equal(zero, torch.zeros_like(zero))  # input not modified
    # the steps at half resolution only; also lowers the full-resolution loss
    coarse: list[float] = []
    c = refine_flow(m, f, zero, steps=5, full_steps=0, losses=coarse)
    assert len(coarse) == 5
    default: list[float] = []  # the default: the half-resolution steps, then the default full ones
    refine_flow(m, f, zero, steps=5, losses=default)
    assert len(default) == 5 + RefineConfig.full_steps
    assert float(refine_loss(m, f, c)) < l0 - 0.02
    # half, then full resolution (5 + 3 steps)
    both: list[float] = []
    e = refine_flow(m, f, zero, steps=5, full_steps=3, losses=both)
    assert len(both) == 8
    assert float(refine_loss(m, f, e)) < float(refine_loss(m, f, c)) + 1e-4


@pytest.mark.slow
def test_improves_dice_from_zero_flow(pair):
    zero = torch.zeros(1, 3, *GRID)
    before = _gm_wm_dice(pair, zero)
    flow = refine_flow(pair["moving"], pair["fixed"], zero, steps=30)  # default: 30 steps at 20³
    after = _gm_wm_dice(pair, flow)
    assert after > before + 0.1, (before, after)


def test_network_untouched_and_inference_mode_caller(pair, tiny_em):
    grid = (24, 24, 24)
    model = tiny_em(grid).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    m = pair["moving"][..., :24, :24, :24].contiguous()
    f = pair["fixed"][..., :24, :24, :24].contiguous()
    with torch.inference_mode():
        _, flow = model(m, f)
        refined = refine_flow(m, f, flow, steps=3, lr=0.1)
    assert refined.shape == flow.shape and not torch.equal(refined, flow)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_registrar_refine_is_per_call(tmp_path, tiny_em):
    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.registration import Registrar
    from emorph_deploy.train.checkpoint import save_checkpoint

    grid = (16, 16, 16)
    save_checkpoint(
        tiny_em(grid).eval(),
        tmp_path / "tiny",
        preprocessing=Preprocessing(grid_shape=grid, spacing_mm=(4.0, 4.0, 4.0)),
    )
    reg = Registrar.load(tmp_path / "tiny.json", backend="torch", affine=False)
    weights = {k: v.clone() for k, v in reg.runner.model.state_dict().items()}
    rng = np.random.default_rng(0)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    fixed = (rng.random(grid, dtype=np.float32) + 0.1, affine)
    moving = (np.roll(fixed[0], 1, axis=0), affine)
    r1 = reg.register(fixed, moving, refine=2)
    r2 = reg.register(fixed, moving, refine=RefineConfig(steps=2))
    plain = reg.register(fixed, moving, refine=0)
    d1 = np.asanyarray(r1.displacement.dataobj)
    np.testing.assert_array_equal(d1, np.asanyarray(r2.displacement.dataobj))  # no state between calls
    assert float(np.abs(d1 - np.asanyarray(plain.displacement.dataobj)).max()) > 1e-4  # refinement acted
    assert r1.qc["refine"]["steps"] == 2 and plain.qc["refine"] is None
    assert r1.qc["refine"]["similarity"] in ("ncc", "ngf")  # "auto" resolved (the default), with its figures
    assert r1.qc["refine"]["similarity_requested"] == "auto" and "contrast" in r1.qc["refine"]
    r3 = reg.register(fixed, moving, refine=RefineConfig(steps=2, similarity="mind"))
    assert r3.qc["refine"]["similarity"] == r3.qc["refine"]["similarity_requested"] == "mind"
    json.dumps(r3.qc["refine"]), json.dumps(r1.qc["refine"])  # qc.json-serialisable
    for k, v in reg.runner.model.state_dict().items():  # the network is untouched
        assert torch.equal(v, weights[k]), k
    with pytest.raises(InputError):
        reg.register(fixed, moving, refine=-1)


@pytest.mark.parametrize(
    "kwargs", [{"steps": -1}, {"steps": 1.5}, {"steps": 2, "levels": 3}, {"steps": 2, "lr": 0.0}]
)
def test_bad_arguments(pair, kwargs):
    zero = torch.zeros(1, 3, *GRID)
    with pytest.raises(InputError):
        refine_flow(pair["moving"], pair["fixed"], zero, **kwargs)


def test_bad_shapes(pair):
    with pytest.raises(InputError, match="flow_init"):
        refine_flow(pair["moving"], pair["fixed"], torch.zeros(1, 3, 8, 8, 8), steps=1)
    with pytest.raises(InputError, match="moving and fixed"):
        refine_flow(pair["moving"], pair["fixed"][..., :8], torch.zeros(1, 3, *GRID), steps=1)


def test_callback_snapshots_equal_shorter_runs(pair):
    m = pair["moving"][..., 8:32, 8:32, 8:32].contiguous()
    f = pair["fixed"][..., 8:32, 8:32, 8:32].contiguous()
    zero = torch.zeros(1, 3, 24, 24, 24)
    snaps: dict[int, torch.Tensor] = {}
    refine_flow(m, f, zero, steps=4, levels=1, callback=lambda k, fl: snaps.__setitem__(k, fl))
    assert sorted(snaps) == [1, 2, 3, 4]
    assert torch.equal(snaps[2], refine_flow(m, f, zero, steps=2, levels=1))


# ----------------------------------------------------------------------------------- across contrasts
@pytest.fixture(scope="module")
def pair32():
    """A 32³ template pair (the brain fills the grid, ~5.6 mm voxels) and its moving image inverted inside
    the brain (T2-like order: WM dark, GM mid, CSF bright; the background stays 0)."""
    from emorph_deploy.data.synthetic import template_pair

    p = template_pair((32, 32, 32), seed=10_000)
    inverted = np.where(p.moving_labels > 0, 1.0 - p.moving, 0.0).astype(np.float32)
    return {
        "moving": torch.from_numpy(p.moving)[None, None],
        "inverted": torch.from_numpy(inverted)[None, None],
        "fixed": torch.from_numpy(p.fixed)[None, None],
        "moving_labels": torch.from_numpy(p.moving_labels)[None, None].float(),
        "fixed_labels": p.fixed_labels,
    }


def _tissue_dice(pair, flow) -> float:
    """Mean Dice over CSF/GM/WM (labels 1–3) of the moving labels warped by ``flow``."""
    from emorph_deploy.metrics import dice_per_label
    from emorph_deploy.models.warp import warp

    warped = warp(pair["moving_labels"], flow, mode="nearest")[0, 0].numpy().round().astype(np.int32)
    return float(np.mean(list(dice_per_label(warped, pair["fixed_labels"], labels=[1, 2, 3]).values())))


def test_similarity_option_values():
    import typing

    from emorph_deploy.cli._common import RefineSimilarityOption
    from emorph_deploy.refine import Similarity

    assert typing.get_args(RefineSimilarityOption)[0] is Similarity  # the CLI offers the library's choices
    cfg = RefineConfig(steps=3, similarity="mind")
    assert cfg.similarity is Similarity.mind and cfg.to_dict()["similarity"] == "mind"
    assert RefineConfig.coerce(5).similarity is Similarity(RefineConfig.similarity)
    with pytest.raises(InputError, match="similarity"):
        RefineConfig(steps=1, similarity="mi")
    with pytest.raises(InputError, match="similarity"):
        refine_flow(
            torch.zeros(1, 1, 8, 8, 8),
            torch.zeros(1, 1, 8, 8, 8),
            torch.zeros(1, 3, 8, 8, 8),
            steps=1,
            similarity="nmi",
        )


def test_contrast_agreement_and_auto_choice(pair32):
    from emorph_deploy.refine import contrast_agreement

    fixed = pair32["fixed"]
    same = contrast_agreement(pair32["moving"], fixed)
    inverted = contrast_agreement(pair32["inverted"], fixed)
    gamma = contrast_agreement(pair32["moving"].sqrt(), fixed)  # a monotone remap: still the same contrast
    assert same["same_contrast"] and same["r"] > 0.5 and same["linear_share"] > 0.8, same
    assert gamma["same_contrast"], gamma
    assert not inverted["same_contrast"] and inverted["r"] < -0.5, inverted
    assert 0.0 <= same["eta2"] <= 1.0 and same["r"] ** 2 <= same["eta2"] + 0.02  # r² ≤ η² up to binning
    tiny = contrast_agreement(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8))
    assert tiny["same_contrast"] and tiny["r"] is None  # < 1000 foreground voxels: no verdict, NCC
    zero = torch.zeros(1, 3, 32, 32, 32)
    for key, expected in (("moving", "ncc"), ("inverted", "ngf")):
        info: dict = {}
        refine_flow(pair32[key], fixed, zero, steps=1, similarity="auto", info=info)
        assert info["similarity"] == expected and info["similarity_requested"] == "auto", (key, info)
        assert info["contrast"]["same_contrast"] is (expected == "ncc")
    info = {}
    refine_flow(pair32["inverted"], fixed, zero, steps=1, similarity="ncc", info=info)
    assert info == {"similarity": "ncc", "similarity_requested": "ncc"}


def test_auto_decision_uses_the_given_warped_image(pair32):
    """``warped_init`` replaces the decision's own warp: the same image gives the same decision and flow;
    a different one (the inverted image) changes the decision; a wrong shape is an InputError."""
    from emorph_deploy.models.warp import warp

    fixed, moving = pair32["fixed"], pair32["moving"]
    flow0 = torch.zeros(1, 3, 32, 32, 32)
    flow0[:, 0] = 0.5
    plain, given, swapped = {}, {}, {}
    a = refine_flow(moving, fixed, flow0, steps=2, similarity="auto", info=plain)
    b = refine_flow(
        moving, fixed, flow0, steps=2, similarity="auto", info=given, warped_init=warp(moving, flow0)
    )
    assert torch.equal(a, b) and plain == given and plain["similarity"] == "ncc"
    refine_flow(
        moving, fixed, flow0, steps=1, similarity="auto", info=swapped, warped_init=pair32["inverted"]
    )
    assert swapped["similarity"] == "ngf"
    with pytest.raises(InputError, match="warped_init"):
        refine_flow(moving, fixed, flow0, steps=1, similarity="auto", warped_init=torch.zeros(1, 1, 8, 8, 8))


@pytest.mark.parametrize("similarity", ["mind", "ngf"])
def test_cross_contrast_refinement_improves_dice(pair32, similarity):
    """Inverted moving contrast, known deformation, from a zero flow: 30 full-resolution MIND or NGF steps
    raise the CSF/GM/WM Dice by ≥ 0.03, and by more than NCC does on the same pair."""
    zero = torch.zeros(1, 3, 32, 32, 32)
    before = _tissue_dice(pair32, zero)
    losses: list[float] = []
    flow = refine_flow(
        pair32["inverted"], pair32["fixed"], zero, steps=30, levels=1, similarity=similarity, losses=losses
    )
    ncc = refine_flow(pair32["inverted"], pair32["fixed"], zero, steps=30, levels=1, similarity="ncc")
    after, after_ncc = _tissue_dice(pair32, flow), _tissue_dice(pair32, ncc)
    assert losses[-1] < losses[0]
    assert after > before + 0.03, (before, after)
    assert after > after_ncc, (after, after_ncc)


def test_fold_penalty_cuts_folding_at_equal_dice(pair32):
    """A deliberately weak diffusion term (λ 0.03) folds ~2 % of the voxels in 30 full-resolution NCC steps;
    the folding penalty (weight 10) cuts that at least tenfold without lowering the tissue Dice by > 0.01."""
    from emorph_deploy.qc import jacobian_determinant_fast

    zero = torch.zeros(1, 3, 32, 32, 32)
    kw = dict(steps=30, levels=1, lr=0.2, reg_weight=0.03, similarity="ncc")
    plain = refine_flow(pair32["moving"], pair32["fixed"], zero, fold_weight=0.0, **kw)
    penalised = refine_flow(pair32["moving"], pair32["fixed"], zero, fold_weight=10.0, **kw)
    folds = [float((jacobian_determinant_fast(f[0].numpy()) <= 0).mean()) for f in (plain, penalised)]
    assert folds[0] > 0.005 and folds[1] < folds[0] / 10, folds
    assert _tissue_dice(pair32, penalised) > _tissue_dice(pair32, plain) - 0.01
    with pytest.raises(InputError):
        RefineConfig(steps=2, fold_weight=-1.0)
    with pytest.raises(InputError):
        refine_flow(pair32["moving"], pair32["fixed"], zero, steps=1, fold_weight=float("nan"))


def test_gradient_smoothing_moves_neighbours_together(pair32):
    """One full-resolution step from zero: Adam's first step is lr x the sign of each voxel's gradient, so
    the raw gradient's noise makes neighbouring voxels step apart; smoothing the gradient (grad_sigma) makes
    the update at least 1.5x smoother (mean |difference| between neighbours) at the same step size."""
    zero = torch.zeros(1, 3, 32, 32, 32)
    kw = dict(steps=1, levels=1, similarity="ncc", fold_weight=0.0)

    def roughness(u):
        return sum(float(u.diff(dim=d).abs().mean()) for d in (2, 3, 4))

    raw = refine_flow(pair32["moving"], pair32["fixed"], zero, grad_sigma=0.0, **kw)
    smooth = refine_flow(pair32["moving"], pair32["fixed"], zero, grad_sigma=1.0, **kw)
    assert roughness(smooth) * 1.5 < roughness(raw), (roughness(smooth), roughness(raw))
    assert abs(float(smooth.abs().amax()) - float(raw.abs().amax())) < 0.02  # both ~lr where they move
    for bad in (-0.5, float("nan"), 6.0):
        with pytest.raises(InputError, match="grad_sigma"):
            RefineConfig(steps=2, grad_sigma=bad)
        with pytest.raises(InputError, match="grad_sigma"):
            refine_flow(pair32["moving"], pair32["fixed"], zero, steps=1, grad_sigma=bad)


def test_adam_matches_torch_optim_adam():
    """The refinement's own Adam (no torch._dynamo import) follows torch.optim.Adam step for step."""
    from emorph_deploy.refine import _Adam

    a = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)).requires_grad_()
    b = a.detach().clone().requires_grad_()
    mine, ref = _Adam(a, 0.2), torch.optim.Adam([b], lr=0.2)
    for _ in range(20):
        for x in (a, b):
            x.grad = None
            ((x**3).sin().sum() + (x * x).mean()).backward()
        mine.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
