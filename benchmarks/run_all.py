"""Run every benchmark; collate ``<out>/summary.md`` (+ ``summary.json``): the issue-8 targets in one table.

Scripts (each in its own process, in this order): compute_bound, model_latency, memory, export_parity,
register_e2e, register_e2e_full (``register_e2e.py --grid 160x192x224`` → ``register_e2e_em23.json``: the
issue's full-resolution case), peers, default_model_eval (→ ``default_model.json``). Each writes
``<out>/<name>.json`` + ``.md``; a script that is missing or fails is reported in the summary (with its
last error line) and the others still run. Options a script does not have are not passed (read from its
``--help``); ``--quick`` maps to ``--size 32x32x32 --runs 2`` for scripts without ``--quick``, and skips
register_e2e_full (without its fixed grid it would repeat register_e2e).

Timing needs a quiet machine: the load average is recorded at the start and end of every script, and a full
run warns when the 1-minute load is ≥ 1.5 (``--require-quiet`` refuses to start instead).

    python benchmarks/run_all.py [--quick] [--threads 2] [--model CHECKPOINT] [--only a,b] [--skip c]
        [--out benchmarks/results] [--update-readme] [--force]
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

SCRIPTS = (
    "compute_bound",
    "model_latency",
    "memory",
    "export_parity",
    "register_e2e",
    "register_e2e_full",
    "peers",
    "default_model_eval",
)
#: results stem per script when it differs from the script name
OUT_NAME = {"default_model_eval": "default_model", "register_e2e_full": "register_e2e_em23"}
#: entries that run another script with fixed arguments (skipped by --quick): the full-resolution case
SCRIPT_FILE = {"register_e2e_full": "register_e2e"}
FIXED_ARGS = {"register_e2e_full": ["--grid", "160x192x224"]}
#: entries --quick does not run (reported as skipped, with the reason)
QUICK_SKIP = {
    "register_e2e_full": "the full-resolution case has no --quick form; register_e2e covers the pipeline"
}
#: the end-to-end results, full-resolution case first
E2E_SOURCES = ("register_e2e_full", "register_e2e")
#: scripts that take --model (a trained checkpoint); export_parity calls it --checkpoint
MODEL_FLAG = {
    "model_latency": "--model",
    "memory": "--model",
    "register_e2e": "--model",
    "peers": "--model",
    "export_parity": "--checkpoint",
    "compute_bound": "--checkpoint",
    "default_model_eval": "--model",
}
QUIET_LOAD = 1.5
README = C.BENCH_DIR / "README.md"
README_START, README_END = "<!-- latest-summary:start -->", "<!-- latest-summary:end -->"


def script_options(path: Path) -> set[str]:
    """The ``--options`` a script accepts (parsed from its --help; empty if it cannot run)."""
    try:
        out = subprocess.run(
            [sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout))


def build_command(name: str, path: Path, opts: set[str], args: Any, out_stem: Path) -> list[str]:
    cmd = [sys.executable, str(path)]
    if args.quick:
        if "--quick" in opts:
            cmd.append("--quick")
        elif "--size" in opts:
            cmd += ["--size", "32x32x32"]
            if "--runs" in opts:
                cmd += ["--runs", "2"]
    if "--threads" in opts:
        cmd += ["--threads", str(args.threads)]
    if args.runs is not None and "--runs" in opts and "--runs" not in cmd:
        cmd += ["--runs", str(args.runs)]
    if "--out" in opts:
        cmd += ["--out", str(out_stem)]
    if args.force and "--force" in opts:
        cmd.append("--force")
    cmd += FIXED_ARGS.get(name, [])  # (such entries are in QUICK_SKIP: never built with --quick)
    flag = MODEL_FLAG.get(name)
    if args.model and flag and flag in opts:
        cmd += [flag, args.model]
    cmd += list(args.extra.get(name, []))
    return cmd


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- collation
_PAIR_KIND = {"template": "template pairs", "real": "real pair"}


def _e2e_case(e2e: dict[str, Any]) -> str:
    """The end-to-end case, e.g. "default model, grid 80×96×112": register_e2e's ``case``; results written
    before it had one: derived from the model description and the grid."""
    if e2e.get("case"):
        return str(e2e["case"])
    model = str(e2e.get("model") or "model")
    model = "random-init em-23-hires" if model.startswith("random init of em-23-hires") else model
    model = model.replace("checkpoint ", "")
    model = "default model" if model.endswith("weights/default.json") else model
    return f"{model}, grid {C.fmt_size(e2e.get('grid') or [])}"


TARGET_COLUMNS = ("target", "measured", "goal", "met", "source")


def targets_table(results: dict[str, dict[str, Any] | None], quick: bool = False) -> list[list[str]]:
    """One row per issue-8 target: what, measured, goal, met, source (--quick: never judged)."""
    rows: list[list[str]] = []

    def met(v: bool | None) -> str:
        if quick:
            return "n/a (--quick)"
        return "n/a" if v is None else ("yes" if v else "**no**")

    ml = results.get("model_latency") or {}
    t = (ml.get("summary") or {}).get("targets")
    if t:
        rows.append(
            [
                f"fastest CPU path at {t['grid']} vs compute bound ({t['fastest_cpu']})",
                f"{C.fmt(t['x_bound'], '.2f')}× bound",
                "≤ 1.5×",
                met(t.get("x_bound_met")),
                "model_latency",
            ]
        )
        rows.append(
            [
                "fastest CPU path vs torch eager",
                f"{C.fmt(t['speedup'], '.2f')}×",
                "≥ 1.6×",
                met(t.get("speedup_met")),
                "model_latency",
            ]
        )
    else:
        rows.append(
            [
                "fastest CPU path vs bound / vs eager",
                "not measured",
                "≤ 1.5× / ≥ 1.6×",
                "n/a",
                "model_latency",
            ]
        )
    for source in E2E_SOURCES:
        e2e = (results.get(source) or {}).get("summary") or {}
        what = f"end-to-end register vs model forward ({_e2e_case(e2e) if e2e else source})"
        if e2e.get("e2e_over_model") is None:
            measured = "skipped (--quick)" if quick and source in QUICK_SKIP else "not measured"
            rows.append([what, measured, "≤ 1.3×", "n/a", source])
            continue
        goal = e2e.get("target_e2e_over_model", 1.3)
        rows.append(
            [
                what,
                f"{C.fmt(e2e['e2e_over_model'], '.2f')}× (without writing "
                f"{C.fmt(e2e.get('e2e_no_write_over_model'), '.2f')}×)",
                f"≤ {goal}×",
                met(e2e["e2e_over_model"] <= goal),
                source,
            ]
        )
    mem = ((results.get("memory") or {}).get("summary") or {}).get("target")
    if mem:
        rows.append(
            [
                f"inference peak RSS at {mem['grid']} ({mem['row']})",
                f"{mem['peak_gb']:.2f} GB",
                "≤ 3 GB",
                met(mem["met"]),
                "memory",
            ]
        )
    else:
        rows.append(["inference peak RSS", "not measured", "≤ 3 GB", "n/a", "memory"])
    peer_summary = (results.get("peers") or {}).get("summary") or {}
    # "targets" (one per kind of pair); older results carry a single "target"
    pts = peer_summary.get("targets") or ([peer_summary["target"]] if peer_summary.get("target") else [])
    for pt in pts:
        rows.append(
            [
                f"emorph register vs ANTs SyN ({_PAIR_KIND.get(pt['kind'], pt['kind'])})",
                f"{C.fmt(pt['speedup'], '.1f')}× faster",
                "≥ 20×",
                met(pt["met"]),
                "peers",
            ]
        )
    if not pts:
        rows.append(
            ["emorph register vs ANTs SyN", "not measured (no emorph model?)", "≥ 20×", "n/a", "peers"]
        )
    return rows


def key_figures(results: dict[str, dict[str, Any] | None]) -> list[str]:
    out: list[str] = []
    cb = (results.get("compute_bound") or {}).get("summary") or {}
    if cb.get("peak_gflops"):
        bounds = ", ".join(f"{g}: {s:.3g} s" for g, s in (cb.get("bound_s") or {}).items())
        out.append(f"- Compute bound: matmul peak **{cb['peak_gflops']:.1f} GFLOP/s**; bound {bounds}.")
    ml = (results.get("model_latency") or {}).get("summary") or {}
    if ml.get("peak_gflops"):  # the peak the target is judged against (the machine's peak drifts)
        out.append(
            f"- Model latency's own matmul peak: **{ml['peak_gflops']:.1f} GFLOP/s** (the × bound below and "
            "the compute-bound target use it; the peak drifts on a shared VM)."
        )
    for g, s in (ml.get("grids") or {}).items():
        out.append(
            f"- Model latency {g}: torch eager {C.fmt(s.get('torch_eager_median_s'), '.3g')} s; fastest CPU "
            f"`{s.get('fastest_cpu')}` {C.fmt(s.get('fastest_cpu_median_s'), '.3g')} s = "
            f"{C.fmt(s.get('fastest_x_bound'), '.2f')}× bound, "
            f"{C.fmt(s.get('fastest_speedup_vs_eager'), '.2f')}× eager."
        )
    mem = (results.get("memory") or {}).get("summary") or {}
    if mem.get("infer_peak_rss_gb"):
        out.append(
            "- Peak RSS: "
            + ", ".join(f"{k} {v:.2f} GB" for k, v in mem["infer_peak_rss_gb"].items())
            + (
                f"; training step {mem['train_step_peak_rss_gb']:.2f} GB"
                if mem.get("train_step_peak_rss_gb")
                else ""
            )
            + "."
        )
    ep = results.get("export_parity") or {}
    for r in ep.get("rows") or []:
        if "max_dflow_voxel" in r:
            out.append(
                f"- Export parity {r.get('backend')} ({r.get('grid_sample')}): max |Δflow| "
                f"{r['max_dflow_voxel']:.2g} vox, median {r.get('latency_median_s', float('nan')):.3g} s."
            )
    for source in E2E_SOURCES:
        e2e = (results.get(source) or {}).get("summary") or {}
        if e2e.get("e2e_median_s"):
            out.append(
                f"- register end to end ({_e2e_case(e2e)}): {e2e['e2e_median_s']:.3g} s "
                f"(model {C.fmt(e2e.get('model_median_s'), '.3g')} s) on {e2e.get('backend')}."
            )
    peers = ((results.get("peers") or {}).get("summary") or {}).get("by_kind") or {}
    for kind, ms in peers.items():
        if ms:
            out.append(
                f"- Peers ({kind}): "
                + "; ".join(f"{m} Dice {v['dice_mean']:.3f} in {v['seconds']:.3g} s" for m, v in ms.items())
                + "."
            )
    return out


def _run_window(result: dict[str, Any] | None) -> str:
    """``YYYY-MM-DD HH:MM–HH:MM`` of a script's own run (from its JSON), or "-"."""
    start, end = (result or {}).get("started_utc"), (result or {}).get("finished_utc")
    if not start:
        return "-"
    return f"{start[:10]} {start[11:16]}–{end[11:16] if end else '?'}"


