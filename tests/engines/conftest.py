from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def rtx():
    pytest.importorskip(
        "tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install 'emorph-deploy[tensorrt]')"
    )
    from emorph_deploy.engines.trt import load_tensorrt

    return load_tensorrt("tensorrt-rtx")
