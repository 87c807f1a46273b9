"""Registration defaults chosen by measurement: which checkpoint, and how many refinement steps fit ~1 s.

For every pair of the validation suite (the offline real brains of :mod:`emorph_deploy.data.realbrains`,
unordered, each in the same contrast and with the moving contrast inverted; plus ``--synthetic N`` held-out
SynthMorph-style pairs per contrast relation and ``--deformed N`` known smooth deformations of each real
brain, as ``benchmarks/validation_suite.py`` builds them; only the distinct-brain pairs decide the pick) the
stages that do not depend on the choice run **once**: the images are read, the affine pre-alignment is fitted
and both images are resampled onto the model grid. Then, for each model of ``--models``, the network runs once
and every refinement setting of ``--settings`` starts from its flow; refinement from a zero flow (no network)
runs the same settings once per pair. So every row of a pair sees the same pre-aligned inputs, and the
comparison between models and step counts is paired.

Settings: ``N`` = N Adam steps at half resolution (the default style, ``levels=2, full_steps=0``),
``N+K`` = N half-resolution steps then K full-resolution ones; ``~W`` sets the folding penalty's weight
(otherwise the library default, ``RegistrationDefaults.refine_fold_weight``), ``^S`` the gradient
smoothing in voxels (otherwise ``RegistrationDefaults.refine_grad_sigma``); a last suffix ``@ncc``,
``@ngf`` or ``@mind`` fixes the similarity, which is otherwise ``auto`` (NCC when the contrasts agree, NGF
otherwise), as ``emorph register`` uses it. ``--settings 0,10,10@ncc,10@ngf,10@mind`` compares the
similarities, ``--settings 10~0,10~10,10+2~10`` the folding penalty, ``--settings 5+2^0,5+2^0.7`` the
gradient smoothing.

Dice: the moving labels warped (nearest) onto the fixed native grid, as ``benchmarks/validation_suite.py``
scores them (real brains: mean of GM and WM; synthetic: mean over their labels).

Time: a separate timing pass on the first real pair of each contrast (``auto``: same → NCC, inverted → NGF):
the wall-clock median of ``--runs`` calls after ``--warmup`` of the network and of each refinement setting,
in this process with ``--threads`` threads. Only a quiet machine gives meaningful seconds: the load average
is recorded with each timing row (run it when no training campaign shares the cores). The pick: the setting
with the best mean Dice over the real pairs (both contrasts) whose network + refinement time (the slower of
the two similarities) is within ``--budget-s`` (default 1.0 s).

    python benchmarks/validation_suite.py ...      # the full table with ANTs SyN and greedy
    python benchmarks/default_settings.py --models A.json,B.json \
        [--settings 0,10,20,40,60,20+5] [--budget-s 1.0] [--synthetic 4] [--deformed 2] [--threads 2]
    python benchmarks/default_settings.py --quick   # tiny untrained model, ~6 mm: checks the script only

Writes ``benchmarks/results/default_settings.{json,md}``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import peers as P
import validation_suite as VS

NAME = "default_settings"
ZERO = "zero flow (no network)"


# ---------------------------------------------------------------------------------------------- settings
class Setting(NamedTuple):
    """One refinement setting: half-resolution steps, full-resolution steps, the similarity, the folding
    penalty's weight, the gradient smoothing and Adam's step size (None = the library defaults)."""

    half: int
    full: int = 0
    similarity: str = "auto"
    fold: float | None = None
    sigma: float | None = None
    lr: float | None = None

    @property
    def name(self) -> str:
        return setting_name(self.half, self.full, self.similarity, self.fold, self.sigma, self.lr)


def parse_settings(text: str) -> list[Setting]:
    """``"0,20,20+5~10^0.7%0.3@ngf"`` → ``[Setting(0, 0), Setting(20, 0), Setting(20, 5, "ngf", 10.0, 0.7,
    0.3)]``."""
    from emorph_deploy.choices import Similarity
    from emorph_deploy.registration.defaults import MAX_GRAD_SIGMA

    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        rest, _, sim = item.partition("@")
        rest, percent, lr = rest.partition("%")
        rest, caret, sigma = rest.partition("^")
        steps, tilde, fold = rest.partition("~")
        half, _, full = steps.partition("+")
        try:
            setting = Setting(
                int(half),
                int(full or 0),
                Similarity(sim or "auto").value,
                float(fold) if tilde else None,
                float(sigma) if caret else None,
                float(lr) if percent else None,
            )
        except ValueError:
            raise SystemExit(
                f"--settings: expected N, N+K, then optionally ~WEIGHT, ^SIGMA, %LR and @SIMILARITY (one of "
                f"{', '.join(m.value for m in Similarity)}), got {item!r}"
            ) from None
        bad_fold = setting.fold is not None and not 0 <= setting.fold < float("inf")
        bad_sigma = setting.sigma is not None and not 0 <= setting.sigma <= MAX_GRAD_SIGMA
        bad_lr = setting.lr is not None and not 0 < setting.lr < float("inf")
        if (
            setting.half < 0
            or setting.full < 0
            or bad_fold
            or bad_sigma
            or bad_lr
            or (setting.half == 0 and (setting.full or sim or tilde or caret or percent))
        ):
            raise SystemExit(
                f"--settings: expected N >= 0, K >= 0, a weight >= 0, a sigma in [0, {MAX_GRAD_SIGMA:g}] and "
                f"an lr > 0 (K, ~W, ^S, %LR and @SIMILARITY only with N > 0), got {item!r}"
            )
        out.append(setting)
    if not out:
        raise SystemExit("--settings: expected at least one setting, e.g. 0,20,40")
    return out


def setting_name(
    half: int,
    full: int,
    similarity: str = "auto",
    fold: float | None = None,
    sigma: float | None = None,
    lr: float | None = None,
) -> str:
    if half == 0:
        return "network alone"
    name = f"{half} half" + (f" + {full} full" if full else "")
    name += "" if fold is None else f", fold {fold:g}"
    name += "" if sigma is None else f", σ {sigma:g}"
    name += "" if lr is None else f", lr {lr:g}"
    return name if similarity == "auto" else f"{name} @{similarity}"


@contextlib.contextmanager
def clock(into: dict[str, float], name: str) -> Iterator[None]:
    """``into[name]`` = wall seconds of the block."""
    w0 = time.perf_counter()
    try:
        yield
    finally:
        into[name] = time.perf_counter() - w0


def median_wall(fn: Any, runs: int, warmup: int) -> float:
    """Median wall seconds of ``runs`` calls of ``fn()`` after ``warmup`` calls."""
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------- one pair
def prepare(reg: Any, pair: dict[str, Any]) -> dict[str, Any]:
    """Read the pair, fit the affine, resample onto the model grid: the choice-independent stages."""
    import numpy as np

    from emorph_deploy.registration.pipeline import load_inputs

    t: dict[str, float] = {}
    fixed_img, moving_img, labels_img = load_inputs(pair["fixed"], pair["moving"], pair["moving_labels"])
    f_data, f_aff = np.asanyarray(fixed_img.dataobj), np.asarray(fixed_img.affine, dtype=np.float64)
    m_data, m_aff = np.asanyarray(moving_img.dataobj), np.asarray(moving_img.affine, dtype=np.float64)
    with clock(t, "affine"):
        pre, _ = reg._prealign(f_data, f_aff, m_data, m_aff, {}, None)  # no masks, no initial affine
    with clock(t, "resample"):
        grid_pair = reg._to_model_grid(fixed_img, f_data, f_aff, m_data, m_aff, pre)
    return {
        "f_shape": f_data.shape,
        "f_aff": f_aff,
        "m_data": m_data,
        "m_aff": m_aff,
        "pre": pre,
        "labels": np.asanyarray(labels_img.dataobj),
        "labels_aff": labels_img.affine,
        "grid": grid_pair,
        "times": t,
    }


def score_flow(prep: dict[str, Any], flow: Any, fixed_labels: Any, tissue: bool) -> dict[str, float]:
    """Dice of the moving labels warped onto the fixed grid by ``flow`` (3, D, H, W); J ≤ 0 (model grid)."""
    from emorph_deploy.qc import jacobian_determinant_fast
    from emorph_deploy.registration.native import warp_to_native

    nw = warp_to_native(
        flow,
        prep["grid"].affine,
        prep["f_shape"],
        prep["f_aff"],
        prep["m_data"],
        prep["m_aff"],
        pre_affine=prep["pre"],
        labels=prep["labels"],
        labels_affine=prep["labels_aff"],
    )
    import numpy as np

    out = VS.score(np.rint(nw.warped_labels).astype(np.int32), fixed_labels, tissue=tissue)
    out["frac_jac_nonpos"] = float((jacobian_determinant_fast(flow) <= 0).mean())
    return out


def starts_of(regs: dict[str, Any], prep: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Per model: (registrar, the network's flow); plus the zero flow (no network)."""
    import numpy as np

    out = {}
    for name, reg in regs.items():
        flow_out, _ = reg._infer(prep["grid"], True)
        out[name] = (reg, reg._checked_flow(flow_out))
    first = next(iter(regs.values()))
    out[ZERO] = (first, np.zeros((3, *first.grid_shape), dtype=np.float32))
    return out