def summary_markdown(summary: dict[str, Any], results: dict[str, dict[str, Any] | None]) -> str:
    runs = summary["runs"]
    status = C.md_table(
        ["script", "status", "run (UTC)", "seconds", "load avg start → end", "results"],
        [
            [
                r["name"],
                r["status"],
                _run_window(results.get(r["name"])),
                C.fmt(r.get("seconds"), ".0f"),
                f"{C.fmt((r.get('load_start') or [None])[0], '.2f')} → "
                f"{C.fmt((r.get('load_end') or [None])[0], '.2f')}",
                f"[{Path(r['out']).name}.md]({Path(r['out']).name}.md)"
                if r["status"] in ("ok", "earlier run")
                else (r.get("error") or r.get("reason") or ""),
            ]
            for r in runs
        ],
    )
    body = [
        "## Targets (issue 8)",
        "",
        C.md_table(list(TARGET_COLUMNS), [[t[k] for k in TARGET_COLUMNS] for t in summary["targets"]]),
        "",
        "## Key figures",
        "",
        *key_figures(results),
        "",
        "## Scripts",
        "",
        status,
        "",
    ]
    if summary.get("warnings"):
        body += ["Warnings:", "", *[f"- {w}" for w in summary["warnings"]], ""]
    res = {
        "command": summary["command"],
        "started_utc": summary["started_utc"],
        "finished_utc": summary["finished_utc"],
        "machine": summary["machine"],
        "quick": summary["quick"],
        "notes": summary.get("notes", []),
        "summary": summary,
    }
    return C.markdown_document(res, "Benchmark summary", "\n".join(body))


