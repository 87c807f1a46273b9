"""Smoke tests of the benchmark scripts: each runs in --quick mode on a tiny model/grid and writes a results
JSON (schema ``emorph-bench/1``) plus markdown. No timing assertions: only structure and sanity of values."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str) -> ModuleType:
    """Import benchmarks/<name>.py under a unique module name (the scripts put benchmarks/ on sys.path)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name == "_common":  # the scripts import it as ``_common``: share that module
        return importlib.import_module("_common")
    mod_name = f"emorph_bench_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _restore_threads():
    """The scripts set thread environment variables and torch's thread count: undo that for other tests."""
    import os

    import torch

    env, threads = dict(os.environ), torch.get_num_threads()
    yield
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(threads)


def _result(stem: Path) -> dict:
    common = _load("_common")
    data = json.loads(stem.with_name(stem.name + ".json").read_text())
    assert common.validate_result(data) == []
    md = stem.with_name(stem.name + ".md").read_text()
    assert "Command: `python" in md and "Machine:" in md
    assert data["quick"] is True
    return data


# ---------------------------------------------------------------------------------------------- _common
def test_common_helpers(tmp_path: Path) -> None:
    c = _load("_common")
    assert c.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6, abs=1e-12)
    assert c.percentile([3.0], 50) == 3.0
    calls = []
    t = c.time_call(lambda: calls.append(1), runs=5, warmup=2)
    assert len(calls) == 7 and len(t.times_s) == 5 and len(t.warmup_s) == 2
    d = t.to_dict()
    assert d["min_s"] <= d["median_s"] <= d["p90_s"] + 1e-12
    table = c.md_table(["a", "b|c"], [[1, None]])
    assert table.splitlines() == ["| a | b\\|c |", "|---|---|", "| 1 | - |"]
    assert c.parse_size("160x192×224") == (160, 192, 224)
    info = c.cpu_info()
    assert info["logical_cpus"] >= 1 and isinstance(info["cpu_flags"], list)
    assert isinstance(info["avx2"], bool) and isinstance(info["amx"], bool)
    # the machine line states what the backend resolver decides on (native bf16: the packaged bf16 IR)
    from emorph_deploy.runtime import cpu_has_int8_dot, cpu_has_native_bf16

    assert info["native_bf16"] is cpu_has_native_bf16() and info["int8_dot"] is cpu_has_int8_dot()
    line = c.machine_line({**info, "native_bf16": True, "int8_dot": False, "avx512": True, "amx": False})
    assert "native bf16" in line and "VNNI" not in line and "(no amx)" in line
    line = c.machine_line({**info, "native_bf16": False, "avx512": True, "amx": False})
    assert "(no native bf16/amx)" in line


def test_run_measured_reports_child_peak_rss() -> None:
    """The child's own VmHWM is reported (not inflated by this process), and its JSON report is parsed."""
    c = _load("_common")
    code = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r}); import _common as C; "
        "b = bytearray(120 * 2**20); b[::4096] = b'x' * len(b[::4096]); C.child_report({'ok': True})"
    )
    m = c.run_measured([sys.executable, "-c", code], timeout=120)
    assert m.returncode == 0, m.stderr
    assert m.report is not None and m.report["ok"] is True
    assert 120 * 2**20 <= m.peak_rss_bytes < 1024 * 2**20  # the 120 MiB buffer + a small interpreter
    assert m.rusage_maxrss_bytes is not None and m.rusage_maxrss_bytes >= m.peak_rss_bytes * 0.9


def test_finish_args_quick_defaults(tmp_path: Path) -> None:
    c = _load("_common")
    args = c.finish_args(c.base_parser("x").parse_args(["--quick", "--threads", "1"]), "demo")
    assert args.runs == 3 and args.out.endswith("results/quick/demo")
    with pytest.raises(SystemExit):
        c.finish_args(c.base_parser("x").parse_args(["--runs", "0"]), "demo")