def cases(starts: dict[str, tuple[Any, Any]], settings: list[Setting]) -> Iterator[tuple]:
    """(start name, registrar, initial flow, setting) for every row of a pair; the zero flow without
    refinement is skipped (= the affine alone: validation_suite's "affine" row)."""
    for name, (reg, flow0) in starts.items():
        for setting in settings:
            if not (name == ZERO and setting.half == 0):
                yield name, reg, flow0, setting


def refined(reg: Any, prep: dict[str, Any], flow0: Any, setting: Setting, info: dict[str, Any]) -> Any:
    from emorph_deploy.refine import RefineConfig

    if not setting.half:
        return flow0
    extra: dict[str, float] = {} if setting.fold is None else {"fold_weight": setting.fold}
    if setting.sigma is not None:
        extra["grad_sigma"] = setting.sigma
    if setting.lr is not None:
        extra["lr"] = setting.lr
    config = RefineConfig(steps=setting.half, full_steps=setting.full, similarity=setting.similarity, **extra)
    return reg._refine(prep["grid"], flow0, config, info)


def run_pair(
    regs: dict[str, Any], pair: dict[str, Any], settings: list[Setting], threads: int
) -> list[dict[str, Any]]:
    """Dice rows for one pair: per model (and the zero flow) × setting."""
    first = next(iter(regs.values()))
    prep = prepare(first, pair)
    fixed_labels = P._labels_array(pair["fixed_labels"])
    tissue = pair.get("tissue", True)
    base = {
        "pair": pair["name"],
        "group": pair["group"],
        "threads": threads,
        "affine_s": prep["times"]["affine"],
        "resample_s": prep["times"]["resample"],
    }
    rows = []
    for name, reg, flow0, setting in cases(starts_of(regs, prep), settings):
        info: dict[str, Any] = {}
        flow = refined(reg, prep, flow0, setting, info)
        row = {
            **base,
            "model": name,
            "setting": setting.name,
            "half_steps": setting.half,
            "full_steps": setting.full,
            "similarity": info.get("similarity"),
            "similarity_requested": info.get("similarity_requested"),
            **score_flow(prep, flow, fixed_labels, tissue),
        }
        rows.append(row)
        C.log(f"[{pair['name']}] {name} · {row['setting']}: Dice {row['dice']:.3f}, sim {row['similarity']}")
    return rows


