"""Batch registration as Dask tasks: a local cluster on this machine, a batch system, or a running scheduler.

``--scheduler local[:N]`` starts a ``LocalCluster`` of N worker processes (default: one per two cores, at
least one), one Dask thread each, with torch, ONNX Runtime, OpenVINO, OpenMP and BLAS pinned to
``cores // N`` threads so the N workers share the cores instead of each using all of them.
``--scheduler slurm:N`` / ``pbs:N`` submits N batch jobs through ``dask-jobqueue`` (configured in
``~/.config/dask/jobqueue.yaml``), and ``--scheduler tcp://HOST:PORT`` (or any address a Dask ``Client``
takes) uses a running cluster (``docs/cluster.md``). On those each worker pins its threads to its own Dask
thread count unless ``threads`` is given, and the workers must see the input and output paths (a shared
filesystem).

Each worker loads the model once (:class:`~emorph_deploy.registration._dask_worker.RegistrarPlugin`) and
runs :func:`~emorph_deploy.registration.batch.register_pair`, the function of the in-process batch, so
outputs, ``--resume`` and ``summary.csv`` are the same on both paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emorph_deploy.errors import InputError, ProcessingError, require
from emorph_deploy.registration.batch import (
    Pair,
    PairOptions,
    failed_row,
    prepare_summary,
    progress_bar,
    write_summary,
)
from emorph_deploy.registration.defaults import DEFAULTS

__all__ = [
    "JOBQUEUE_CLUSTERS",
    "SchedulerSpec",
    "available_cores",
    "jobqueue_cluster",
    "parse_scheduler",
    "run_batch_dask",
]

_LOCAL = re.compile(r"local(?::(\d+))?")
_JOBQUEUE = re.compile(r"(slurm|pbs):(\d+)")

#: ``--scheduler`` batch systems → their dask-jobqueue cluster class
JOBQUEUE_CLUSTERS = {"slurm": "SLURMCluster", "pbs": "PBSCluster"}


@dataclass(frozen=True)
class SchedulerSpec:
    """Where the tasks run: ``kind`` "local" (a local cluster of ``workers`` processes), "address" (the
    running scheduler at ``address``) or a batch system of :data:`JOBQUEUE_CLUSTERS` (``workers`` jobs)."""

    kind: str = "local"
    workers: int = 1
    address: str | None = None

    @property
    def local(self) -> bool:
        return self.kind == "local"


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_scheduler(text: str) -> SchedulerSpec:
    """``local`` | ``local:N`` | ``slurm:N`` | ``pbs:N`` | ``SCHEME://HOST:PORT`` → :class:`SchedulerSpec`;
    InputError otherwise."""
    text = text.strip()
    m_local, m_jobs = _LOCAL.fullmatch(text), _JOBQUEUE.fullmatch(text)
    count = (m_local.group(1) if m_local else None) or (m_jobs.group(2) if m_jobs else None)
    if count is not None and int(count) < 1:
        raise InputError(
            f"--scheduler: expected N >= 1 in {text.split(':')[0]}:N, got {text!r}; fix: pass e.g. local:2"
        )
    if m_local:
        return SchedulerSpec("local", int(count) if count else max(1, available_cores() // 2))
    if m_jobs:
        return SchedulerSpec(m_jobs.group(1), int(count))
    if re.fullmatch(r"[a-z][a-z0-9+.-]*://\S+", text):
        return SchedulerSpec("address", address=text)
    raise InputError(
        f"--scheduler: expected local[:N], slurm:N, pbs:N or a scheduler address like tcp://HOST:8786, got "
        f"{text!r}; fix: pass e.g. --scheduler local:2"
    )


def run_batch_dask(
    pairs: list[Pair],
    out_dir: str | Path,
    scheduler: str | SchedulerSpec,
    *,
    artifact: str | Path | None = None,
    backend: str = "auto",
    affine: bool = DEFAULTS.affine,
    match_contrast: bool = DEFAULTS.match_contrast,
    passes: int = DEFAULTS.passes,
    options: PairOptions | None = None,
    threads: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    dashboard_address: str = ":8787",
    processes: bool = True,
    timings: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Register every pair as a Dask task into ``out_dir/<id>/``; returns the summary rows in ``pairs`` order
    (also written to ``out_dir/summary.csv``). Never stops on a failing pair, nor on a worker lost mid-pair.

    ``artifact``/``backend``/``affine``/``match_contrast``/``passes`` say how each worker builds its Registrar
    (``artifact`` None: the packaged default model); ``threads``: CPU threads per worker (default: see the
    module docstring); ``echo`` receives the cluster's description and dashboard address. An artifact the
    workers cannot load raises its error before any pair runs. ``processes=False`` runs a local cluster's
    workers as threads of this process (quick to start, no ``__main__`` guard needed, but torch's thread
    setting is then shared by the process); worker processes are started with ``spawn``, so a script that
    calls this with a local cluster needs the usual ``if __name__ == "__main__":`` guard. ``timings`` receives
    the seconds of ``cluster`` (start or connect), ``model_load`` (every worker loading the model) and
    ``pairs`` (the tasks). The workers' settings are recorded in (``resume``: checked against)
    ``out_dir/batch.json`` before any pair runs (:mod:`emorph_deploy.registration.batch_manifest`).
    """
    spec = parse_scheduler(scheduler) if isinstance(scheduler, str) else scheduler
    options = options or PairOptions()
    out = Path(out_dir).absolute()
    summary_path = prepare_summary(out, options)
    pairs = [_absolute(p) for p in pairs]
    if threads is not None and threads < 1:
        raise InputError(f"--threads: expected >= 1, got {threads}; fix: pass e.g. --threads 2")
    require("distributed", "dask")
    from emorph_deploy.registration._dask_worker import RegistrarPlugin, register_pair_task
    from emorph_deploy.registration.batch_manifest import record_batch_settings

    if spec.local and threads is None:
        threads = max(1, available_cores() // spec.workers)
    artifact_s = str(Path(artifact).absolute()) if artifact is not None else None
    times = {} if timings is None else timings
    t0 = time.perf_counter()
    with _client(spec, threads, dashboard_address, processes, echo) as client:
        times["cluster"] = time.perf_counter() - t0
        plugin = RegistrarPlugin(artifact_s, backend, affine, threads, match_contrast, passes)
        _register_plugin(client, plugin)
        times["model_load"] = time.perf_counter() - t0 - times["cluster"]
        record_batch_settings(out, _workers_settings(client, options), options)
        futures = client.map(register_pair_task, pairs, out_dir=str(out), options=options, pure=False)
        rows = _gather(futures, pairs, progress)
        times["pairs"] = time.perf_counter() - t0 - times["cluster"] - times["model_load"]
    write_summary(summary_path, rows)
    return rows


def _absolute(pair: Pair) -> Pair:
    paths = {f.name: getattr(pair, f.name) for f in dataclasses.fields(pair) if f.name != "id"}
    return dataclasses.replace(pair, **{k: p.absolute() for k, p in paths.items() if p is not None})


@contextlib.contextmanager
def _client(
    spec: SchedulerSpec,
    threads: int | None,
    dashboard_address: str,
    processes: bool,
    echo: Callable[[str], None],
) -> Iterator[Any]:
    """A Dask client on the scheduler at ``spec.address``, or on a new local or batch-system cluster (closed
    on exit)."""
    from distributed import Client

    if spec.kind == "address":
        try:
            client = Client(spec.address, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise InputError(
                f"--scheduler: expected a running Dask scheduler at {spec.address}, got "
                f"{type(exc).__name__}: {exc}; fix: start one (dask scheduler / docs/cluster.md) or use "
                "--scheduler local"
            ) from None
        with client:
            n = len(client.scheduler_info(n_workers=-1).get("workers", {}))
            echo(f"scheduler: {spec.address} ({n} workers now), dashboard {client.dashboard_link}")
            yield client
        return
    if spec.local:
        cluster = _local_cluster(spec.workers, threads, dashboard_address, processes)
        kind = "processes" if processes else "threads"
        what = f"local cluster: {spec.workers} worker {kind}, pinned to {threads} thread(s) each"
    else:
        cluster = jobqueue_cluster(spec.kind, spec.workers)
        what = f"{spec.kind} cluster: {spec.workers} job(s) submitted, scheduler {cluster.scheduler_address}"
    with cluster, Client(cluster) as client:
        echo(f"{what}, dashboard {_dashboard(cluster)}")
        yield client


def _local_cluster(workers: int, threads: int | None, dashboard_address: str, processes: bool) -> Any:
    from distributed import LocalCluster

    extra: dict[str, Any] = {}
    if processes:  # Dask starts worker processes with these set to 1; a worker's share is `threads`
        extra["env"] = {
            k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
        }
    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=processes,
        dashboard_address=dashboard_address,
        silence_logs=logging.ERROR,
        **extra,
    )


def jobqueue_cluster(system: str, jobs: int, **kwargs: Any) -> Any:
    """A dask-jobqueue cluster on ``system`` ("slurm" | "pbs") scaled to ``jobs`` batch jobs.

    ``kwargs`` go to the cluster class (``cores``, ``memory``, ``walltime``, ``account``, ...); without them
    dask-jobqueue reads its configuration (``~/.config/dask/jobqueue.yaml``, see ``docs/cluster.md``).
    MissingDependencyError (one line) when dask-jobqueue is not installed; InputError when it lacks settings.
    """
    from emorph_deploy.errors import MissingDependencyError

    try:
        import dask_jobqueue
    except ImportError as exc:
        raise MissingDependencyError(
            f"--scheduler {system}:N: expected dask-jobqueue, got ImportError ({exc}); fix: pip install "
            "'emorph-deploy[jobqueue]' on the login node (docs/cluster.md)"
        ) from None
    cls = getattr(dask_jobqueue, JOBQUEUE_CLUSTERS[system])
    try:
        cluster = cls(**kwargs)
    except ValueError as exc:  # dask-jobqueue's message for missing cores/memory settings
        raise InputError(
            f"--scheduler {system}:N: expected dask-jobqueue settings for {system}, got: {exc}; fix: set "
            f"jobqueue.{system}.cores and .memory in ~/.config/dask/jobqueue.yaml (docs/cluster.md)"
        ) from None
    cluster.scale(jobs=jobs)
    return cluster


def _dashboard(cluster: Any) -> str:
    import importlib.util

    if importlib.util.find_spec("bokeh") is None:
        return "off (fix: pip install 'emorph-deploy[dask]', which brings bokeh)"
    return str(cluster.dashboard_link)


def _register_plugin(client: Any, plugin: Any) -> None:
    """Install the model on every worker (and on workers that join later); a load error is raised here."""
    from emorph_deploy.errors import EmorphError

    try:
        client.register_plugin(plugin)
    except EmorphError:
        raise
    except Exception as exc:
        raise ProcessingError(
            f"workers: expected each to load the model, got {type(exc).__name__}: {exc}; "
            "fix: check the artifact path is visible to the workers and loads with `emorph register`"
        ) from exc


def _workers_settings(client: Any, options: PairOptions) -> dict[str, Any]:
    """The batch settings of the workers' registrars (waiting for a first worker to join); ProcessingError
    when none loaded the model or when they differ (e.g. ``--backend auto`` resolving to another backend on
    some workers), since the batch would then mix settings."""
    from emorph_deploy.registration._dask_worker import worker_settings

    client.wait_for_workers(1)
    answers = {w: s for w, s in client.run(worker_settings, options).items() if s is not None}
    if not answers:
        raise ProcessingError(
            "workers: expected each to load the model, got none loaded; fix: see the workers' logs and "
            "check the artifact loads with `emorph register`"
        )
    (first_worker, first), *rest = answers.items()
    for worker, got in rest:
        diff = sorted(k for k in {*first, *got} if k != "artifact" and first.get(k) != got.get(k))
        if diff:
            raise ProcessingError(
                f"workers: expected the same model settings on every worker, got {', '.join(diff)} differing "
                f"between {first_worker} and {worker}; fix: install the same backends on every worker or "
                "pass --backend explicitly"
            )
    return first


def _gather(futures: list[Any], pairs: list[Pair], progress: bool) -> list[dict[str, Any]]:
    """The rows of the finished tasks as they complete (progress bar), in ``pairs`` order; a task that
    itself failed (e.g. its worker died) becomes a failed row."""
    from distributed import as_completed

    index = {f.key: i for i, f in enumerate(futures)}
    rows: list[dict[str, Any] | None] = [None] * len(pairs)
    with progress_bar(len(pairs), progress) as tick:
        for fut in as_completed(futures):
            i = index[fut.key]
            if fut.status == "finished":
                rows[i] = fut.result()
            else:
                exc = fut.exception()
                rows[i] = failed_row(pairs[i], f"{type(exc).__name__}: {exc}")
            tick(rows[i])
            fut.release()
    return [r for r in rows if r is not None]
