"""Fixtures shared across test folders."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory):
    """A tiny registration-shaped gather export (8³, width 8) with its emorph-onnx/1 manifest (grid 8³);
    shared by the engine and calibration tests (one export per session)."""
    from emorph_deploy.engines.testing import tiny_registration_onnx

    return tiny_registration_onnx(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="session")
def tiny_em():
    """Factory ``tiny_em(grid, **overrides)``: a seeded, narrow em-11-hires (non-trivial initial flow) on
    ``grid`` for the registration tests; ``overrides`` change its config (e.g. a full-resolution stage)."""

    def make(grid: tuple[int, int, int], **overrides):
        import torch

        from emorph_deploy.models import create_model

        torch.manual_seed(0)
        return create_model(
            "em-11-hires",
            img_size=grid,
            patch_dim=6,
            embed_dims=(8, 16),
            heads=(1, 2),
            decoder_widths=(8, 8),
            skip_width=4,
            drop_path=0.0,
            flow_init_std=1e-2,
            **overrides,
        )

    return make


def _stderr_runner():
    """A Typer ``CliRunner`` that keeps stderr apart from stdout (``result.stderr``)."""
    from typer.testing import CliRunner

    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 always separates stderr
        return CliRunner()


@pytest.fixture
def runner():
    """A Typer ``CliRunner`` that keeps stderr apart from stdout (``result.stderr``)."""
    return _stderr_runner()


@pytest.fixture(scope="session")
def cli():
    """``cli(*args) -> (result, stderr)``: ``emorph ARGS...`` (any path-like arguments) under a CliRunner
    that keeps stderr apart."""
    from emorph_deploy.cli.app import app

    def invoke(*args):
        res = _stderr_runner().invoke(app, [str(a) for a in args])
        return res, (res.stderr if res.stderr_bytes is not None else "")

    return invoke


@pytest.fixture(scope="session")
def inverted_brain():
    """A 32³ template pair as (D, H, W) tensors: ``moving``, ``fixed``, ``inverted`` (the moving image
    inverted inside the brain: T2-like tissue order, background 0) and ``inside`` (the moving brain mask)."""
    import numpy as np
    import torch

    from emorph_deploy.data.synthetic import template_pair

    p = template_pair((32, 32, 32), seed=10_000)
    inside = p.moving_labels > 0
    return {
        "moving": torch.from_numpy(p.moving),
        "inverted": torch.from_numpy(np.where(inside, 1.0 - p.moving, 0.0).astype(np.float32)),
        "fixed": torch.from_numpy(p.fixed),
        "inside": torch.from_numpy(inside),
    }
