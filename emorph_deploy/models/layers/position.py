"""Fixed 3D sinusoidal position encoding, precomputed as a non-persistent buffer (no parameters)."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_encoding_1d(length: int, channels: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(length, channels): [sin(p·ω_k), cos(p·ω_k)] for ω_k = 10000^(-2k/channels), k < channels/2."""
    # tiny table: always computed on the CPU (the default device may be "meta"), then moved to ``device``
    cpu = torch.device("cpu")
    pos = torch.arange(length, dtype=torch.float64, device=cpu).unsqueeze(1)  # (L, 1)
    k = torch.arange(channels // 2, dtype=torch.float64, device=cpu)
    omega = torch.exp(-math.log(10000.0) * 2.0 * k / channels)  # (channels/2,)
    ang = pos * omega  # (L, channels/2)
    table = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1).float()
    return table.to(device)


def sinusoidal_encoding_3d(
    size: tuple[int, int, int], channels_per_axis: int, total_channels: int
) -> torch.Tensor:
    """(D, H, W, total_channels): channels [0:p] encode D, [p:2p] H, [2p:3p] W; the rest are zero.

    Each axis table is zero-padded to its channel slot on the CPU, then the three are broadcast-added
    (exact: the slots do not overlap). No indexed writes; no concatenation on the target device.
    """
    d, h, w = size
    p, c = channels_per_axis, total_channels
    dev = torch.get_default_device()

    def slot(length: int, k: int) -> torch.Tensor:  # (length, C): axis table in channels [k·p, (k+1)·p)
        table = sinusoidal_encoding_1d(length, p, "cpu")
        left = torch.zeros(length, k * p, device="cpu")
        right = torch.zeros(length, c - (k + 1) * p, device="cpu")
        return torch.cat([left, table, right], dim=1).to(dev)

    pe = slot(d, 0).view(d, 1, 1, c) + slot(h, 1).view(1, h, 1, c) + slot(w, 2).view(1, 1, w, c)
    return pe.contiguous()


class SinusoidalPositionEncoding3D(nn.Module):
    """Adds a fixed (D, H, W, C) sinusoidal encoding to channels-last tokens (B, D, H, W, C)."""

    def __init__(self, size: tuple[int, int, int], channels: int, channels_per_axis: int) -> None:
        super().__init__()
        self.size = tuple(int(s) for s in size)
        self.register_buffer(
            "pe", sinusoidal_encoding_3d(self.size, channels_per_axis, channels), persistent=False
        )  # (D, H, W, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe.to(x.dtype)  # (B, D, H, W, C)
