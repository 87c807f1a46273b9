"""Compute bound of the model on this CPU: measured fp32 matmul peak vs the model's FLOP count.

* peak: ``torch.mm`` of two 2048×2048 fp32 matrices (2·2048³ FLOP) with ``--threads`` threads, median of
  ``--runs`` runs after warm-up → GFLOP/s (also the best run);
* model: GFLOP of one forward (batch 1) from ``torch.utils.flop_counter.FlopCounterMode`` on the meta device
  (convolutions, linear layers, attention matmuls; not the warp/norms/softmax) at 160×192×224 and at the
  default model's grid 80×96×112;
* bound = model GFLOP / peak GFLOP/s: no fp32 implementation on this machine can beat it by much.
  ``model_latency.py`` reports every latency as a multiple of this bound.

    python benchmarks/compute_bound.py [--quick] [--threads 2] [--runs 5] [--n 2048] [--model em-23-hires]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

NAME = "compute_bound"


def compute(
    model: str,
    grids: list[tuple[int, int, int]],
    n: int,
    threads: int,
    runs: int,
    warmup: int,
    overrides: dict | None = None,
    checkpoint: str | None = None,
) -> dict:
    """Peak, per-grid GFLOP and bound seconds (used by model_latency.py too)."""
    from emorph_deploy.models import get_config

    peak = C.matmul_peak(n=n, threads=threads, runs=runs, warmup=max(1, warmup))
    if checkpoint:
        base = C.checkpoint_config(checkpoint)
    else:
        base = get_config(model, **(overrides or {}))
    rows = []
    for g in grids:
        cfg = base.replace(img_size=tuple(g))
        gflop = C.model_gflop(cfg)
        rows.append(
            {
                "model": cfg.name,
                "grid": list(g),
                "gflop": gflop,
                "bound_s": gflop / peak["gflops_median"],
                "bound_s_best_peak": gflop / peak["gflops_best"],
            }
        )
    return {"peak": peak, "rows": rows}


def markdown(res: dict) -> str:
    p = res["summary"]["peak"]
    t = p["timing"]
    body = [
        f"Matmul peak: `torch.mm` {p['n']}³ fp32, {p['threads']} threads: "
        f"**{p['gflops_median']:.1f} GFLOP/s** "
        f"(median of {t['runs']} runs; best {p['gflops_best']:.1f}; median {t['median_s'] * 1e3:.1f} ms, "
        f"p90 {t['p90_s'] * 1e3:.1f} ms).",
        "",
        C.md_table(
            ["model", "grid", "GFLOP / forward", "bound (s) at median peak", "bound (s) at best peak"],
            [
                [
                    r["model"],
                    C.fmt_size(r["grid"]),
                    f"{r['gflop']:.4g}",
                    f"{r['bound_s']:.3g}",
                    f"{r['bound_s_best_peak']:.3g}",
                ]
                for r in res["rows"]
            ],
        ),
        "",
        "GFLOP from `torch.utils.flop_counter.FlopCounterMode` (2 FLOP per multiply-accumulate; "
        "convolutions, "
        "linear layers and attention matmuls — the warp, norms and softmax are not counted, so the true "
        "minimum time is a little higher).",
    ]
    return C.markdown_document(res, "Compute bound (fp32 CPU)", "\n".join(body))


def main(argv: list[str] | None = None) -> int:
    ap = C.base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=None, help="matmul size (default 2048; --quick 512)")
    ap.add_argument("--model", default="em-23-hires", help="registered variant (default em-23-hires)")
    ap.add_argument("--checkpoint", default=None, help="use this checkpoint's model config instead")
    ap.add_argument(
        "--grids",
        default=None,
        help="comma list of DxHxW (default 160x192x224,80x96x112; --quick 32x32x32,16x24x32)",
    )
    args = C.finish_args(ap.parse_args(argv), NAME)
    n = args.n or (512 if args.quick else 2048)
    grids = (
        [C.parse_size(g) for g in args.grids.split(",")]
        if args.grids
        else list(C.QUICK_GRIDS if args.quick else (C.FULL_GRID, C.DEFAULT_GRID))
    )
    C.check_outputs_writable(args.out, args.force)

    import torch

    torch.set_num_threads(args.threads)
    res = C.new_result(NAME, args, argv)
    C.log(f"matmul peak {n}³ with {args.threads} threads ...")
    out = compute(
        args.model,
        grids,
        n,
        args.threads,
        args.runs,
        args.warmup,
        overrides=C.QUICK_OVERRIDES if args.quick and not args.checkpoint else None,
        checkpoint=args.checkpoint,
    )
    res["rows"] = out["rows"]
    res["summary"].update(
        {
            "peak": out["peak"],
            "peak_gflops": out["peak"]["gflops_median"],
            "bound_s": {C.fmt_size(r["grid"]): r["bound_s"] for r in out["rows"]},
        }
    )
    res["notes"].append(
        "The bound assumes every FLOP runs at the matmul peak; 3D convolutions with few "
        "channels and memory-bound ops (norms, softmax, warp) cannot, so ~1.2-1.5x the bound "
        "is already a good implementation."
    )
    if args.quick:
        res["notes"].append(f"--quick: a narrow em-23-hires ({C.QUICK_OVERRIDES}) and a {n}³ matmul.")
    C.publish(res, markdown, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
