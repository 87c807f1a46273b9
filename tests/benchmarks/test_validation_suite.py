"""benchmarks/validation_suite.py's scoring, summary, targets and report on fake results (no registration)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load() -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    name = "emorph_bench_validation_suite"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / "validation_suite.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


VS = _load()


def test_score_per_label_and_gm_wm_mean() -> None:
    fixed = np.zeros((4, 4, 4), np.int32)
    fixed[0] = 1
    fixed[1] = 2
    fixed[2:] = 3
    warped = fixed.copy()
    warped[1, :2] = 3  # half of GM → WM
    d = VS.score(warped, fixed)
    assert d["dice_csf"] == pytest.approx(1.0)
    assert d["dice_gm"] == pytest.approx(2 * 8 / (8 + 16))
    assert d["dice_wm"] == pytest.approx(2 * 32 / (40 + 32))
    assert d["dice"] == pytest.approx((d["dice_gm"] + d["dice_wm"]) / 2)  # CSF not in the mean
    with pytest.raises(ValueError):
        VS.score(warped[:3], fixed)


def test_score_synthetic_labels_use_all_labels() -> None:
    fixed = np.repeat(np.array([0, 2, 9, 9]), 4).reshape(2, 2, 4)
    warped = fixed.copy()
    warped[1, 1] = 2  # 4 voxels of label 9 → 2
    d = VS.score(warped, fixed, tissue=False)
    assert set(d) == {"dice"}  # no per-class columns
    assert d["dice"] == pytest.approx((2 * 4 / 12 + 2 * 4 / 12) / 2)  # labels 2 and 9, not only 2
    assert math.isnan(VS.score(fixed, fixed)["dice_wm"])  # tissue mode: a class in neither map is NaN


def test_synthetic_pairs_from_a_heldout_pairs_module(tmp_path: Path, monkeypatch) -> None:
    """The adapter to ``brainsynth.heldout_pairs(n=, shape=, spacing_mm=, contrast=, paired=True)`` (dicts
    of (1, D, H, W) tensors), and the skip reason when the module is missing."""
    import types

    import nibabel as nib
    import torch

    calls = []

    def heldout_pairs(n, shape, spacing_mm, contrast, paired):
        calls.append((n, tuple(shape), spacing_mm, contrast, paired))
        g = torch.Generator().manual_seed(len(calls))
        return [
            {
                "fixed": torch.rand(1, 4, 5, 6, generator=g),
                "moving": torch.rand(1, 4, 5, 6, generator=g),
                "fixed_labels": torch.randint(0, 5, (1, 4, 5, 6), generator=g),
                "moving_labels": torch.randint(0, 5, (1, 4, 5, 6), generator=g),
                "contrast": "t1/remap",
            }
            for _ in range(n)
        ]

    fake = types.ModuleType("emorph_deploy.data.brainsynth")
    fake.heldout_pairs = heldout_pairs
    monkeypatch.setitem(sys.modules, "emorph_deploy.data.brainsynth", fake)
    res = {"summary": {"skipped": {}}}
    pairs = VS.synthetic_pairs(tmp_path, res, 2)
    assert [c[3] for c in calls] == ["same", "different"] and calls[0][0] == 2 and calls[0][2] == 2.0
    assert all(c[4] is True for c in calls)  # paired sets: one geometry per pair index
    assert [p["group"] for p in pairs] == ["synthetic-same"] * 2 + ["synthetic-different"] * 2
    assert all(p["tissue"] is False for p in pairs) and res["summary"]["skipped"] == {}
    img = nib.load(str(pairs[0]["moving_labels"]))
    assert img.shape == (4, 5, 6) and np.allclose(np.diag(img.affine), [2, 2, 2, 1])
    assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1, 2, 3, 4}

    monkeypatch.setitem(sys.modules, "emorph_deploy.data.brainsynth", None)  # import fails
    res = {"summary": {"skipped": {}}}
    assert VS.synthetic_pairs(tmp_path, res, 2) == []
    assert "not available" in res["summary"]["skipped"]["synthetic pairs"]


def test_deformed_pairs_warp_each_subject_by_a_known_deformation(tmp_path: Path, monkeypatch) -> None:
    """Each subject against itself warped: the fixed image and labels on the subject's grid, moved (labels
    still the same classes), the moving side the subject's own files; the group and the seeds recorded."""
    import types

    import nibabel as nib
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    subjects = []
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        img = gaussian_filter(rng.random((24, 26, 22)), 2).astype(np.float32)
        labels = np.digitize(img, np.quantile(img, [0.25, 0.5, 0.75])).astype(np.int16)  # 0..3
        aff = np.diag([2.0, 2.0, 2.0, 1.0])
        paths = {"image": d / "brain.nii.gz", "labels": d / "labels.nii.gz"}
        nib.save(nib.Nifti1Image(img, aff), str(paths["image"]))
        nib.save(nib.Nifti1Image(labels, aff), str(paths["labels"]))
        subjects.append(types.SimpleNamespace(name=name, paths=paths))
    monkeypatch.setattr(
        "emorph_deploy.data.realbrains.load_suite",
        lambda names, spacing_mm, log: types.SimpleNamespace(subjects=subjects),
    )
    args = argparse.Namespace(subjects=None, quick=False)
    res = {"summary": {"skipped": {}}}
    pairs = VS.deformed_pairs(args, tmp_path / "work", res, 2)
    assert [p["name"] for p in pairs] == [
        "a deformed 8 mm",
        "a deformed 12 mm",
        "b deformed 8 mm",
        "b deformed 12 mm",
    ]
    assert all(p["group"] == "deformed" for p in pairs) and res["summary"]["deformed"]["per_subject"] == 2
    first = pairs[0]
    assert first["moving"] == subjects[0].paths["image"]
    moved = np.asarray(nib.load(str(first["fixed_labels"])).dataobj)
    orig = np.asarray(nib.load(str(first["moving_labels"])).dataobj)
    assert moved.shape == orig.shape and set(np.unique(moved)) <= {0, 1, 2, 3}
    changed = float((moved != orig).mean())
    assert 0.02 < changed < 0.9  # deformed, not scrambled
    bigger = np.asarray(nib.load(str(pairs[1]["fixed_labels"])).dataobj)
    assert float((bigger != orig).mean()) > changed  # 12 mm moves more than 8 mm


