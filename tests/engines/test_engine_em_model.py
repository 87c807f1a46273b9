"""fp32, fp16 and int8 engines from a small EfficientMorph gather export (TensorRT-RTX, CPU only).

All three precisions are built from the full export (flow + warped, gather warp): the graph a TensorRT
10.x / Jetson target gets. TensorRT-RTX's compiler fuses the gather warp with the upsampled flow, which makes
these AOT builds ~50 s each on 2 cores (~4 min each when the machine is loaded); the flow-only export of the
same model builds in seconds.
"""

from __future__ import annotations

import time

import pytest

from emorph_deploy.engines import BuildOptions, build_engine


@pytest.fixture(scope="module")
def em_checkpoint(tmp_path_factory):
    import torch

    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.models import create_model
    from emorph_deploy.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    grid = (16, 16, 16)
    model = create_model(
        "em-23-hires",
        img_size=grid,
        patch_dim=6,
        embed_dims=(8, 16),
        heads=(1, 2),
        decoder_widths=(8, 4),
        skip_width=4,
    )
    tmp = tmp_path_factory.mktemp("em")
    save_checkpoint(model, tmp / "ckpt" / "em", preprocessing=Preprocessing(grid_shape=grid))
    return tmp / "ckpt" / "em.json"


def _export(checkpoint, outputs, name):
    from emorph_deploy.export.loaders import onnx_from_checkpoint

    out = checkpoint.parent.parent / "export" / f"{name}.onnx"
    if out.is_file():
        return out
    return onnx_from_checkpoint(checkpoint, out, grid_sample="gather", outputs=outputs)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("precision", "outputs"),
    [("fp32", ("flow", "warped")), ("fp16", ("flow", "warped")), ("int8", ("flow", "warped"))],
)
def test_em_model_engines(em_checkpoint, rtx, tmp_path, precision, outputs):
    name = "em-small" if len(outputs) == 2 else "em-small-flow"
    source = _export(em_checkpoint, outputs, name)
    if precision == "int8":
        from emorph_deploy.calibration import calibrate

        source = calibrate(source, synthetic=2, out_dir=tmp_path / "cal", progress=False).qdq_onnx
    elif precision == "fp16":
        pytest.importorskip("modelopt.onnx.autocast", reason="nvidia-modelopt (AutoCast) not installed")
    t0 = time.perf_counter()
    res = build_engine(source, BuildOptions(precision=precision, out_dir=str(tmp_path / "eng")), trt=rtx)
    m = res.manifest
    assert res.engine.is_file() and m["precision"] == precision and m["name"] == name
    assert m["model"]["name"] == "em-23-hires" and m["grid_sample"] == "gather"
    assert m["preprocessing"]["grid_shape"] == [16, 16, 16]
    assert sorted(o["name"] for o in m["outputs"]) == sorted(outputs)
    print(
        f"{precision} {'+'.join(outputs)}: build {m['build_seconds']:.1f} s, "
        f"total {time.perf_counter() - t0:.1f} s, {m['engine_bytes'] / 1e6:.1f} MB"
    )
