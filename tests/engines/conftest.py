from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory):
    """A tiny registration-shaped gather export (8³, width 8) with its manifest."""
    from emorph_deploy.engines.testing import tiny_registration_onnx

    return tiny_registration_onnx(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="session")
def rtx():
    pytest.importorskip(
        "tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install 'emorph-deploy[tensorrt]')"
    )
    from emorph_deploy.engines.trt import load_tensorrt

    return load_tensorrt("tensorrt-rtx")


def _has_modelopt() -> bool:
    try:
        import modelopt.onnx.autocast  # noqa: F401
    except ImportError:
        return False
    return True


requires_modelopt = pytest.mark.skipif(
    not _has_modelopt(),
    reason="nvidia-modelopt (AutoCast) not installed: pip install nvidia-modelopt "
    "onnx-graphsurgeon lief polygraphy",
)