def _row(pair, group, method, dice, seconds=1.0, jac=0.0, ok=True, single=False, steps=None):
    return {
        "pair": pair,
        "group": group,
        "method": method,
        "ok": ok,
        "single_subject": single,
        "dice": dice,
        "dice_csf": dice - 0.2,
        "dice_gm": dice - 0.05,
        "dice_wm": dice + 0.05,
        "seconds": seconds,
        "frac_jac_nonpos": jac,
        "steps": steps,
    }


ROWS = [
    _row("b→a", "same", "network", 0.60, 0.5, single=False),
    _row("c→b", "same", "network", 0.70, 0.7, single=True),
    _row("b→a", "same", "syn", 0.62, 10.0),
    _row("c→b", "same", "syn", 0.64, 12.0, single=True),
    _row("b→a", "same", "refine", 0.70, 2.0, 1e-4, steps=20),
    _row("c→b", "same", "refine", 0.72, 2.0, 3e-4, single=True, steps=20),
    _row("b→a", "same", "greedy", 0.70, 14.0, 0.02),
    _row("c→b", "same", "greedy", 0.0, 14.0, ok=False),  # failed rows are left out
    _row("b→a (inv)", "inverted", "network", 0.64, 0.5),
    _row("b→a (inv)", "inverted", "refine", 0.70, 2.0, 5e-4, steps=20),
]


def test_summarise_means_groups_and_failed_rows() -> None:
    s = VS.summarise(ROWS)
    assert set(s) == {"same", "inverted", "single-subject"}
    assert list(s["same"]) == ["network", "refine", "syn", "greedy"]  # table order of METHODS
    assert s["same"]["network"]["pairs"] == 2
    assert s["same"]["network"]["dice"] == pytest.approx(0.65)
    assert s["same"]["network"]["dice_gm"] == pytest.approx(0.60)
    assert s["same"]["network"]["seconds"] == pytest.approx(0.6)
    assert s["same"]["greedy"]["pairs"] == 1 and s["same"]["greedy"]["dice"] == pytest.approx(0.70)
    assert s["same"]["refine"]["frac_jac_nonpos"] == pytest.approx(2e-4)
    assert s["same"]["refine"]["steps"] == 20
    assert s["single-subject"]["network"]["pairs"] == 1
    assert s["single-subject"]["network"]["dice"] == pytest.approx(0.70)
    assert s["inverted"]["network"]["dice"] == pytest.approx(0.64)