def time_pair(
    regs: dict[str, Any], pair: dict[str, Any], settings: list[Setting], args: Any
) -> list[dict[str, Any]]:
    """Timing rows for one pair: wall-clock medians of the network and of each refinement setting."""
    first = next(iter(regs.values()))
    prep = prepare(first, pair)
    rows = []
    net_s = {
        name: median_wall(functools.partial(reg._infer, prep["grid"], True), args.runs, args.warmup)
        for name, reg in regs.items()
    }
    net_s[ZERO] = 0.0
    for name, reg, flow0, setting in cases(starts_of(regs, prep), settings):
        info: dict[str, Any] = {}
        ref_s = 0.0
        if setting.half:
            ref_s = median_wall(
                functools.partial(refined, reg, prep, flow0, setting, info), args.runs, args.warmup
            )
        rows.append(
            {
                "pair": pair["name"],
                "group": pair["group"],
                "model": name,
                "setting": setting.name,
                "similarity": info.get("similarity"),
                "network_s": net_s[name],
                "refine_s": ref_s,
                "seconds": net_s[name] + ref_s,
                "threads": args.threads,
                "load_avg": C.load_avg(),
            }
        )
        C.log(f"[timing {pair['name']}] {name} · {rows[-1]['setting']}: {rows[-1]['seconds']:.3f} s")
    return rows


