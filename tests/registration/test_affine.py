"""Affine pre-alignment: known affines recovered across contrasts, the gross-orientation multi-start and the
check that keeps the identity when the fit is no good (issue 15, item 4)."""

from __future__ import annotations

import numpy as np
import pytest

from emorph_deploy.registration.affine import (
    GROSS_STARTS,
    AffineConfig,
    AffineMetric,
    affine_prealign,
    start_rotation,
)


def _rotation(angle: float, axis: int) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    r = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


@pytest.fixture(scope="module")
def brain():
    """The MNI152 2009 T1 at 3 mm (61x73x61; skull-stripped) and its affine."""
    pytest.importorskip("nilearn", reason="nilearn ships the MNI152 template")
    from emorph_deploy.data.synthetic import mni152_images

    img = mni152_images(3)[0]
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def _moved(fixed: np.ndarray, a_f: np.ndarray, t_true: np.ndarray):
    """``fixed`` resampled through ``t_true`` (moving(y) = fixed(t_true y)) on an oblique 3.3 mm grid."""
    from emorph_deploy.data.resample import resample_to_grid

    shape = (56, 64, 58)
    lin = _rotation(-0.05, 0) @ np.diag([3.3, 3.3, 3.6])
    a_m = np.eye(4)
    a_m[:3, :3] = lin
    a_m[:3, 3] = np.array([4.0, -20.0, 10.0]) - lin @ ((np.asarray(shape) - 1) / 2)
    return resample_to_grid(fixed, np.linalg.inv(t_true) @ a_f, shape, a_m, order=1), a_m


def _errors(matrix: np.ndarray, t_true: np.ndarray) -> tuple[float, float]:
    expected = np.linalg.inv(t_true)  # T (fixed world → moving world) with moving(T p) = fixed(p)
    return (
        float(np.abs(matrix[:3, :3] - expected[:3, :3]).max()),
        float(np.abs(matrix[:3, 3] - expected[:3, 3]).max()),
    )


def _known_affine() -> np.ndarray:
    t = np.eye(4)
    t[:3, :3] = _rotation(0.10, 2) @ np.diag([1.04, 0.97, 1.0])
    t[:3, 3] = [6.0, -4.0, 3.0]
    return t


@pytest.mark.parametrize("contrast", ["same", "inverted", "remapped"])
def test_known_affine_recovered_across_contrasts(brain, contrast):
    fixed, a_f = brain
    t_true = _known_affine()
    moving, a_m = _moved(fixed, a_f, t_true)
    mask = moving > 0.05 * moving.max()
    if contrast == "inverted":  # the brain's contrast inverted inside its mask, background kept at zero
        moving = np.where(mask, moving.max() - moving, 0.0).astype(np.float32)
    elif contrast == "remapped":  # non-monotone (T2-like): the middle of the range brightest
        x = moving / moving.max()
        moving = np.where(mask, 1.05 - np.abs(x - 0.55), 0.0).astype(np.float32)
    res = affine_prealign(fixed, a_f, moving, a_m)
    err_lin, err_t = _errors(res.matrix, t_true)
    print(f"{contrast}: linear {err_lin:.4f}, translation {err_t:.2f} mm, {res.metric}, {res.seconds:.2f} s")
    assert res.accepted and res.start == "identity" and res.reason == ""
    assert res.value_final > res.value_init and res.mi_final > res.mi_init
    assert err_lin <= 0.02 and err_t <= 1.0
    # auto: the NCC polish only where the intensities at the MI pose are linearly related (same contrast)
    if contrast == "same":
        assert res.metric == "ncc" and res.auto_trace
    else:
        assert res.metric == "mi" and res.auto_trace == {}