def test_targets_deltas_and_verdicts() -> None:
    t = {x["target"]: x for x in VS.targets(VS.summarise(ROWS))}
    net_syn = t["network (after affine) vs ANTs SyN (same contrast)"]
    assert net_syn["delta"] == pytest.approx(0.65 - 0.63) and net_syn["met"] is True
    ref_greedy = t["network + refinement vs greedy (same contrast)"]
    assert ref_greedy["delta"] == pytest.approx(0.71 - 0.70) and ref_greedy["met"] is True
    inv_net = t["network (after affine): inverted − same contrast within ±0.02"]
    assert inv_net["delta"] == pytest.approx(-0.01) and inv_net["met"] is True
    inv_ref = t["network + refinement: inverted − same contrast within ±0.02"]
    assert inv_ref["delta"] == pytest.approx(-0.01) and inv_ref["met"] is True
    inv_zero = t["refinement from zero: inverted − same contrast within ±0.02"]
    assert inv_zero["delta"] is None and inv_zero["met"] is None  # no such rows: not measured
    jac = t["network + refinement: fraction J ≤ 0 (worst of same/inverted means)"]
    assert jac["frac_jac_nonpos"] == pytest.approx(5e-4)
    assert not any("synthetic" in k for k in t)  # no synthetic rows: no synthetic targets
    syn = [dict(r, group="synthetic-same") for r in ROWS[:6]]
    syn += [dict(r, group="synthetic-different", dice=r["dice"] - 0.05) for r in ROWS[:6]]
    ts = {x["target"]: x for x in VS.targets(VS.summarise(syn))}
    d_net = ts["network (after affine): synthetic different − same contrast within ±0.02"]
    assert d_net["delta"] == pytest.approx(-0.05) and d_net["met"] is False
    deformed = [_row("a", "deformed", "refine", 0.92), _row("b", "deformed", "refine", 0.95)]
    key = "network + refinement ≥ 0.93 on known deformations of real brains"
    assert {x["target"]: x for x in VS.targets(VS.summarise(deformed))}[key]["met"] is True  # 0.935
    deformed[1]["dice"] = 0.93
    assert {x["target"]: x for x in VS.targets(VS.summarise(deformed))}[key]["met"] is False  # 0.925
    assert key not in t  # no deformed rows: no such target
    worse = [dict(r, dice=0.60) if r["group"] == "inverted" else r for r in ROWS]
    t2 = {x["target"]: x for x in VS.targets(VS.summarise(worse))}
    assert t2["network + refinement: inverted − same contrast within ±0.02"]["met"] is False


def test_render_and_json(tmp_path: Path) -> None:
    import _common as C

    args = argparse.Namespace(threads=2, quick=True, out=str(tmp_path / "vs"), force=False)
    res = C.new_result(VS.NAME, args, ["benchmarks/validation_suite.py", "--quick"])
    res["rows"] = ROWS
    res["summary"] = {
        "model": "fake",
        "subjects": [
            {"name": "a", "kind": "average", "description": "A", "grid": "RAS 2×2×2", "mask_method": "m"}
        ],
        "pair_rule": "all ordered",
        "equal_time": {"steps": 20, "steps_zero": 23, "network_s": 0.3, "step_s": 0.1, "how": "test"},
        "by_group": VS.summarise(ROWS),
        "skipped": {"synthetic pairs": "not here"},
    }
    res["summary"]["targets"] = VS.targets(res["summary"]["by_group"])
    json_path, md_path = C.publish(res, VS.render, args)
    md = md_path.read_text()
    assert "## Distinct real brains, same contrast" in md and "## Targets (issue 15)" in md
    assert "| network + refinement (20 steps) | 2 | 0.710 |" in md
    assert "23 steps = 20 + round(0.3 s network / 0.1 s per step)" in md
    assert "Skipped synthetic pairs: not here." in md
    assert "→ **not met**" not in md.split("## Per pair")[0]  # every judged target met on these rows
    data = json.loads(json_path.read_text())
    assert C.validate_result(data) == []
    assert data["summary"]["by_group"]["same"]["syn"]["dice"] == pytest.approx(0.63)