def time_register(reg: Any, pair: dict[str, Any], args: Any) -> dict[str, Any]:
    """Wall-clock median of a whole in-process ``Registrar.register`` call with the library defaults
    (affine pre-alignment, the default refinement) on ``pair``, images already in memory, and its stages."""
    import nibabel as nib

    from emorph_deploy.registration.defaults import DEFAULTS

    imgs = [nib.load(str(pair[k])) for k in ("fixed", "moving", "moving_labels")]
    for img in imgs:
        img.get_fdata()  # decode once: the call is timed, not the gzip
    stages: list[dict[str, float]] = []
    secs = median_wall(
        lambda: stages.append(reg.register(*imgs, validate=False).qc["times_s"]), args.runs, args.warmup
    )
    last = stages[-1]
    C.log(f"[register {pair['name']}] defaults: {secs:.3f} s")
    return {
        "pair": pair["name"],
        "seconds": secs,
        "stages_s": {k: round(v, 4) for k, v in last.items()},
        "affine": DEFAULTS.affine,
        "refine_steps": DEFAULTS.refine_steps,
        "refine_full_steps": DEFAULTS.refine_full_steps,
        "refine_fold_weight": DEFAULTS.refine_fold_weight,
        "refine_grad_sigma": DEFAULTS.refine_grad_sigma,
        "load_avg": C.load_avg(),
    }


# ---------------------------------------------------------------------------------------------- summary
REAL = ("same", "inverted")


def summarise(
    rows: list[dict[str, Any]], timing: list[dict[str, Any]], budget_s: float, max_fold: float = 1e-3
) -> dict[str, Any]:
    """Mean Dice per (model, setting) and group, its seconds (the slowest timing pair's median), and the
    pick per model: the best real-pair Dice within ``budget_s`` whose worst pair folds (J ≤ 0) less than
    ``max_fold`` of the voxels."""
    keys = list(dict.fromkeys((r["model"], r["setting"]) for r in rows))
    groups = list(dict.fromkeys(r["group"] for r in rows))
    table = []
    for model, setting in keys:
        sel = [r for r in rows if r["model"] == model and r["setting"] == setting]
        entry: dict[str, Any] = {"model": model, "setting": setting}
        for g in groups:
            gs = [r["dice"] for r in sel if r["group"] == g]
            entry[f"dice_{g}"] = statistics.fmean(gs) if gs else None
        real = [r for r in sel if r["group"] in REAL]
        entry["dice_real"] = statistics.fmean(r["dice"] for r in real) if real else None
        ts = [t["seconds"] for t in timing if t["model"] == model and t["setting"] == setting]
        entry["seconds"] = max(ts) if ts else None
        entry["frac_jac_nonpos"] = max(r["frac_jac_nonpos"] for r in sel)
        entry["half_steps"], entry["full_steps"] = sel[0]["half_steps"], sel[0]["full_steps"]
        table.append(entry)
    picks = {}
    for model in dict.fromkeys(e["model"] for e in table):
        ok = [
            e
            for e in table
            if e["model"] == model
            and e["seconds"] is not None
            and e["seconds"] <= budget_s
            and e["frac_jac_nonpos"] < max_fold
            and e["dice_real"] is not None
        ]
        if ok:
            best = max(ok, key=lambda e: e["dice_real"])
            keep = ("setting", "half_steps", "full_steps", "dice_real", "seconds")
            picks[model] = {k: best[k] for k in keep}
    return {"table": table, "groups": groups, "picks": picks, "budget_s": budget_s, "max_fold": max_fold}