def update_readme(summary_md: str) -> bool:
    """Replace the block between the markers in benchmarks/README.md with the summary (minus its title)."""
    if not README.is_file():
        return False
    text = README.read_text()
    if README_START not in text or README_END not in text:
        return False
    inner = "\n".join(summary_md.splitlines()[1:]).strip()
    inner = re.sub(r"^## ", "### ", inner, flags=re.M)
    inner = re.sub(r"\]\(([A-Za-z0-9_.-]+\.md)\)", r"](results/\1)", inner)
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    from emorph_deploy.fileio import write_bytes_atomic

    write_bytes_atomic(
        README, (head + README_START + "\n" + inner + "\n" + README_END + tail).encode(), force=True
    )
    return True


def main(argv: list[str] | None = None) -> int:
    ap = C.base_parser(__doc__.split("\n\n")[0])
    ap.set_defaults(runs=None)
    ap.add_argument("--model", default=None, help="trained checkpoint passed to every script that takes one")
    ap.add_argument("--only", default=None, help=f"comma list of scripts to run (of {', '.join(SCRIPTS)})")
    ap.add_argument("--skip", default=None, help="comma list of scripts to skip")
    ap.add_argument(
        "--collate-only", action="store_true", help="do not run anything: collate existing results"
    )
    ap.add_argument(
        "--require-quiet",
        action="store_true",
        help=f"refuse a full run when the 1-minute load average is ≥ {QUIET_LOAD}",
    )
    ap.add_argument(
        "--update-readme",
        action="store_true",
        help="put the summary into benchmarks/README.md between its markers",
    )
    ap.add_argument("--timeout", type=float, default=6 * 3600.0, help="seconds per script")
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        help="extra arguments for one script: NAME='--opt value ...' (repeatable)",
    )
    args = ap.parse_args(argv)
    runs_given = args.runs
    args = C.finish_args(args, "summary")
    args.runs = runs_given  # only passed on when given
    out_dir = Path(args.out).parent if Path(args.out).name == "summary" else Path(args.out)
    extra: dict[str, list[str]] = {}
    for e in args.extra:
        name, _, rest = e.partition("=")
        extra.setdefault(name.strip(), []).extend(rest.split())
    args.extra = extra
    only = [s.strip() for s in args.only.split(",")] if args.only else list(SCRIPTS)
    skip = {s.strip() for s in args.skip.split(",")} if args.skip else set()
    unknown = [s for s in [*only, *skip] if s not in SCRIPTS]
    if unknown:
        raise SystemExit(f"unknown scripts {unknown}; expected some of {list(SCRIPTS)}")
    selected = [s for s in SCRIPTS if s in only and s not in skip]
    if not args.collate_only:
        C.check_outputs_writable(out_dir / "summary", args.force)

    warnings: list[str] = []
    load = C.load_avg()
    if not args.quick and load and load[0] >= QUIET_LOAD:
        msg = (
            f"1-minute load average {load[0]:.2f} ≥ {QUIET_LOAD} at the start: other work is running, "
            "timings "
            "will be pessimistic and noisy"
        )
        if args.require_quiet and not args.collate_only:
            raise SystemExit(f"error: {msg}; fix: wait for a quiet machine or drop --require-quiet")
        warnings.append(msg)
        C.log("warning: " + msg)

    started = C.utc_now()
    runs: list[dict[str, Any]] = []
    for name in selected:
        path = C.BENCH_DIR / f"{SCRIPT_FILE.get(name, name)}.py"
        stem = out_dir / OUT_NAME.get(name, name)
        rec: dict[str, Any] = {"name": name, "out": str(stem)}
        if args.quick and name in QUICK_SKIP:
            rec.update(status="skipped", reason=QUICK_SKIP[name])
            runs.append(rec)
            continue
        if args.collate_only:
            rec["status"] = "ok" if stem.with_suffix(".json").is_file() else "no results"
            runs.append(rec)
            continue
        if not path.is_file():
            rec.update(status="missing", error=f"{path.name} does not exist yet")
            runs.append(rec)
            continue
        opts = script_options(path)
        cmd = build_command(name, path, opts, args, stem)
        rec["command"] = " ".join(cmd[1:])
        rec["load_start"] = C.load_avg()
        C.log(f"== {name}: {rec['command']}")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd,
                stdout=subprocess.PIPE,
                stderr=None,
                text=True,
                timeout=args.timeout,
                env={**__import__("os").environ, **C.thread_env(args.threads)},
            )
            rc, out_text = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired:
            rc, out_text = -1, ""
        rec["seconds"] = time.perf_counter() - t0
        rec["load_end"] = C.load_avg()
        if rc == 0 and stem.with_suffix(".json").is_file():
            rec["status"] = "ok"
        else:
            rec["status"] = "failed" if rc != 0 else "no results"
            lines = [ln for ln in (out_text or "").splitlines() if ln.strip()]
            rec["error"] = f"exit {rc}" + (f": {lines[-1][:200]}" if lines else "")
        C.log(f"== {name}: {rec['status']} in {rec['seconds']:.0f} s")
        runs.append(rec)

    if args.only and not args.collate_only:  # a partial re-run: the other scripts' results stand, labelled
        earlier = []
        for name in SCRIPTS:
            stem = out_dir / OUT_NAME.get(name, name)
            if name in selected or not stem.with_suffix(".json").is_file():
                continue
            prev = _load(stem.with_suffix(".json"))
            if prev is None or bool(prev.get("quick")) != bool(args.quick):
                continue
            runs.append({"name": name, "out": str(stem), "status": "earlier run"})
            earlier.append(name)
        if earlier:
            warnings.append(
                f"partial re-run: {', '.join(selected)} ran now; {', '.join(earlier)} are the results of "
                "their earlier runs (each script's run window is in the Scripts table)"
            )
    results = {
        r["name"]: None if r["status"] == "skipped" else _load(Path(r["out"]).with_suffix(".json"))
        for r in runs
    }
    for name, r in results.items():
        if r and "quick" in r and r["quick"] != args.quick:
            warnings.append(f"{name}.json is a {'--quick' if r.get('quick') else 'full'} result")
    summary = {
        "schema": C.SCHEMA,
        "benchmark": "summary",
        "quick": args.quick,
        "command": C.command_line(argv),
        "started_utc": started,
        "finished_utc": C.utc_now(),
        "machine": C.machine_info(args.threads),
        "params": {k: v for k, v in vars(args).items() if k != "extra"},
        "runs": runs,
        "targets": [
            dict(zip(TARGET_COLUMNS, row, strict=True)) for row in targets_table(results, args.quick)
        ],
        "warnings": warnings,
        "notes": [],
        "rows": [],
        "summary": {},
    }
    summary["machine"]["load_avg_start"] = load
    md = summary_markdown(summary, results)
    paths = C.write_results(summary, out_dir / "summary", md, force=True if args.collate_only else args.force)
    print(md)
    C.log(f"wrote {paths[0]} and {paths[1]}")
    if args.update_readme and not args.quick:
        C.log("README updated" if update_readme(md) else "README markers not found: not updated")
    failed = [r["name"] for r in runs if r["status"] not in ("ok", "skipped", "earlier run")]
    return 1 if failed and not args.collate_only else 0


if __name__ == "__main__":
    raise SystemExit(main())