# ---------------------------------------------------------------------------------------------- scripts
def test_compute_bound_quick(tmp_path: Path) -> None:
    mod = _load("compute_bound")
    out = tmp_path / "cb"
    argv = ["--quick", "--threads", "1", "--n", "128", "--grids", "16x16x16", "--out", str(out)]
    assert mod.main(argv) == 0
    data = _result(out)
    assert data["benchmark"] == "compute_bound"
    assert data["summary"]["peak_gflops"] > 0
    (row,) = data["rows"]
    assert row["grid"] == [16, 16, 16] and row["gflop"] > 0 and row["bound_s"] > 0
    with pytest.raises(Exception, match="already exists"):  # no overwrite without --force
        mod.main(argv)


@pytest.mark.slow
def test_default_model_eval_quick_measures_the_registration_defaults(tmp_path: Path) -> None:
    pytest.importorskip("ants", reason="the [peers] extra (antspyx) is not installed")
    mod = _load("default_model_eval")
    out = tmp_path / "dme"
    argv = ["--quick", "--threads", "1", "--no-syn", "--no-demo", "--refine", "2", "--runs", "1"]
    assert mod.main([*argv, "--warmup", "0", "--out", str(out)]) == 0
    data = _result(out)
    rows = {r["method"]: r for r in data["rows"] if r["ok"] and r["pair_kind"] == "template"}
    assert {"default model", "default model + refine 2", "defaults"} <= set(rows)
    inverted = [r for r in data["rows"] if r["pair_kind"] == "template-inverted"]
    assert {r["method"] for r in inverted} == set(rows) and all(r["ok"] for r in inverted)
    assert "defaults" in data["summary"]["by_kind"]["template-inverted"]
    assert rows["defaults"]["affine_prealignment"] is True  # what `emorph register` does without options
    aim = data["summary"]["target_defaults_template"]
    assert aim["goal"] == 0.93 and aim["dice"] == pytest.approx(rows["defaults"]["dice_mean"])
    assert aim["met"] == (aim["dice"] >= 0.93)
    assert "Aim (issue 15) on template pairs, defaults" in out.with_name("dme.md").read_text()


@pytest.mark.slow
def test_openvino_latency_quick_states_the_fp32_bound(tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="the [cpu] extra (openvino) is not installed")
    mod = _load("openvino_latency")
    out = tmp_path / "ov"
    argv = ["--quick", "--threads", "1", "--runs", "1", "--only", "ov-fp32", "--dice-pairs", "1"]
    assert mod.main([*argv, "--out", str(out)]) == 0
    data = _result(out)
    peak = data["matmul_peak"]
    assert peak["used"]["gflops_median"] == max(
        peak["before"]["gflops_median"], peak["after"]["gflops_median"]
    )
    (grid,) = data["grids"]
    bound = grid["compute_bound"]
    assert bound["gflop"] > 0 and bound["bound_s"] == pytest.approx(bound["gflop"] / bound["peak_gflops"])
    rows = {r["id"]: r for r in data["rows"]}
    assert set(rows) == {"ort-fp32", "ov-fp32"}
    for r in rows.values():
        assert r["x_fp32_bound"] == pytest.approx(r["median_s"] / bound["bound_s"])
        assert "real_dice_mean" not in r  # --quick: no real pairs, and the table says why
    assert rows["ov-fp32"]["mean_flow_voxel"] < 1e-3
    md = out.with_name("ov.md").read_text()
    assert "× fp32 bound" in md and "Real pairs: off (--real-pairs 0)" in md
    with pytest.raises(SystemExit):  # a negative pair count is bad input
        mod.main([*argv, "--real-pairs", "-1", "--out", str(tmp_path / "bad")])


@pytest.mark.slow
def test_openvino_int8_novnni_quick_compares_overflow_fix_modes(tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="the [cpu] extra (openvino) is not installed")
    pytest.importorskip("nncf", reason="the [cpu] extra (nncf) is not installed")
    mod = _load("openvino_int8_novnni")
    out = tmp_path / "int8"
    assert mod.main(["--quick", "--threads", "1", "--runs", "1", "--pairs", "1", "--out", str(out)]) == 0
    data = _result(out)
    rows = {r["id"]: r for r in data["rows"]}
    assert set(rows) == {"ov-fp32", *(f"ov-int8-nncf-{m}" for m in mod.MODES)}
    assert rows["ov-fp32"]["max_flow_voxel"] == 0 and rows["ov-fp32"]["vs_fp32"] == 1.0
    fp32_s = rows["ov-fp32"]["median_s"]
    for r in rows.values():
        assert r["median_s"] > 0 and r["vs_fp32"] == pytest.approx(fp32_s / r["median_s"])
    assert isinstance(data["summary"]["int8_dot"], bool)
    with pytest.raises(SystemExit):  # no pairs is bad input
        mod.main(["--quick", "--pairs", "0", "--out", str(tmp_path / "bad")])