def render(res: dict[str, Any]) -> str:
    s = res["summary"]
    groups = s["groups"]
    head = ["model", "setting", *[f"Dice {g}" for g in groups], "Dice real (mean)", "seconds", "J ≤ 0"]
    body_rows = [
        [
            e["model"],
            e["setting"],
            *[C.fmt(e.get(f"dice_{g}"), ".3f") for g in groups],
            C.fmt(e["dice_real"], ".3f"),
            C.fmt(e["seconds"], ".2f"),
            C.fmt(e["frac_jac_nonpos"], ".2g"),
        ]
        for e in s["table"]
    ]
    body = [
        f"Models: {', '.join(f'`{m}`' for m in s['models'])}. Pairs: {s.get('pair_rule', '-')}"
        + (f" + {s['deformed_pairs']} known deformations of real brains" if s.get("deformed_pairs") else "")
        + (f" + {s['synthetic_pairs']} held-out synthetic pairs" if s.get("synthetic_pairs") else "")
        + ".",
        "",
        f"Seconds: network + refinement, wall-clock medians on {s.get('timing_pairs') or '-'} (the slower "
        f"of them), load average {s.get('timing_load') or '-'} during the timing pass. Per-pair stages run "
        f"once (medians over pairs, loaded machine): affine {C.fmt(s.get('affine_s'), '.2f')} s, resample "
        f"{C.fmt(s.get('resample_s'), '.2f')} s.",
        "",
        "## Mean Dice per group (real brains: GM/WM; synthetic: their labels)",
        "",
        C.md_table(head, body_rows),
        "",
        f"## Pick: best real-pair Dice with network + refinement ≤ {s['budget_s']:.2g} s and J ≤ 0 below "
        f"{100 * s['max_fold']:.2g} % of the voxels on every pair",
        "",
    ]
    for r in s.get("register", []):
        body.append(
            f"- whole `Registrar.register` with the library defaults (affine on, refine "
            f"{setting_name(r['refine_steps'], r.get('refine_full_steps') or 0)}, fold weight "
            f"{r.get('refine_fold_weight', 0):g}, gradient σ {r.get('refine_grad_sigma', 0):g}; last model) "
            f"on {r['pair']}: **{r['seconds']:.2f} s** "
            "(stages of the last call: "
            + ", ".join(f"{k} {v:.2f}" for k, v in r["stages_s"].items() if k != "total")
            + ")"
        )
    for model, p in s["picks"].items():
        body.append(f"- `{model}`: **{p['setting']}** (Dice {p['dice_real']:.3f}, {p['seconds']:.2f} s)")
    return C.markdown_document(res, "Registration defaults by measurement", "\n".join(body))


def reuse_rows(path: str, models: list[str], settings: list[Setting]) -> list[dict[str, Any]]:
    """The Dice rows of an earlier result, checked to cover these models and settings."""
    import json

    rows = [r for r in json.loads(Path(path).read_text())["rows"] if "dice" in r]
    want = {(m, st.name) for m in models for st in settings} | {(ZERO, st.name) for st in settings if st.half}
    have = {(r["model"], r["setting"]) for r in rows}
    if want - have:
        raise SystemExit(f"--rows-from {path}: expected rows for {sorted(want - have)}; fix: same --models")
    return [r for r in rows if (r["model"], r["setting"]) in want]


# ---------------------------------------------------------------------------------------------- main
def open_models(args: Any, work: Path) -> dict[str, Any]:
    """Registrars by name: ``--models`` items are ``PATH`` or ``NAME=PATH``; none = the packaged model."""
    regs = {}
    for item in args.models or [None]:
        name, _, path = (item or "").rpartition("=")
        args.model = path or None
        reg, label = P.open_registrar(args, work)
        if reg is None:
            raise SystemExit(f"error: {label}; fix: pass --models CHECKPOINT[,NAME=CHECKPOINT]")
        regs[name or path or "packaged default"] = reg
    grids = {(r.grid_shape, r.preprocessing.spacing_mm) for r in regs.values()}
    if len(grids) > 1:
        raise SystemExit(f"--models: expected one model grid and spacing (paired rows), got {sorted(grids)}")
    return regs


