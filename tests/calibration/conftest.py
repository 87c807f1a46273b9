from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """Tiny registration-shaped gather export (8³) with an emorph-onnx/1 manifest (preprocessing grid 8³)."""
    from emorph_deploy.engines.testing import tiny_registration_onnx

    return tiny_registration_onnx(tmp_path_factory.mktemp("calib-export") / "tiny.onnx")
