"""``emorph_deploy.check``: the tolerance table, gating, CSV pairs of NIfTI files."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from emorph_deploy.check import TOLERANCES, evaluate, read_check_pairs
from emorph_deploy.errors import InputError


def test_tolerance_table():
    assert TOLERANCES["fp32"] == {"max_flow_voxel": 1e-3}
    assert TOLERANCES["fp16"] == {"mean_flow_voxel": 0.05, "dice_delta": 0.002}
    assert TOLERANCES["int8"] == {"mean_flow_voxel": 0.2, "dice_delta": 0.01}


def test_evaluate_gates_the_worst_pair():
    ok = {"max_flow_voxel": 5e-4, "mean_flow_voxel": 1e-4, "dice_delta": 0.0}
    bad = {"max_flow_voxel": 2e-3, "mean_flow_voxel": 1e-3, "dice_delta": 0.003}
    assert evaluate([ok], "fp32")[1] is True
    assert evaluate([ok, bad], "fp32")[1] is False
    assert evaluate([ok, bad], "fp16")[1] is False  # dice_delta 0.003 > 0.002
    assert evaluate([ok, bad], "int8")[1] is True
    checks, passed = evaluate([{"max_flow_voxel": 0.0, "mean_flow_voxel": 0.01}], "fp16")
    assert passed is True and [c["ok"] for c in checks] == [True, None]  # Dice not measured without labels
    assert evaluate([{"max_flow_voxel": float("nan")}], "fp32")[1] is False
    assert evaluate([ok, bad], "bf16")[1] is False  # bf16 gates like fp16
    with pytest.raises(InputError):
        evaluate([ok], "fp8")


def test_pairs_csv_errors(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("a,b\nx,y\n")
    with pytest.raises(InputError, match="fixed,moving"):
        read_check_pairs(p)
    p.write_text("moving,fixed,moving_label\nm.nii.gz,f.nii.gz,ml.nii.gz\n")
    with pytest.raises(InputError, match="line 2: expected both"):
        read_check_pairs(p)
    with pytest.raises(InputError, match="missing path"):
        read_check_pairs(tmp_path / "none.csv")


def _save(arr, path, spacing):
    import nibabel as nib

    nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.0])), str(path))


def test_check_cli_with_nifti_pairs(exports, grid, tmp_path):
    from emorph_deploy.cli.app import app
    from emorph_deploy.data.synthetic import synth_pair

    pair = synth_pair(grid, seed=5)
    spacing = (1.5, 1.0, 2.0)
    _save(pair.moving, tmp_path / "m.nii.gz", spacing)
    _save(pair.fixed, tmp_path / "f.nii.gz", spacing)
    _save(pair.moving_labels.astype(np.int16), tmp_path / "ml.nii.gz", spacing)
    _save(pair.fixed_labels.astype(np.int16), tmp_path / "fl.nii.gz", spacing)
    csv = tmp_path / "pairs.csv"
    csv.write_text("moving,fixed,moving_label,fixed_label\nm.nii.gz,f.nii.gz,ml.nii.gz,fl.nii.gz\n")
    runner = CliRunner()
    res = runner.invoke(app, ["check", str(exports["native"]), "--pairs", str(csv)])
    assert res.exit_code == 0, res.output
    assert "Dice" in res.stdout and "PASS" in res.stdout
    res = runner.invoke(app, ["check", str(exports["native"]), "--pairs", str(csv), "--synthetic", "1"])
    assert res.exit_code == 2
    (tmp_path / "bad.csv").write_text("moving,fixed\nmissing.nii.gz,f.nii.gz\n")
    res = runner.invoke(app, ["check", str(exports["native"]), "--pairs", str(tmp_path / "bad.csv")])
    assert res.exit_code == 2
