"""Cohort throughput: pairs per minute of ``register --pairs`` in one process vs on a local Dask cluster.

A cohort of ``--pairs`` pairs (the 1 mm MNI152 pair of ``register_e2e.py``, with its GM label map, listed
``--pairs`` times under different ids) is registered with the same model three ways, each into a fresh
folder: in this process (:func:`~emorph_deploy.registration.batch.run_batch`, torch on ``--threads``
threads), ``local:1`` (one Dask worker process on ``--threads`` threads) and ``local:2`` (two worker
processes on ``--threads // 2`` threads each). For each: the seconds to start (cluster start, model load on
every worker), the seconds of the pairs themselves, pairs per minute with and without the start-up, and the
median seconds of one pair inside its worker.

    python benchmarks/batch_scaling.py [--quick] [--threads 2] [--pairs 12] [--model CHECKPOINT] [--png]
        [--configs inproc,local:1,local:2] [--force]

Without ``--model`` the packaged default model is used (``--quick``: a narrow random model at 32³ on the
2 mm template, 4 pairs). ``--runs``/``--warmup`` are not used: each configuration is one whole batch.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C


def _cohort(folder: Path, pair: dict[str, Path], n: int) -> Path:
    """A pairs CSV listing the same pair ``n`` times (ids ``s000``...)."""
    lines = ["fixed,moving,moving_labels,id"]
    lines += [f"{pair['fixed']},{pair['moving']},{pair['labels']},s{i:03d}" for i in range(n)]
    csv = folder / "cohort.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def _run(config: str, pairs: list[Any], out: Path, artifact: Path, threads: int, png: bool) -> dict[str, Any]:
    """One whole batch in configuration ``config``; its row."""
    from emorph_deploy.registration.batch import PairOptions, run_batch

    t0 = time.perf_counter()
    if config == "inproc":
        import torch

        from emorph_deploy.registration import Registrar

        torch.set_num_threads(threads)
        reg = Registrar.load(artifact, backend="torch")
        start = {"cluster": 0.0, "model_load": time.perf_counter() - t0}
        t1 = time.perf_counter()
        rows = run_batch(reg, pairs, out, qc_png=png, progress=False)
        start["pairs"] = time.perf_counter() - t1
        workers, per_worker = 1, threads
    else:
        from emorph_deploy.registration.cluster import parse_scheduler, run_batch_dask

        spec = parse_scheduler(config)
        workers, per_worker = spec.workers, max(1, threads // spec.workers)
        start = {}
        rows = run_batch_dask(
            pairs,
            out,
            spec,
            artifact=artifact,
            backend="torch",
            options=PairOptions(qc_png=png),
            threads=per_worker,
            progress=False,
            echo=C.log,
            dashboard_address=":0",
            timings=start,
        )
    total = time.perf_counter() - t0
    ok = [r for r in rows if r["status"] == "ok"]
    n = len(pairs)
    row = {
        "config": config,
        "workers": workers,
        "threads_per_worker": per_worker,
        "pairs": n,
        "ok": len(ok),
        "start_s": start["cluster"] + start["model_load"],
        "cluster_start_s": start["cluster"],
        "model_load_s": start["model_load"],
        "pairs_s": start["pairs"],
        "total_s": total,
        "pairs_per_min": 60.0 * n / start["pairs"],
        "pairs_per_min_with_start": 60.0 * n / total,
        "pair_median_s": statistics.median(r["seconds"] for r in ok) if ok else None,
    }
    C.log(
        f"{config}: {row['pairs_per_min']:.1f} pairs/min ({row['pairs_per_min_with_start']:.1f} with "
        f"{row['start_s']:.1f} s start-up), pair median {C.fmt(row['pair_median_s'], '.2f')} s"
    )
    return row


def main(argv: list[str] | None = None) -> int:
    ap = C.base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (.json); default: the packaged default model")
    ap.add_argument("--pairs", type=int, default=None, help="pairs in the cohort (default 12; --quick 4)")
    ap.add_argument("--png", action="store_true", help="also render qc.png for every pair")
    ap.add_argument("--configs", default="inproc,local:1,local:2", help="comma-separated configurations")
    args = C.finish_args(ap.parse_args(argv), "batch_scaling")
    C.check_outputs_writable(args.out, args.force)
    n_pairs = args.pairs or (4 if args.quick else 12)

    from register_e2e import _pair

    from emorph_deploy.registration import default_artifact
    from emorph_deploy.registration.batch import read_pairs

    result = C.new_result("batch_scaling", args, argv)
    tmp = Path(tempfile.mkdtemp(prefix="emorph-bench-batch-"))
    if args.quick:
        artifact, desc = C.make_checkpoint(tmp, (32, 32, 32), overrides=C.QUICK_OVERRIDES, spacing_mm=6.0)
    else:
        artifact = Path(args.model) if args.model else default_artifact()
        desc = f"checkpoint {artifact}"
    pairs = read_pairs(_cohort(tmp, _pair(tmp, 2 if args.quick else 1), n_pairs))
    rows = [
        _run(c.strip(), pairs, tmp / f"out-{i}", Path(artifact), args.threads, args.png)
        for i, c in enumerate(args.configs.split(","))
    ]
    result["rows"] = rows
    base = rows[0]["pairs_per_min"]
    result["summary"] = {
        "model": desc,
        "pairs": n_pairs,
        "speedup_vs_first": {r["config"]: C.ratio(r["pairs_per_min"], base) for r in rows},
    }
    result["notes"] += [
        "one whole batch per configuration (no repeats): start-up = cluster start + every worker loading the "
        "model; pairs/min = pairs / seconds of the pairs alone",
        f"the same pair {n_pairs} times (read from the page cache after the first): I/O is gzip "
        "decode/encode, not the disk",
        "pair median = seconds of one pair inside its worker (read, register, write)",
    ]
    C.publish(result, _render, args)
    return 0


def _render(result: dict[str, Any]) -> str:
    body = C.md_table(
        [
            "configuration",
            "workers x threads",
            "start-up s",
            "pairs s",
            "pairs/min",
            "pairs/min incl. start-up",
            "pair median s",
            "ok",
        ],
        [
            (
                r["config"],
                f"{r['workers']} x {r['threads_per_worker']}",
                C.fmt(r["start_s"], ".1f"),
                C.fmt(r["pairs_s"], ".1f"),
                C.fmt(r["pairs_per_min"], ".1f"),
                C.fmt(r["pairs_per_min_with_start"], ".1f"),
                C.fmt(r["pair_median_s"], ".2f"),
                f"{r['ok']}/{r['pairs']}",
            )
            for r in result["rows"]
        ],
    )
    return C.markdown_document(result, "Cohort throughput: one process vs a local Dask cluster", body)


if __name__ == "__main__":
    raise SystemExit(main())
