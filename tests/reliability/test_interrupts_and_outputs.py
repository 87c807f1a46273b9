"""Interruptions and output sets: SIGINT/SIGTERM end a command with 130/143 and nothing half written; a run's
outputs appear together or not at all, ``--force`` replaces the whole set; no overlap is a processing
failure (exit 1, one line)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is needed for the model")

from emorph_deploy.cli.app import app  # noqa: E402
from emorph_deploy.data.preprocess import Preprocessing  # noqa: E402
from emorph_deploy.errors import InputError, Interrupted, OutputExistsError  # noqa: E402
from emorph_deploy.fileio import atomic_dir  # noqa: E402

GRID = (16, 16, 16)


def _save(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0]) if affine is None else affine), str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_em, blob):
    from emorph_deploy.train.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("rel")
    save_checkpoint(
        tiny_em(GRID), d / "tiny", preprocessing=Preprocessing(grid_shape=GRID, spacing_mm=(4.0,) * 3)
    )
    far = np.diag([3.0, 3.0, 3.0, 1.0])
    far[:3, 3] = 1000.0
    one = np.zeros((18, 20, 22), np.float32)
    one[9, 9, 9] = 1.0
    return {
        "model": d / "tiny.json",
        "fixed": _save(d / "fixed.nii.gz", blob((20, 22, 18), 0)),
        "moving": _save(d / "moving.nii.gz", blob((18, 20, 22), 1)),
        "far": _save(d / "far.nii.gz", blob((18, 20, 22), 1), far),
        "one": _save(d / "one.nii.gz", one),
        "labels": _save(d / "labels.nii.gz", (blob((18, 20, 22), 1) > 0.5).astype(np.uint8) * 5),
    }


def _register(runner, files, out: Path, *extra: str, moving: str = "moving"):
    args = ["register", str(files["fixed"]), str(files[moving]), "--model", str(files["model"])]
    # unrelated blobs in one space: no pre-alignment (far away, the affine's centring would find the overlap)
    return runner.invoke(app, [*args, "--backend", "torch", "--no-affine", "--out", str(out), *extra])


def _no_hidden_leftovers(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------------------------------------ overlap
@pytest.mark.parametrize("moving", ["far", "one"])
def test_no_overlap_is_exit_1_one_line_and_no_outputs(files, runner, tmp_path: Path, moving: str) -> None:
    res = _register(runner, files, tmp_path / "o", moving=moving)
    assert res.exit_code == 1, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "overlap" in errors[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()
    _no_hidden_leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ output sets
def test_force_replaces_the_whole_output_set(files, runner, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert _register(runner, files, out, "--moving-labels", str(files["labels"])).exit_code == 0
    assert {"warped_labels.nii.gz", "qc.png"} <= {p.name for p in out.iterdir()}
    res = _register(runner, files, out, "--no-qc-png")
    assert res.exit_code == 2 and "--force" in res.stderr  # an earlier run's set is never mixed in silently
    assert _register(runner, files, out, "--force", "--no-qc-png").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "displacement.nii.gz",
        "inverse_displacement.nii.gz",
        "jacobian.nii.gz",
        "qc.json",
        "warped.nii.gz",
    ]
    _no_hidden_leftovers(tmp_path)


def test_force_in_a_shared_folder_keeps_other_files(files, runner, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert _register(runner, files, out, "--moving-labels", str(files["labels"])).exit_code == 0
    (out / "notes.txt").write_text("mine")
    assert _register(runner, files, out, "--force", "--no-qc-png").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "displacement.nii.gz",
        "inverse_displacement.nii.gz",
        "jacobian.nii.gz",
        "notes.txt",
        "qc.json",
        "warped.nii.gz",
    ]


def test_sigterm_while_writing_leaves_nothing(files, runner, tmp_path: Path, monkeypatch) -> None:
    import emorph_deploy.registration.pipeline as pipeline

    real = pipeline._save_niis

    def write_then_terminated(images):
        real(images[:1])  # one file already written into the staging folder
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)  # the handler raises here
        raise AssertionError("SIGTERM was not delivered")

    monkeypatch.setattr(pipeline, "_save_niis", write_then_terminated)
    res = _register(runner, files, tmp_path / "o")
    assert res.exit_code == 143, (res.exit_code, res.stderr)
    assert "interrupted by SIGTERM" in res.stderr and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the CLI restores the handlers it set


def test_atomic_dir_is_all_or_nothing(tmp_path: Path) -> None:
    out = tmp_path / "set"
    with atomic_dir(out, owned={"a", "b"}) as d:
        (d / "a").write_text("1")
        (d / "b").write_text("1")
    with pytest.raises(OutputExistsError), atomic_dir(out, owned={"a", "b"}):
        pass
    with pytest.raises(KeyboardInterrupt), atomic_dir(out, owned={"a", "b"}, force=True) as d:
        (d / "a").write_text("2")
        raise KeyboardInterrupt
    assert (out / "a").read_text() == "1" and (out / "b").exists()
    with atomic_dir(out, owned={"a", "b", "c"}, force=True) as d:  # new file names join the set
        (d / "c").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    (tmp_path / "f").write_text("")
    with pytest.raises(InputError, match="expected a folder"), atomic_dir(tmp_path / "f", owned={"a"}):
        pass


# ------------------------------------------------------------------------------------------------ build
class _FakeConfig:
    progress_monitor = None


class _FakeBuilder:
    """Calls the progress monitor like TensorRT does, until it asks to cancel (then returns None)."""

    def __init__(self) -> None:
        self.steps = 0

    def build_serialized_network(self, network, config):
        while self.steps < 10_000:
            self.steps += 1
            time.sleep(0.001)
            if not config.progress_monitor.step_complete("phase", self.steps):
                return None
        return b"engine"


def test_build_wait_cancels_tensorrt_on_a_signal() -> None:
    from types import SimpleNamespace

    from emorph_deploy.engines.builder import _build_interruptibly
    from emorph_deploy.errors import interrupts_deferred

    class Monitor:
        def __init__(self) -> None:
            pass

    trt = SimpleNamespace(module=SimpleNamespace(IProgressMonitor=Monitor))
    setup = SimpleNamespace(builder=_FakeBuilder(), network=None, config=_FakeConfig())
    threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    with pytest.raises(Interrupted) as info, interrupts_deferred() as check:
        _build_interruptibly(trt, setup, check)
    assert info.value.exit_code == 130
    assert 0 < setup.builder.steps < 10_000  # cancelled, and joined before the exception went on
    assert setup.config.progress_monitor is None


@pytest.mark.slow  # a fresh interpreter imports TensorRT and builds
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_build_is_interruptible_and_leaves_nothing(tiny_onnx, tmp_path: Path, sig, code) -> None:
    pytest.importorskip(
        "tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install 'emorph-deploy[tensorrt]')"
    )
    out = tmp_path / "engines"
    cmd = [sys.executable, "-m", "emorph_deploy", "build", str(tiny_onnx), "--out", str(out)]
    cmd += ["--flavour", "tensorrt-rtx"]
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # the build has begun: the signal lands in TensorRT's build
        if "building" in line:
            break
    time.sleep(0.05)
    proc.send_signal(sig)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == code, rest
    assert f"interrupted by {signal.Signals(sig).name}" in rest and "FATAL" not in rest
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_build_failure_on_a_full_disk_is_one_line_and_leaves_nothing(
    tiny_onnx, runner, tmp_path: Path, monkeypatch
) -> None:
    pytest.importorskip(
        "tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install 'emorph-deploy[tensorrt]')"
    )
    import errno

    import emorph_deploy.engines.builder as builder

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(builder, "write_manifest_atomic", full)  # the engine is written, its manifest is not
    out = tmp_path / "engines"
    res = runner.invoke(app, ["build", str(tiny_onnx), "--out", str(out), "--flavour", "tensorrt-rtx"])
    assert res.exit_code == 1, res.stderr
    assert "No space left" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()