@pytest.mark.slow
def test_model_latency_quick(tmp_path: Path) -> None:
    mod = _load("model_latency")
    out = tmp_path / "ml"
    only = "torch-eager$|torch-jit-freeze$|ort-native-(default|no-spin)$|ort-gather-default|ort-int8"
    assert (
        mod.main(
            [
                "--quick",
                "--threads",
                "1",
                "--grids",
                "16x16x16",
                "--runs",
                "1",
                "--warmup",
                "0",
                "--only",
                only,
                "--no-fp16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = _result(out)
    rows = {r["row"]: r for r in data["rows"]}
    assert {
        "torch-eager",
        "torch-jit-freeze",
        "ort-native-default",
        "ort-native-no-spin",
        "ort-gather-default",
        "ort-int8",
    } <= set(rows)
    for r in rows.values():
        assert r.get("ok"), r.get("error")
        assert r["median_s"] > 0 and r["x_bound"] > 0 and len(r["timing"]["times_s"]) == 1
    # fp32 paths agree with torch eager; the int8 graph is labelled an accuracy check
    assert rows["torch-eager"]["max_dflow_voxel"] == 0.0
    assert rows["ort-native-default"]["max_dflow_voxel"] < 1e-3
    assert rows["ort-gather-default"]["max_dflow_voxel"] < 1e-3
    assert rows["ort-int8"]["accuracy_check"] is True and rows["ort-int8"]["precision"] == "int8"
    g = data["summary"]["grids"]["16×16×16"]
    assert g["fastest_cpu"] in rows and rows[g["fastest_cpu"]]["precision"] == "fp32"
    t = data["summary"]["targets"]
    assert set(t) >= {"x_bound", "speedup", "x_bound_met", "speedup_met"}


@pytest.mark.slow
def test_model_latency_process_isolation(tmp_path: Path) -> None:
    """One ONNX Runtime row in its own process: timings and its peak RSS come back."""
    mod = _load("model_latency")
    out = tmp_path / "mlp"
    assert (
        mod.main(
            [
                "--quick",
                "--threads",
                "1",
                "--grids",
                "16x16x16",
                "--runs",
                "1",
                "--warmup",
                "0",
                "--isolate",
                "process",
                "--only",
                "ort-native-default$",
                "--no-fp16",
                "--no-int8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    (row,) = _result(out)["rows"]
    assert row["ok"], row.get("error")
    assert row["peak_rss_bytes"] > 10 * 2**20 and row["process_wall_s"] > 0


@pytest.mark.slow
def test_memory_quick(tmp_path: Path) -> None:
    mod = _load("memory")
    out = tmp_path / "mem"
    only = "infer-ort-native$|train-step$"
    assert mod.main(["--quick", "--threads", "1", "--only", only, "--out", str(out)]) == 0
    data = _result(out)
    rows = {r["row"]: r for r in data["rows"]}
    assert set(rows) == {"infer-ort-native", "train-step"}
    for r in rows.values():
        assert r["ok"], r.get("error")
        assert r["peak_rss_bytes"] >= r["rss_before_bytes"] > 0
    assert rows["train-step"]["bidirectional"] in (True, False) and rows["train-step"]["step_s"] > 0
    assert data["summary"]["target"]["row"] == "infer-ort-native"


@pytest.mark.slow
def test_peers_quick(tmp_path: Path) -> None:
    pytest.importorskip("ants", reason="antspyx (the 'peers' extra) is not installed")
    pytest.importorskip("picsl_greedy", reason="picsl-greedy (the 'peers' extra) is not installed")
    mod = _load("peers")
    out = tmp_path / "peers"
    assert mod.main(["--quick", "--threads", "1", "--peer-runs", "2", "--out", str(out)]) == 0
    data = _result(out)
    methods = {"no registration", "affine (ANTs)", "ANTs SyN", "greedy", "emorph"}
    for pair in ("template-0", "demo"):
        got = {r["method"]: r for r in data["rows"] if r["pair"] == pair}
        assert set(got) == methods
        for r in got.values():
            assert r["ok"], r.get("error")
            assert 0.0 <= r["dice_gm"] <= 1.0 and 0.0 <= r["dice_wm"] <= 1.0
            assert r["seconds"] >= 0.0
        for m in ("affine (ANTs)", "ANTs SyN", "greedy"):  # peers: the median of --peer-runs runs
            runs = got[m]["seconds_runs"]
            assert len(runs) == 2 and got[m]["seconds"] == pytest.approx(sum(runs) / 2)
    assert data["summary"]["peer_runs"] == 2 and "median of 2 run(s)" in out.with_suffix(".md").read_text()
    # a classical deformable registration improves the overlap of the known template deformation
    tpl = data["summary"]["by_kind"]["template"]
    assert tpl["ANTs SyN"]["dice_mean"] > tpl["no registration"]["dice_mean"] + 0.01
    assert tpl["greedy"]["dice_mean"] > tpl["no registration"]["dice_mean"] + 0.01
    demo = next(p for p in data["summary"]["pairs"] if p["name"] == "demo")
    assert "Atropos" in demo["labels_method"]


@pytest.mark.slow
def test_run_all_quick_collates(tmp_path: Path) -> None:
    mod = _load("run_all")
    out = tmp_path / "all"
    assert mod.main(["--quick", "--threads", "1", "--only", "compute_bound", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"][0]["name"] == "compute_bound" and summary["runs"][0]["status"] == "ok"
    assert {t["source"] for t in summary["targets"]} >= {"model_latency", "memory", "peers", "register_e2e"}
    md = (out / "summary.md").read_text()
    assert "## Targets (issue 8)" in md and "Compute bound: matmul peak" in md
    # collate-only re-reads what exists, runs nothing
    assert mod.main(["--quick", "--collate-only", "--only", "compute_bound,memory", "--out", str(out)]) == 0
    runs = {r["name"]: r["status"] for r in json.loads((out / "summary.json").read_text())["runs"]}
    assert runs == {"compute_bound": "ok", "memory": "no results"}


# ---------------------------------------------------------------------------------------------- run_all
def _fake_runs(mod: ModuleType, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Replace the scripts run_all starts by a stub that records its command and writes ``<--out>.json``."""
    import subprocess

    calls: list[list[str]] = []
    real_run = subprocess.run

    def fake_run(cmd, **kwargs):
        if len(cmd) < 2 or Path(str(cmd[1])).parent != BENCH:  # git, lscpu, ...: the real thing
            return real_run(cmd, **kwargs)
        calls.append(list(cmd))
        stem = Path(cmd[cmd.index("--out") + 1])
        stem.with_suffix(".json").write_text(json.dumps({"summary": {}}))
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr=None)

    monkeypatch.setattr(
        mod, "script_options", lambda path: {"--quick", "--threads", "--out", "--force", "--grid", "--model"}
    )
    monkeypatch.setattr(mod.subprocess, "run", fake_run)
    return calls


def test_run_all_quick_skips_register_e2e_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--quick drops the fixed full-resolution grid, so register_e2e_full would repeat register_e2e: it is
    reported as skipped (with the reason) instead of run; a full run still passes the grid."""
    mod = _load("run_all")
    calls = _fake_runs(mod, monkeypatch)
    out = tmp_path / "quick"
    assert (
        mod.main(["--quick", "--threads", "1", "--only", "register_e2e,register_e2e_full", "--out", str(out)])
        == 0
    )
    assert [Path(c[1]).name for c in calls] == ["register_e2e.py"]
    summary = json.loads((out / "summary.json").read_text())
    runs = {r["name"]: r for r in summary["runs"]}
    assert runs["register_e2e"]["status"] == "ok"
    assert runs["register_e2e_full"]["status"] == "skipped"
    assert "no --quick form" in runs["register_e2e_full"]["reason"]
    assert not (out / "register_e2e_em23.json").exists()
    (full_row,) = [t for t in summary["targets"] if t["source"] == "register_e2e_full"]
    assert full_row["measured"] == "skipped (--quick)"
    md = (out / "summary.md").read_text()
    assert "| register_e2e_full | skipped |" in md and "no --quick form" in md

    calls.clear()
    out = tmp_path / "full"
    assert mod.main(["--threads", "1", "--only", "register_e2e,register_e2e_full", "--out", str(out)]) == 0
    assert [Path(c[1]).name for c in calls] == ["register_e2e.py", "register_e2e.py"]
    assert "--grid" not in calls[0] and calls[1][-2:] == ["--grid", "160x192x224"]
    assert calls[1][calls[1].index("--out") + 1] == str(out / "register_e2e_em23")


def test_e2e_case_reads_the_case_key_and_parses_old_results() -> None:
    mod = _load("run_all")
    assert (
        mod._e2e_case({"case": "default model, grid 80×96×112", "model": "ONNX x.onnx", "grid": [1, 2, 3]})
        == "default model, grid 80×96×112"
    )
    # results written before register_e2e had "case": derived from the free-text model description
    old = {"model": "checkpoint emorph_deploy/weights/default.json", "grid": [80, 96, 112]}
    assert mod._e2e_case(old) == "default model, grid 80×96×112"
    old = {
        "model": "random init of em-23-hires (seed 0), flow head rescaled to flow RMS ≈ 2.0 voxels",
        "grid": [160, 192, 224],
    }
    assert mod._e2e_case(old) == "random-init em-23-hires, grid 160×192×224"
    assert mod._e2e_case({"model": "checkpoint runs/a.json", "grid": [8, 8, 8]}) == "runs/a.json, grid 8×8×8"


@pytest.mark.slow
def test_register_e2e_quick_writes_case(tmp_path: Path) -> None:
    mod = _load("register_e2e")
    out = tmp_path / "e2e"
    assert mod.main(["--quick", "--threads", "1", "--runs", "1", "--warmup", "0", "--out", str(out)]) == 0
    s = _result(out)["summary"]
    assert s["case"] == "random-init em-23-hires, grid 32×32×32"
    assert _load("run_all")._e2e_case(s) == s["case"]
    assert s["e2e_median_s"] > 0 and s["model_median_s"] > 0


# ---------------------------------------------------------------------------------------------- peers report
def test_comparison_sections_and_summary_vs_syn() -> None:
    """The report sections shared by peers.py and default_model_eval.py; the speed-up vs SyN goes to the
    methods ``vs_syn`` picks."""
    p = _load("peers")

    def row(pair, kind, method, sec, gm, jac):
        return {
            "pair": pair,
            "pair_kind": kind,
            "method": method,
            "ok": True,
            "seconds": sec,
            "dice_gm": gm,
            "dice_wm": 0.5,
            "dice_mean": (gm + 0.5) / 2,
            "frac_jac_nonpos": jac,
        }

    rows = [
        row("t0", "template", "ANTs SyN", 8.0, 0.7, 0.0),
        row("t0", "template", "default model", 0.5, 0.6, None),
        {"pair": "t0", "pair_kind": "template", "method": "greedy", "ok": False, "error": "RuntimeError: x"},
    ]
    by_kind = p._summary(rows, "ANTs SyN", vs_syn=lambda m: m.startswith("default model"))
    dm = by_kind["template"]["default model"]
    assert dm["speedup_vs_ants_syn"] == pytest.approx(16.0)
    assert dm["dice_minus_ants_syn"] == pytest.approx(-0.05)
    assert "speedup_vs_ants_syn" not in by_kind["template"]["ANTs SyN"] and "real" not in by_kind
    assert "speedup_vs_ants_syn" not in p._summary(rows)["template"]["default model"]  # default: "emorph"
    summary = {"by_kind": by_kind, "pairs": [{"name": "t0", "description": "d", "labels_method": "m"}]}
    lines = p.comparison_sections(
        summary,
        rows,
        {"template": "Templates", "real": "Real"},
        jac_first=True,
        speedup_header="speed-up vs SyN",
    )
    assert lines[:2] == ["## Templates", ""] and "## Real" not in lines
    assert lines[2].splitlines()[0] == (
        "| method | pairs | Dice GM | Dice WM | Dice mean | J ≤ 0 | seconds / pair | speed-up vs SyN |"
    )
    assert "| default model | 1 | 0.600 | 0.500 | 0.550 | - | 0.5 | 16.0 |" in lines[2]
    assert lines[4:6] == ["## Per pair", ""]
    assert "| t0 | greedy | - | - | - | - | RuntimeError: x |" in lines[6]
    assert lines[-1] == "- `t0`: d; labels: m."


def test_key_figures_name_both_matmul_peaks():
    """The summary states compute_bound's peak and the one model_latency judged the target against."""
    run_all = _load("run_all")
    results = {
        "compute_bound": {"summary": {"peak_gflops": 133.1, "bound_s": {"160×192×224": 4.81}}},
        "model_latency": {"summary": {"peak_gflops": 143.6, "grids": {}}},
    }
    lines = run_all.key_figures(results)
    assert any("matmul peak **133.1 GFLOP/s**" in ln for ln in lines)
    assert any("own matmul peak: **143.6 GFLOP/s**" in ln for ln in lines)


def test_run_all_partial_rerun_keeps_earlier_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--only re-runs some scripts; the others' existing results stay in the summary, labelled as earlier
    runs with their own run window, and a warning says the summary mixes runs."""
    mod = _load("run_all")
    calls = _fake_runs(mod, monkeypatch)
    out = tmp_path / "full"
    assert mod.main(["--threads", "1", "--only", "compute_bound,register_e2e", "--out", str(out)]) == 0
    stem = out / "register_e2e"
    old = {
        "summary": {},
        "started_utc": "2026-01-02T03:04:05+00:00",
        "finished_utc": "2026-01-02T03:09:00+00:00",
    }
    stem.with_suffix(".json").write_text(json.dumps(old))
    calls.clear()
    assert mod.main(["--threads", "1", "--only", "compute_bound", "--out", str(out), "--force"]) == 0
    assert [Path(c[1]).name for c in calls] == ["compute_bound.py"]
    summary = json.loads((out / "summary.json").read_text())
    runs = {r["name"]: r["status"] for r in summary["runs"]}
    assert runs == {"compute_bound": "ok", "register_e2e": "earlier run"}
    assert any("partial re-run" in w and "register_e2e" in w for w in summary["warnings"])
    md = (out / "summary.md").read_text()
    assert "| register_e2e | earlier run | 2026-01-02 03:04–03:09 |" in md


@pytest.mark.slow
def test_network_precision_quick_recovers_part_of_a_known_deformation(tmp_path: Path) -> None:
    mod = _load("network_precision")
    out = tmp_path / "np"
    assert mod.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    data = _result(out)
    rows = {r["mode"]: r for r in data["rows"]}
    assert set(rows) == {"network", "defaults"} and all(not r["real"] for r in rows.values())
    for r in rows.values():  # the packaged model moves the right way, by a fraction of the truth
        assert 0.3 < r["slope"] < 1.2 and 0 < r["epe_mm"] < r["true_mm"] and r["dice"] > r["dice_none"]
    assert rows["defaults"]["epe_mm"] < rows["network"]["epe_mm"]  # the refinement adds precision
    assert 0 <= rows["network"]["identity_mm"] < 2.0 and "identity_mm" not in rows["defaults"]
    means = {m["mode"]: m for m in data["summary"]["means"]}
    assert means["network"]["slope"] == pytest.approx(rows["network"]["slope"])
    # the training loss along α × the true flow: lowest at the whole displacement, none the worst
    profile = {e["alpha"]: e["loss"] for e in data["summary"]["loss_profile"]}
    assert set(profile) == set(mod.LOSS_SCALES) and min(profile, key=profile.get) == 1.0
    assert profile[0.0] > profile[0.5] > profile[1.0]
    assert "Training loss at a scaled true flow" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="--mm"):
        mod.main(["--quick", "--mm", "x", "--out", str(tmp_path / "bad")])


def test_network_precision_flow_figures() -> None:
    import numpy as np

    mod = _load("network_precision")
    true = np.zeros((3, 4, 4, 4), np.float32)
    true[0] = 2.0  # 2 voxels along axis 0
    inside = np.ones((4, 4, 4), bool)
    half = mod.flow_figures(true, 0.5 * true, inside, [2.0, 1.0, 1.0])
    assert half == pytest.approx({"slope": 0.5, "epe_mm": 2.0, "true_mm": 4.0})
    assert mod.flow_figures(true, true, inside, [1.0, 1.0, 1.0])["epe_mm"] == 0.0
