"""Fixtures for the export tests: a tiny checkpoint (24×32×40, narrow widths) and its two exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

GRID = (24, 32, 40)  # non-cubic on purpose: catches axis mix-ups
TINY = {
    "img_size": GRID,
    "patch_dim": 12,
    "embed_dims": (16, 32),
    "heads": (2, 4),
    "decoder_widths": (8, 8),
    "skip_width": 8,
    "flow_init_std": 0.1,  # a real (few-voxel) flow, so parity is not measured on a near-zero warp
}


def make_checkpoint(stem: Path, grid=GRID, seed: int = 0) -> Path:
    """Save a tiny random EfficientMorph checkpoint; returns the ``.safetensors`` path."""
    import torch

    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.models import create_model
    from emorph_deploy.train.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = create_model("em-11-hires", **{**TINY, "img_size": tuple(grid)})
    pre = Preprocessing(grid_shape=tuple(grid), spacing_mm=(1.5, 1.0, 2.0))
    paths = save_checkpoint(model, stem, preprocessing=pre, force=True)
    return Path(paths.weights)


def perturb_onnx(src: Path, dst: Path, rel: float = 0.05, seed: int = 0) -> Path:
    """Copy an exported graph with its weight initializers perturbed by ``rel`` relative noise.

    The manifest is copied with the new ``sha256_onnx`` (a consistent artifact whose numbers are wrong).
    """
    import onnx
    from onnx import numpy_helper

    from emorph_deploy.fileio import sha256_file

    model = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    changed = 0
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.ndim >= 2 and arr.size >= 16:
            noisy = arr * (1.0 + rel * rng.standard_normal(arr.shape)).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), init.name))
            changed += 1
    assert changed > 0
    onnx.save(model, str(dst))
    meta = json.loads(src.with_suffix(".json").read_text())
    meta["name"] = dst.stem
    meta["sha256_onnx"] = sha256_file(dst)
    dst.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return dst


@pytest.fixture(scope="session")
def grid() -> tuple[int, int, int]:
    return GRID


@pytest.fixture(scope="session")
def tiny_overrides() -> dict:
    """The tiny checkpoint's model options (``create_model("em-11-hires", **tiny_overrides)``)."""
    return dict(TINY)


@pytest.fixture(scope="session")
def make_ckpt():
    """``make_ckpt(stem, grid=GRID, seed=0) -> .safetensors path``."""
    return make_checkpoint


@pytest.fixture(scope="session")
def perturb():
    """``perturb(src_onnx, dst_onnx, rel=0.05) -> dst`` with a consistent manifest."""
    return perturb_onnx


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def exports(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    """``{"gather": .onnx, "native": .onnx}`` exported once for the session."""
    from emorph_deploy.export import onnx_from_checkpoint

    out = tmp_path_factory.mktemp("export")
    return {
        mode: onnx_from_checkpoint(tiny_ckpt, out / f"tiny-{mode}.onnx", grid_sample=mode)
        for mode in ("gather", "native")
    }


@pytest.fixture(scope="session")
def feed() -> dict[str, np.ndarray]:
    from emorph_deploy.data.synthetic import synth_pair

    p = synth_pair(GRID, seed=3)
    return {
        "moving": p.moving[None, None].astype(np.float32),
        "fixed": p.fixed[None, None].astype(np.float32),
    }