def main(argv: list[str] | None = None) -> int:
    ap = C.base_parser(__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models",
        default=None,
        help="comma list of checkpoints, each PATH or NAME=PATH (default: the packaged model)",
    )
    ap.add_argument(
        "--settings",
        default="0,10,20,40,60,20+5",
        help="refinement: N or N+K, optionally ~FOLD_WEIGHT, ^GRAD_SIGMA, %%LR and @ncc/@ngf/@mind (default "
        "auto), comma list",
    )
    ap.add_argument("--backend", default="torch", help="Registrar backend (auto|torch|onnxruntime|openvino)")
    ap.add_argument("--budget-s", type=float, default=1.0, help="network + refinement time budget (s)")
    ap.add_argument("--max-fold", type=float, default=1e-3, help="pick: worst-pair fraction J <= 0 below")
    ap.add_argument("--subjects", default=None, help="comma list of realbrains subjects (default all)")
    ap.add_argument("--contrasts", default="same,inverted", help="comma list of same, inverted")
    ap.add_argument(
        "--rows-from",
        default=None,
        help="take the Dice rows from this earlier result JSON (same --models/--settings); time only",
    )
    ap.add_argument("--synthetic", type=int, default=None, help="held-out synthetic pairs per relation (4)")
    ap.add_argument(
        "--deformed",
        type=int,
        default=0,
        help=f"known smooth deformations per real subject, 0..{len(VS.DEFORMED_MM)} (default 0 = none)",
    )
    args = ap.parse_args(argv)
    VS.check_deformed_count(args.deformed)
    args.models = [m.strip() for m in args.models.split(",")] if args.models else None
    args.unordered = True
    if args.synthetic is None:
        args.synthetic = 1 if args.quick else 4
    args.runs = args.runs or 3
    args = C.finish_args(args, NAME)
    settings = parse_settings(args.settings)
    args._quick_shape = (32, 40, 48)
    C.check_outputs_writable(args.out, args.force)

    import torch

    torch.set_num_threads(args.threads)
    res = C.new_result(NAME, args, argv)
    s = res["summary"]
    s["skipped"] = {}
    with tempfile.TemporaryDirectory(prefix="emorph-defaults-") as tmp:
        work = Path(tmp)
        pairs = VS.real_pairs(args, work, res)
        synth = VS.synthetic_pairs(work, res, args.synthetic) if args.synthetic > 0 else []
        s["synthetic_pairs"] = len(synth)
        # scored like the real pairs, kept out of the pick (REAL)
        deformed = VS.deformed_pairs(args, work, res, args.deformed) if args.deformed > 0 else []
        s["deformed_pairs"] = len(deformed)
        regs = open_models(args, work)
        s["models"] = list(regs)
        if args.rows_from:  # the Dice rows of an earlier run (same models and settings): re-time only
            res["rows"] = reuse_rows(args.rows_from, list(regs), settings)
            s["rows_from"] = args.rows_from
        for pair in [] if args.rows_from else pairs + deformed + synth:
            try:
                res["rows"] += run_pair(regs, pair, settings, args.threads)
            except Exception as exc:
                msg = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                res["rows"].append({"pair": pair["name"], "group": pair["group"], "ok": False, "error": msg})
                C.log(f"[{pair['name']}] FAILED {msg}")
        timed = [
            next(p for p in pairs if p["group"] == g) for g in REAL if any(p["group"] == g for p in pairs)
        ]
        loads = []
        for pair in timed:
            loads.append(C.load_avg())
            s["timing"] = s.get("timing", []) + time_pair(regs, pair, settings, args)
            last_reg = list(regs.values())[-1]
            s["register"] = [*s.get("register", []), time_register(last_reg, pair, args)]
    ok = [r for r in res["rows"] if "dice" in r]
    s.update(summarise(ok, s.get("timing", []), args.budget_s, args.max_fold))
    s["models"] = list(regs)
    s["timing_pairs"] = ", ".join(p["name"] for p in timed)
    s["timing_load"] = ", ".join(f"{x[0]:.2f}" for x in loads if x)
    s["affine_s"] = statistics.median(r["affine_s"] for r in ok) if ok else None
    s["resample_s"] = statistics.median(r["resample_s"] for r in ok) if ok else None
    res["notes"] += [
        "Each pair's affine fit and model-grid resampling run once; every row of the pair starts from them, "
        "so differences between rows are the network and the refinement only.",
        f"Timing: median of {args.runs} calls after {args.warmup} warm-up, {args.threads} threads; the "
        "1-minute load average before each timing pair is in the summary (a value near 0 means quiet).",
    ]
    C.publish(res, render, args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