def test_gross_rotation_recovered_by_the_multistart(brain):
    fixed, a_f = brain
    t_true = np.eye(4)
    t_true[:3, :3] = _rotation(np.pi, 2) @ _rotation(0.06, 0)  # upside down in the axial plane, tilted
    t_true[:3, 3] = [3.0, 5.0, -2.0]
    moving, a_m = _moved(fixed, a_f, t_true)
    res = affine_prealign(fixed, a_f, moving, a_m)
    err_lin, err_t = _errors(res.matrix, t_true)
    assert res.accepted and res.start == "z180", (res.start, res.start_values)
    assert err_lin <= 0.02 and err_t <= 1.0
    # one start only (the identity): the fit cannot reach it, and must not claim it did
    single = affine_prealign(fixed, a_f, moving, a_m, AffineConfig(starts=("identity",)))
    assert _errors(single.matrix, t_true)[0] > 0.5


def test_garbage_pair_keeps_the_identity(brain):
    fixed, a_f = brain
    rng = np.random.default_rng(0)
    noise = rng.random((20, 20, 20)).astype(np.float32)  # smooth-free noise, nothing like a brain
    a_m = np.diag([9.0, 9.0, 9.0, 1.0])
    a_m[:3, 3] = -90.0
    for metric in ("auto", "ncc", "mi"):
        res = affine_prealign(fixed, a_f, noise, a_m, AffineConfig(metric=metric))
        assert not res.accepted and res.reason, (metric, res)
        np.testing.assert_array_equal(res.matrix, np.eye(4))


def test_check_rejects_a_fit_worse_than_identity(brain):
    """A fit stopped after the coarse multi-start at a wrong orientation ends worse than the identity."""
    fixed, a_f = brain
    moving, a_m = _moved(fixed, a_f, np.eye(4))
    cfg = AffineConfig(starts=("x180",), iterations=(1, 1), metric="mi")
    res = affine_prealign(fixed, a_f, moving, a_m, cfg)
    assert not res.accepted and "worse than identity" in res.reason and res.value_final < res.value_init
    np.testing.assert_array_equal(res.matrix, np.eye(4))
    unchecked = AffineConfig(starts=("x180",), iterations=(1, 1), metric="mi", check=False)
    off = affine_prealign(fixed, a_f, moving, a_m, unchecked)
    assert off.accepted and not np.allclose(off.matrix, np.eye(4))


def test_config_choices():
    assert AffineConfig().metric is AffineMetric.auto
    assert AffineConfig(metric="mi").metric is AffineMetric.mi
    with pytest.raises(ValueError):
        AffineConfig(metric="cc")
    with pytest.raises(ValueError, match="start"):
        AffineConfig(starts=("identity", "x45"))
    for name in GROSS_STARTS:
        r = start_rotation(name)
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1.0)
    np.testing.assert_allclose(start_rotation("z90") @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-12)


def test_registrar_records_the_check_in_qc(brain, stub_runner):
    from emorph_deploy.registration import Registrar

    fixed, a_f = brain
    zero_flow = np.zeros((3, 16, 16, 16), np.float32)  # a 16³ grid at 12 mm
    reg = Registrar(stub_runner(zero_flow, spacing=12.0), warmup=False)
    t_true = _known_affine()
    moving, a_m = _moved(fixed, a_f, t_true)
    good = reg.register((fixed, a_f), (moving, a_m), affine=True).qc
    assert good["affine_accepted"] is True and good["affine_reason"] == ""
    assert good["affine_start"] == "identity"
    assert good["affine_metric"] in ("ncc", "mi") and good["affine_value_final"] > good["affine_value_init"]
    assert good["affine_ncc_final"] > good["affine_ncc_init"]  # the keys qc.json had before stay
    noise = np.random.default_rng(1).random((20, 20, 20)).astype(np.float32)
    bad = reg.register((fixed, a_f), (noise, np.diag([9.0, 9.0, 9.0, 1.0])), affine=True)
    assert bad.qc["affine_accepted"] is False and bad.qc["affine_reason"]
    np.testing.assert_array_equal(bad.pre_affine, np.eye(4))
    from emorph_deploy.registration.affine import rejection_warning

    assert rejection_warning(bad.qc).startswith("warning: affine pre-alignment rejected, identity kept: ")
    assert rejection_warning(good) is None
