"""Batch registration on Dask: scheduler parsing, a 2-worker LocalCluster on tiny images, ``--resume``."""

from __future__ import annotations

import csv
import json
import shutil
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

pytest.importorskip("torch", reason="torch is needed for the model")

from emorph_deploy.cli.app import app
from emorph_deploy.errors import InputError
from emorph_deploy.registration.batch import PairOptions, read_pairs
from emorph_deploy.registration.cluster import SchedulerSpec, available_cores, parse_scheduler


def _invoke(args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res, (res.stderr if res.stderr_bytes is not None else "")


def test_parse_scheduler():
    assert parse_scheduler("local:3") == SchedulerSpec("local", 3)
    assert parse_scheduler("local") == SchedulerSpec("local", max(1, available_cores() // 2))
    assert parse_scheduler("slurm:8") == SchedulerSpec("slurm", 8)
    assert parse_scheduler(" tcp://10.0.0.5:8786 ") == SchedulerSpec("address", address="tcp://10.0.0.5:8786")
    assert not parse_scheduler("tls://head:8786").local
    for bad in ("local:0", "local:x", "slurm:0", "10.0.0.5:8786", "slurm", "sge:2", ""):
        with pytest.raises(InputError, match="--scheduler"):
            parse_scheduler(bad)


def test_jobqueue_needs_dask_jobqueue(monkeypatch):
    """Without dask-jobqueue, ``--scheduler slurm:N`` says what to install (one line, exit 2)."""
    import sys

    from emorph_deploy.errors import MissingDependencyError
    from emorph_deploy.registration.cluster import jobqueue_cluster

    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"dask-jobqueue.*emorph-deploy\[jobqueue\]") as err:
        jobqueue_cluster("slurm", 2)
    assert err.value.exit_code == 2 and "\n" not in str(err.value)


def test_scheduler_and_resume_need_pairs(tiny_cohort, tmp_path):
    single = ["register", tiny_cohort["fixed"], tiny_cohort["moving"][0], "--model", tiny_cohort["ckpt"]]
    for extra in (["--scheduler", "local:2"], ["--resume"]):
        res, err = _invoke([*single, "--out", tmp_path / "o", *extra])
        assert res.exit_code == 2 and "--pairs" in err, err
    res, err = _invoke(
        ["register", "--pairs", tiny_cohort["csv"], "--out", tmp_path / "o", "--scheduler", "yarn"]
    )
    assert res.exit_code == 2 and "--scheduler" in err and not (tmp_path / "o").exists()


@pytest.fixture()
def cohort_with_failure(tiny_cohort, tmp_path):
    """The tiny cohort plus a fourth pair whose moving image does not exist."""
    d = tmp_path / "cohort"
    shutil.copytree(tiny_cohort["dir"], d)
    with open(d / "cohort.csv", "a") as f:
        f.write("fixed.nii.gz,missing.nii.gz,,bad\n")
    return {"csv": d / "cohort.csv", "ckpt": d / "tiny.json"}


def _by_id(rows):
    return {r["id"]: r for r in rows}


def test_local_cluster_two_workers_matches_in_process_batch(cohort_with_failure, tmp_path, restore_threads):
    """Two in-process Dask workers (quick to start on 2 cores): same QC as the in-process batch, the
    failing pair reported without stopping the others, torch pinned per worker, the workers' settings in
    batch.json, then a resumed run, and one refused for changed settings."""
    pytest.importorskip("distributed", reason="needs the dask extra: pip install 'emorph-deploy[dask]'")
    import torch

    from emorph_deploy.registration import Registrar
    from emorph_deploy.registration.batch import run_batch
    from emorph_deploy.registration.cluster import run_batch_dask

    pairs = read_pairs(cohort_with_failure["csv"])
    ckpt = cohort_with_failure["ckpt"]
    lines: list[str] = []

    def on_dask(options: PairOptions) -> list[dict]:  # two in-process workers, 1 thread each
        return run_batch_dask(
            pairs,
            tmp_path / "dask",
            "local:2",
            artifact=ckpt,
            backend="torch",
            affine=False,
            options=options,
            threads=1,
            progress=False,
            echo=lines.append,
            dashboard_address=":0",
            processes=False,
        )

    torch.set_num_threads(2)  # the workers must pin their own share (1), whatever this process uses
    rows = on_dask(PairOptions(qc_png=False))
    torch.set_num_threads(1)
    ref = _by_id(
        run_batch(Registrar.load(ckpt, backend="torch", affine=False), pairs, tmp_path / "ref", qc_png=False)
    )
    resumed = on_dask(PairOptions(qc_png=False, resume=True))
    with pytest.raises(InputError, match=r"^--resume .*got changed qc_png False -> True; fix"):
        on_dask(PairOptions(qc_png=True, resume=True))

    settings = json.loads((tmp_path / "dask" / "batch.json").read_text())["settings"]
    assert (settings["backend"], settings["precision"], settings["qc_png"]) == ("torch", "fp32", False)
    assert settings["artifact"] == str(ckpt.resolve())
    assert [r["id"] for r in rows] == ["p0", "p1", "p2", "bad"]  # CSV order, whatever finished first
    assert lines and lines[0].startswith("local cluster: 2 worker threads") and "dashboard" in lines[0]
    got = _by_id(rows)
    assert got["bad"]["status"] == "failed" and "missing.nii.gz" in got["bad"]["error"]
    for pid in ("p0", "p1", "p2"):
        assert got[pid]["status"] == "ok", got[pid]
        assert got[pid]["threads"] == 1
        for key in ("ncc_before", "ncc_after", "frac_jac_nonpos", "sdlogj"):
            assert got[pid][key] == pytest.approx(ref[pid][key], rel=1e-5, abs=1e-6)
        assert (tmp_path / "dask" / pid / "warped.nii.gz").is_file()
    assert (tmp_path / "dask" / "p0" / "warped_labels.nii.gz").is_file()
    assert len({r["worker"] for r in rows if "worker" in r}) >= 1

    with open(tmp_path / "dask" / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [(r["id"], r["status"]) for r in summary] == [
        ("p0", "skipped"),
        ("p1", "skipped"),
        ("p2", "skipped"),
        ("bad", "failed"),
    ]
    assert [r["status"] for r in resumed] == ["skipped", "skipped", "skipped", "failed"]


@pytest.mark.slow
def test_cli_local_cluster_worker_processes(cohort_with_failure, tmp_path):
    """``emorph register --scheduler local:2``: two worker processes (spawned: each imports torch and loads
    the model), the dashboard address printed, exit 1 for the failing pair."""
    pytest.importorskip("distributed", reason="needs the dask extra: pip install 'emorph-deploy[dask]'")
    out = tmp_path / "out"
    args = ["register", "--pairs", cohort_with_failure["csv"], "--model", cohort_with_failure["ckpt"]]
    res, err = _invoke([*args, "--out", out, "--scheduler", "local:2", "--no-qc-png", "--no-affine"])
    assert res.exit_code == 1, err + res.stdout
    assert "local cluster: 2 worker processes" in err and "dashboard" in err
    assert "3/4 pairs registered, 1 failed" in res.stdout
    with open(out / "summary.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok", "ok", "ok", "failed"]


@pytest.fixture()
def restore_threads():
    """Put back torch's and the runners' thread settings that the plugin pins for the whole process."""
    import torch

    from emorph_deploy.runners import default_threads, set_default_threads

    before = torch.get_num_threads(), default_threads()
    yield
    torch.set_num_threads(before[0])
    set_default_threads(before[1])


@pytest.fixture(scope="module")
def tiny_onnx_export(tiny_cohort, tmp_path_factory):
    """The tiny cohort's checkpoint exported to ONNX (flow only) with its manifest."""
    from emorph_deploy.export import onnx_from_checkpoint

    pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install 'emorph-deploy[onnx]'")
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    return onnx_from_checkpoint(tiny_cohort["ckpt"], out, outputs="flow")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_worker_pins_the_runner_threads(tiny_onnx_export, backend, restore_threads):
    """The worker plugin gives its thread share to the ONNX Runtime / OpenVINO session, not only to torch:
    ``threads`` when given, else the worker's Dask thread count."""
    pytest.importorskip("distributed", reason="needs the dask extra: pip install 'emorph-deploy[dask]'")
    if backend == "openvino":
        pytest.importorskip("openvino", reason="openvino not installed: pip install 'emorph-deploy[cpu]'")
    import torch

    from emorph_deploy.registration._dask_worker import RegistrarPlugin

    worker = SimpleNamespace(state=SimpleNamespace(nthreads=3))
    for threads, expected in ((1, 1), (None, 3)):
        plugin = RegistrarPlugin(str(tiny_onnx_export), backend, False, threads)
        plugin.setup(worker)
        runner = plugin.registrar.runner
        assert runner.name == backend and torch.get_num_threads() == expected
        if backend == "onnxruntime":
            assert runner.meta["intra_op_threads"] == expected
            assert runner._session.get_session_options().intra_op_num_threads == expected
        else:
            assert runner.meta["openvino_config"]["INFERENCE_NUM_THREADS"] == str(expected)
            # OpenVINO caps the threads it runs at the cores it may use
            got = int(runner._compiled.get_property("INFERENCE_NUM_THREADS"))
            assert got == min(expected, available_cores())
        runner.close()


def test_workers_with_different_settings_are_refused():
    """A cluster whose workers resolved the model differently (e.g. --backend auto finding OpenVINO on some)
    would mix settings in one batch: refused before any pair runs, naming what differs."""
    pytest.importorskip("distributed", reason="needs the dask extra: pip install 'emorph-deploy[dask]'")
    from emorph_deploy.errors import ProcessingError
    from emorph_deploy.registration.cluster import _workers_settings

    same = {
        "artifact": "/a/m.onnx",
        "artifact_sha256": "0" * 64,
        "backend": "onnxruntime",
        "precision": "fp32",
    }
    answers = {"tcp://w1": same, "tcp://w2": dict(same, artifact="/b/m.onnx"), "tcp://w3": None}
    client = SimpleNamespace(wait_for_workers=lambda n: None, run=lambda fn, options: answers)
    assert _workers_settings(client, PairOptions()) == same  # another path to the same file is fine
    answers["tcp://w2"] = dict(same, backend="openvino")
    with pytest.raises(ProcessingError, match=r"got backend differing between tcp://w1 and tcp://w2"):
        _workers_settings(client, PairOptions())
    client.run = lambda fn, options: {"tcp://w1": None}
    with pytest.raises(ProcessingError, match="got none loaded"):
        _workers_settings(client, PairOptions())
