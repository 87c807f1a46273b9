"""What runs inside a Dask worker: the plugin that loads the model once per worker and the per-pair task.

Imported by :mod:`emorph_deploy.registration.cluster` only after ``distributed`` is known to be installed, and
by the workers when they unpickle the plugin and the task (both by reference, so the workers need
``emorph_deploy`` importable).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from emorph_deploy.registration.batch import Pair, PairOptions, failed_row, register_pair
from emorph_deploy.registration.defaults import DEFAULTS

__all__ = ["PLUGIN_NAME", "RegistrarPlugin", "pin_threads", "register_pair_task", "worker_settings"]

PLUGIN_NAME = "emorph-registrar"


def pin_threads(threads: int) -> None:
    """Use ``threads`` CPU threads in this process (one worker's share of the cores): torch's intra-op pool,
    and the ONNX Runtime / OpenVINO runners loaded after this call (their pools are per session and default
    to every core, whatever OMP_NUM_THREADS says)."""
    import torch

    from emorph_deploy.runners import set_default_threads

    torch.set_num_threads(int(threads))
    set_default_threads(int(threads))


class RegistrarPlugin(WorkerPlugin):
    """Loads one :class:`~emorph_deploy.registration.Registrar` per worker at start-up and pins its threads.

    ``artifact``: model path as the workers see it (None = the packaged default model of the worker's own
    install); ``threads``: CPU threads of each worker for torch, ONNX Runtime and OpenVINO
    (:func:`pin_threads`; None = the worker's Dask thread count). A worker registers one pair at a time
    (:attr:`lock`), so a worker started with ``--nthreads T`` runs one pair on T threads rather than T pairs
    on T threads each.
    """

    name = PLUGIN_NAME

    def __init__(
        self,
        artifact: str | None,
        backend: str,
        affine: bool,
        threads: int | None,
        match_contrast: bool = DEFAULTS.match_contrast,
        passes: int = DEFAULTS.passes,
    ) -> None:
        self.artifact = artifact
        self.backend = backend
        self.affine = affine
        self.threads = threads
        self.match_contrast = match_contrast
        self.passes = passes
        self.registrar: Any = None
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # the model and the lock stay on the worker
        keys = ("artifact", "backend", "affine", "threads", "match_contrast", "passes")
        return {k: self.__dict__[k] for k in keys}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def setup(self, worker: Any) -> None:
        from emorph_deploy.registration.pipeline import Registrar

        pin_threads(self.threads or worker.state.nthreads)
        self.registrar = Registrar.load(
            self.artifact,
            backend=self.backend,
            affine=self.affine,
            match_contrast=self.match_contrast,
            passes=self.passes,
        )


def register_pair_task(pair: Pair, out_dir: str, options: PairOptions) -> dict[str, Any]:
    """One Dask task: :func:`~emorph_deploy.registration.batch.register_pair` with this worker's registrar;
    the row also names the ``worker`` and its pinned ``threads`` (not columns of ``summary.csv``). A worker
    whose model failed to load reports the pair as failed."""
    worker = get_worker()
    plugin = worker.plugins.get(PLUGIN_NAME)
    if plugin is None or plugin.registrar is None:
        return failed_row(
            pair,
            f"worker {worker.address}: expected the model loaded by the emorph plugin, got none; "
            "fix: see the worker's log for the load error",
        )
    import torch

    with plugin.lock:
        row = register_pair(plugin.registrar, pair, Path(out_dir), options)
    return {**row, "worker": worker.address, "threads": torch.get_num_threads()}


def worker_settings(options: PairOptions, dask_worker: Any = None) -> dict[str, Any] | None:
    """The batch settings (:func:`~emorph_deploy.registration.batch_manifest.batch_settings`) of this worker's
    registrar, None when its model did not load; ``Client.run`` passes ``dask_worker``."""
    from emorph_deploy.registration.batch_manifest import batch_settings

    plugin = (dask_worker or get_worker()).plugins.get(PLUGIN_NAME)
    if plugin is None or plugin.registrar is None:
        return None
    return batch_settings(plugin.registrar, options)
