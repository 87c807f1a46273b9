"""``Registrar.register(network=False)``: the ablation path of the validation suite — no inference, a zero
initial flow; with ``refine=N`` refinement alone, with ``refine=0`` the identity (after any affine)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is needed for the registrar")

GRID = (16, 16, 16)


@pytest.fixture(scope="module")
def reg(tmp_path_factory, tiny_em):
    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.registration import Registrar
    from emorph_deploy.train.checkpoint import save_checkpoint

    model = tiny_em(GRID).eval()
    folder = tmp_path_factory.mktemp("tiny")
    pre = Preprocessing(grid_shape=GRID, spacing_mm=(4.0, 4.0, 4.0))
    save_checkpoint(model, folder / "tiny", preprocessing=pre)
    r = Registrar.load(folder / "tiny.json", backend="torch", affine=False)  # pairs in one space
    calls = []
    infer = r.runner.infer
    r.runner.infer = lambda feed: (calls.append(1), infer(feed))[1]
    r._calls = calls
    return r


def test_no_network_no_refine_is_identity(reg, pair_in_one_space) -> None:
    fixed, moving = pair_in_one_space
    n = len(reg._calls)
    res = reg.register(fixed, moving, network=False, refine=0)
    assert len(reg._calls) == n  # the network was not run
    assert res.qc["network"] is False and res.qc["model_latency_s"] is None
    assert float(np.abs(np.asanyarray(res.displacement.dataobj)).max()) == 0.0
    assert res.qc["frac_jac_nonpos"] == 0.0
    np.testing.assert_allclose(np.asanyarray(res.warped.dataobj), moving[0], atol=1e-5)  # identity warp


def test_no_network_refine_moves_and_differs_from_network_start(reg, pair_in_one_space) -> None:
    fixed, moving = pair_in_one_space
    n = len(reg._calls)
    zero = reg.register(fixed, moving, network=False, refine=3)
    assert len(reg._calls) == n
    d0 = np.asanyarray(zero.displacement.dataobj)
    assert float(np.abs(d0).max()) > 1e-3  # refinement acted from the zero flow
    assert zero.qc["ncc_after"] > zero.qc["ncc_before"]
    net = reg.register(fixed, moving, refine=3)
    assert len(reg._calls) == n + 1 and net.qc["network"] is True
    assert float(np.abs(d0 - np.asanyarray(net.displacement.dataobj)).max()) > 1e-4
    again = reg.register(fixed, moving, network=False, refine=3)  # deterministic
    np.testing.assert_array_equal(d0, np.asanyarray(again.displacement.dataobj))


def test_the_correlation_floor_applies_after_the_network_only(reg, pair_in_one_space) -> None:
    """auto's NCC needs r >= NCC_MIN_R after the network; from a zero flow the same-contrast verdict alone
    decides (misalignment lowers r as much as a contrast change does)."""
    from emorph_deploy.contrast import NCC_MIN_R

    fixed, moving = pair_in_one_space
    zero = reg.register(fixed, moving, network=False, refine=1).qc["refine"]
    net = reg.register(fixed, moving, refine=1).qc["refine"]
    assert zero["contrast"]["ncc_min_r"] is None and net["contrast"]["ncc_min_r"] == NCC_MIN_R
