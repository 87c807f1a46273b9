"""A tiny registration-shaped ONNX for fast tests and smoke checks of the engine toolchain.

Same I/O contract as an emorph export (``moving``, ``fixed`` -> ``warped``, ``flow``) and the same op
families: Conv3d stem on cat(moving, fixed), LayerNorm + single-head attention (MatMul, Softmax), Conv, a Conv
flow head and the gather-form trilinear warp (opset 17, no GridSample). Builds with TensorRT-RTX in about a
second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _gather_warp(src: Any, flow: Any) -> Any:
    import torch

    b, c, d, h, w = src.shape
    gd, gh, gw = torch.meshgrid(
        torch.arange(d, dtype=torch.float32),
        torch.arange(h, dtype=torch.float32),
        torch.arange(w, dtype=torch.float32),
        indexing="ij",
    )
    z, y, x = gd + flow[:, 0], gh + flow[:, 1], gw + flow[:, 2]  # (B, D, H, W)
    z0, y0, x0 = torch.floor(z), torch.floor(y), torch.floor(x)
    fz, fy, fx = z - z0, y - y0, x - x0
    flat = src.reshape(b, c, d * h * w)
    out = torch.zeros_like(src)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                zi, yi, xi = z0 + dz, y0 + dy, x0 + dx
                wt = (fz if dz else 1 - fz) * (fy if dy else 1 - fy) * (fx if dx else 1 - fx)
                valid = (zi >= 0) & (zi <= d - 1) & (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
                idx = (zi.clamp(0, d - 1) * (h * w) + yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long()
                v = torch.gather(flat, 2, idx.reshape(b, 1, -1).expand(b, c, -1)).reshape(b, c, d, h, w)
                out = out + v * (wt * valid.to(src.dtype)).unsqueeze(1)
    return out


def tiny_model(width: int = 8, seed: int = 0) -> Any:
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv3d(2, width, 3, padding=1)
            self.norm = nn.LayerNorm(width)
            self.qkv = nn.Linear(width, 3 * width, bias=False)
            self.proj = nn.Linear(width, width)
            self.conv = nn.Conv3d(width, width, 3, padding=1)
            self.flow_head = nn.Conv3d(width, 3, 3, padding=1)

        def forward(self, moving: Any, fixed: Any) -> tuple[Any, Any]:
            x = self.stem(torch.cat([moving, fixed], 1))  # (B, C, D, H, W)
            b, c, d, h, w = x.shape
            t = x.flatten(2).transpose(1, 2)  # (B, N, C)
            q, k, v = self.qkv(self.norm(t)).chunk(3, -1)
            a = torch.softmax(q @ k.transpose(1, 2) / c**0.5, -1)
            t = t + self.proj(a @ v)
            x = t.transpose(1, 2).reshape(b, c, d, h, w)
            flow = self.flow_head(nn.functional.leaky_relu(self.conv(x), 0.01))  # (B, 3, D, H, W) voxels
            return _gather_warp(moving, flow), flow

    torch.manual_seed(seed)
    return Tiny().eval()


def tiny_registration_onnx(
    path: str | Path,
    grid: tuple[int, int, int] = (8, 8, 8),
    width: int = 8,
    manifest: bool = True,
    seed: int = 0,
) -> Path:
    """Write ``path`` (opset 17, legacy exporter) and, if ``manifest``, its emorph-onnx/1 manifest."""
    import json
    import warnings

    import torch

    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.fileio import sha256_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = tiny_model(width, seed)
    ex = (torch.rand(1, 1, *grid), torch.rand(1, 1, *grid))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            ex,
            str(path),
            input_names=["moving", "fixed"],
            output_names=["warped", "flow"],
            opset_version=17,
            dynamo=False,
        )
    if manifest:
        shape5 = [1, 1, *grid]
        meta = {
            "format": "emorph-onnx/1",
            "name": path.stem,
            "model": {"name": "tiny-test", "img_size": list(grid)},
            "preprocessing": Preprocessing(grid_shape=grid).to_dict(),
            "grid_shape": list(grid),
            "spacing_mm": [1.0, 1.0, 1.0],
            "orientation": "RAS",
            "opset": 17,
            "exporter": "torch legacy",
            "grid_sample": "gather",
            "precision": "fp32",
            "inputs": [{"name": n, "shape": shape5, "dtype": "float32"} for n in ("moving", "fixed")],
            "outputs": [
                {"name": "warped", "shape": shape5, "dtype": "float32"},
                {"name": "flow", "shape": [1, 3, *grid], "dtype": "float32"},
            ],
            "sha256_weights": None,
            "sha256_onnx": sha256_file(path),
            "package_version": "test",
            "source_checkpoint": None,
        }
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return path
