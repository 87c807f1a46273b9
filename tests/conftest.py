"""Fixtures shared across test folders."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory):
    """A tiny registration-shaped gather export (8³, width 8) with its emorph-onnx/1 manifest (grid 8³);
    shared by the engine and calibration tests (one export per session)."""
    from emorph_deploy.engines.testing import tiny_registration_onnx

    return tiny_registration_onnx(tmp_path_factory.mktemp("tiny") / "tiny.onnx")
