"""`torchrun --nproc_per_node 2` on CPU (gloo): DDP training finishes; both ranks hold identical weights."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    torch.set_num_threads(1)
    from emorph_deploy.train.config import TrainConfig
    from emorph_deploy.train.loop import train
    out, train_only = sys.argv[1], tuple(p for p in sys.argv[3].split(",") if p)
    ov = {"embed_dims": [16, 32], "patch_dim": 12, "decoder_widths": [16, 8], "skip_width": 8,
          "heads": [2, 4], "depths": [1, 1]}
    cfg = TrainConfig(model_overrides=ov, grid_shape=(32, 32, 32), epochs=1, steps_per_epoch=2, val_pairs=2,
                      out=out, log_every=1, progress=False, tensorboard=False, device="cpu",
                      synthetic_kind="synth", train_only=train_only)
    r = train(cfg, force=True)
    with open(os.path.join(sys.argv[2], f"rank{r.rank}.txt"), "w") as f:
        f.write(f"{r.weights_sha256} {r.world_size} {r.step}")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("train_only", ["", "stage1.,up3."])
def test_ddp_gloo_two_processes_identical_weights(tmp_path, train_only):
    """Both ranks end with the same weights; with --train-only (frozen parameters) too."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this PyTorch build")
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    out, hashes = tmp_path / "run", tmp_path / "hashes"
    hashes.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, "--standalone", "--nproc_per_node", "2", str(script), str(out), str(hashes), train_only],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = (hashes / "rank0.txt").read_text().split()
    r1 = (hashes / "rank1.txt").read_text().split()
    assert r0[1] == r1[1] == "2" and r0[2] == r1[2] == "2"  # world size 2, 2 iterations each
    assert r0[0] == r1[0]  # identical weights on both ranks
    # only rank 0 wrote the run folder, and its checkpoint holds those same weights
    from emorph_deploy.train.checkpoint import load_checkpoint
    from emorph_deploy.train.loop import weights_digest

    model, meta = load_checkpoint(out / "last")
    assert weights_digest(model) == r0[0]
    assert meta["training"]["world_size"] == 2
    assert not list(out.glob(".*tmp*"))
