"""benchmarks/default_settings.py: settings parsing and the budgeted pick on fake rows (no registration)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load() -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    name = "emorph_bench_default_settings"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / "default_settings.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


DS = _load()


def test_parse_settings() -> None:
    assert DS.parse_settings("0, 20,20+5, 10@ngf,10+2~30@mind,10~0,5+2^0,5+2~3^1.5@ncc,5+2%0.3") == [
        (0, 0, "auto", None, None, None),
        (20, 0, "auto", None, None, None),
        (20, 5, "auto", None, None, None),
        (10, 0, "ngf", None, None, None),
        (10, 2, "mind", 30.0, None, None),
        (10, 0, "auto", 0.0, None, None),
        (5, 2, "auto", None, 0.0, None),
        (5, 2, "ncc", 3.0, 1.5, None),
        (5, 2, "auto", None, None, 0.3),
    ]
    assert DS.parse_settings("5+2~10^0.7%0.4@ngf") == [(5, 2, "ngf", 10.0, 0.7, 0.4)]
    bads = ("x", "0+5", "-1", "", "10@nmi", "0@ngf", "0~1", "10~-1", "10~x", "10~nan", "0^1", "5^-1", "5^9")
    bads += ("0%0.3", "5%0", "5%-1", "5%x", "5%inf")
    for bad in bads:
        with pytest.raises(SystemExit):
            DS.parse_settings(bad)
    assert DS.setting_name(0, 0) == "network alone" and DS.setting_name(20, 5) == "20 half + 5 full"
    assert DS.Setting(10, 2, "ngf").name == "10 half + 2 full @ngf" and DS.Setting(10).name == "10 half"
    assert DS.Setting(10, 2, "ncc", 10.0).name == "10 half + 2 full, fold 10 @ncc"
    assert DS.Setting(5, 2, "auto", None, 0.0).name == "5 half + 2 full, σ 0"
    assert DS.Setting(5, 2, "auto", None, None, 0.3).name == "5 half + 2 full, lr 0.3"


def _row(model, setting, group, dice, half=0, full=0):
    return {
        "model": model,
        "setting": setting,
        "group": group,
        "dice": dice,
        "frac_jac_nonpos": 0.0,
        "half_steps": half,
        "full_steps": full,
    }


def test_pick_is_the_best_real_dice_within_the_budget() -> None:
    rows = [
        _row("m", "network alone", "same", 0.60),
        _row("m", "network alone", "inverted", 0.50),
        _row("m", "20 half", "same", 0.70, 20),
        _row("m", "20 half", "inverted", 0.56, 20),
        _row("m", "20 half", "synthetic-same", 0.99, 20),  # synthetic rows do not enter the pick
        _row("m", "20 half", "deformed", 0.99, 20),  # nor do the known deformations of one brain
        _row("m", "60 half", "same", 0.72, 60),
        _row("m", "60 half", "inverted", 0.58, 60),
    ]
    timing = [
        {"model": "m", "setting": "network alone", "seconds": 0.3},
        {"model": "m", "setting": "20 half", "seconds": 0.6},
        {"model": "m", "setting": "20 half", "seconds": 0.9},  # the slower similarity counts
        {"model": "m", "setting": "60 half", "seconds": 1.7},
    ]
    s = DS.summarise(rows, timing, budget_s=1.0)
    by = {e["setting"]: e for e in s["table"]}
    assert by["20 half"]["dice_real"] == pytest.approx(0.63, abs=1e-9)
    assert by["20 half"]["seconds"] == pytest.approx(0.9, abs=1e-9)
    assert s["picks"]["m"]["setting"] == "20 half"  # 60 half is better but over the budget
    s = DS.summarise(rows, timing, budget_s=2.0)
    assert s["picks"]["m"]["setting"] == "60 half"
    s = DS.summarise(rows, [], budget_s=2.0)  # no timing: nothing can be picked
    assert s["picks"] == {}


def test_deformed_count_is_checked_before_any_work() -> None:
    with pytest.raises(SystemExit, match="--deformed: expected 0"):
        DS.main(["--deformed", str(len(DS.VS.DEFORMED_MM) + 1)])
