"""The deformable stage's check (issue 15: never worse than no registration without a warning): qc.json's
``deformable_check`` and the CLI's warning line."""

from __future__ import annotations

import numpy as np
import pytest

from emorph_deploy.qc import DEFORMABLE_TOLERANCE, deformable_check, deformable_warning
from emorph_deploy.registration import Registrar


def _shift_flow(voxels: float, grid=(16, 16, 16)) -> np.ndarray:
    flow = np.zeros((3, *grid), np.float32)
    flow[0] = voxels
    return flow


@pytest.mark.parametrize(("voxels", "lowered"), [(2.0, False), (0.0, False), (-2.0, True)])
def test_qc_flags_a_flow_that_ends_below_the_start(pair_in_one_space, stub_runner, voxels, lowered):
    # the moving box is the fixed one shifted +2 voxels along axis 0: a +2 flow aligns it, -2 doubles the
    # shift, 0 leaves the start as it was
    fixed, moving = pair_in_one_space
    reg = Registrar(stub_runner(_shift_flow(voxels), spacing=4.0), affine=False, warmup=False)
    q = reg.register(fixed, moving, refine=0).qc
    check = q["deformable_check"]
    assert check["judged"] and check["lowered"] is lowered
    if voxels == 2.0:
        assert check["ncc_end"] > check["ncc_start"] + 0.2
    if voxels == 0.0:
        assert check["ncc_end"] == pytest.approx(check["ncc_start"], abs=1e-6)
    warning = deformable_warning(q)
    assert (warning is not None) is lowered
    if lowered:
        assert warning.startswith("warning: ") and "no registration" in warning and "\n" not in warning
        assert f"{check['ncc_start']:.4f} -> {check['ncc_end']:.4f}" in warning


def test_check_rules_on_arrays():
    rng = np.random.default_rng(1)
    fixed = rng.random((12, 12, 12), dtype=np.float32)
    noisy = fixed + 0.5 * rng.random((12, 12, 12), dtype=np.float32)
    better = deformable_check(fixed, noisy, fixed, None)
    assert better["judged"] and not better["lowered"] and better["ncc_end"] == pytest.approx(1.0)
    worse = deformable_check(fixed, fixed, noisy, None)
    assert worse["lowered"] and worse["ncc_start"] - worse["ncc_end"] > DEFORMABLE_TOLERANCE
    # within the tolerance: not lowered
    tiny = fixed + 1e-4 * rng.random((12, 12, 12), dtype=np.float32)
    assert not deformable_check(fixed, fixed, tiny, None)["lowered"]
    # a loosely matched contrast that ends weakly correlated is not judged, and says why
    weak = deformable_check(fixed, fixed, rng.random((12, 12, 12), dtype=np.float32), None, min_ncc=0.55)
    assert not weak["judged"] and not weak["lowered"] and "0.55" in weak["reason"]
    flat = deformable_check(fixed, np.ones_like(fixed), fixed, None)
    assert not flat["judged"] and "undefined" in flat["reason"]
    assert deformable_warning({"deformable_check": weak}) is None and deformable_warning({}) is None


def test_batch_summary_carries_the_warnings():
    from emorph_deploy.registration.batch import SUMMARY_FIELDS, _qc_row, format_summary

    qc = {"ncc_before": 0.5, "ncc_after": 0.4, "frac_jac_nonpos": 0.0, "sdlogj": 0.1, "qc_region": "volume"}
    qc["affine_prealignment"] = False
    qc["deformable_check"] = {"judged": True, "ncc_start": 0.5, "ncc_end": 0.4, "lowered": True}
    row = _qc_row(qc)
    assert "warning" in SUMMARY_FIELDS and row["warning"].startswith("the deformable registration ended")
    assert _qc_row({**qc, "deformable_check": {"lowered": False}})["warning"] == ""
    table = format_summary([{"id": "p0", "status": "ok", "seconds": 1.0, **row}])
    assert "    warning: the deformable registration ended below no registration" in table
