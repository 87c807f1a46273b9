"""EfficientMorph: Hi-Res tokenisation, two plane-attention stages, conv decoder, voxel displacement head
(at D/2, upsampled; optionally plus a full-resolution residual stage, ``ModelConfig.full_res_width``, that
sees the input pair or the moving image warped by the D/2 flow, ``ModelConfig.full_res_input``, and a
cascade stage, ``ModelConfig.cascade_width``, a conv U-Net on the moving image warped by the flow so far)."""

from __future__ import annotations

import torch
from torch import nn

from emorph_deploy.errors import InputError
from emorph_deploy.models.config import ModelConfig
from emorph_deploy.models.layers import (
    CascadeStage,
    ConvBlock3d,
    FullResStage,
    PatchEmbed3D,
    PatchMerging3D,
    PlaneBlock,
    SinusoidalPositionEncoding3D,
)
from emorph_deploy.models.layers.fastpath import is_tracing, onednn_conv
from emorph_deploy.models.layers.fastpath import use_onednn as _use_onednn
from emorph_deploy.models.layers.upsample import upsample2x_trilinear
from emorph_deploy.models.warp import SpatialTransformer

_up2 = upsample2x_trilinear  # trilinear ×2, align_corners=False


class EfficientMorph(nn.Module):
    """``forward(moving, fixed) -> (warped, flow)``; inputs (B, 1, D, H, W), (D, H, W) = ``config.img_size``.

    ``flow`` is (B, 3, D, H, W) in voxels (channel k = displacement along array axis k); ``warped`` is the
    trilinear warp of ``moving`` by ``flow`` (zero padding, align_corners=True semantics).
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else ModelConfig()
        self.config = cfg
        d, h, w = cfg.img_size
        c0, c1 = cfg.embed_dims
        dec0, dec1 = cfg.decoder_widths

        # 1-2. patch-2 embedding + fixed sinusoidal position encoding (buffer)
        self.patch_embed = PatchEmbed3D(cfg.in_chans, cfg.patch_dim, patch=2)
        self.pos_enc = SinusoidalPositionEncoding3D((d // 2, h // 2, w // 2), cfg.patch_dim, cfg.pos_channels)
        # 3. Hi-Res merge to D/4
        self.hires_merge = PatchMerging3D(cfg.patch_dim, c0)
        # 4-6. stages; stochastic depth rising linearly 0 → drop_path over all blocks
        n_blocks = sum(cfg.depths)
        rates = [cfg.drop_path * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        planes = cfg.block_planes
        self.stage0 = nn.ModuleList(
            PlaneBlock(
                c0,
                cfg.heads[0],
                planes[0][i],
                (d // 4, h // 4, w // 4),
                cfg.mlp_ratio,
                rates[i],
                cfg.attention,
                cfg.qkv_bias,
            )
            for i in range(cfg.depths[0])
        )
        self.norm0 = nn.LayerNorm(c0)
        self.merge1 = PatchMerging3D(c0, c1)
        off = cfg.depths[0]
        self.stage1 = nn.ModuleList(
            PlaneBlock(
                c1,
                cfg.heads[1],
                planes[1][i],
                (d // 8, h // 8, w // 8),
                cfg.mlp_ratio,
                rates[off + i],
                cfg.attention,
                cfg.qkv_bias,
            )
            for i in range(cfg.depths[1])
        )
        self.norm1 = nn.LayerNorm(c1)
        # 7. decoder
        self.up2 = nn.Sequential(ConvBlock3d(c1 + c0, dec0), ConvBlock3d(dec0, dec0))
        self.skip_pool = nn.AvgPool3d(3, stride=2, padding=1)
        self.skip = ConvBlock3d(cfg.in_chans, cfg.skip_width)
        self.up3 = nn.Sequential(ConvBlock3d(dec0 + cfg.skip_width, dec1), ConvBlock3d(dec1, dec1))
        # 8. flow head at D/2, learns full-resolution voxel displacements directly
        self.flow_head = nn.Conv3d(dec1, 3, kernel_size=3, padding=1)
        nn.init.normal_(self.flow_head.weight, mean=0.0, std=cfg.flow_init_std)
        nn.init.zeros_(self.flow_head.bias)
        # 8b. optional full-resolution residual: the D/2 flow cannot move a boundary by less than ~2 voxels
        # independently of its neighbour; this stage sees the input pair at full resolution
        self.full_res: FullResStage | None = None
        if cfg.full_res_width > 0:
            self.full_res = FullResStage(dec1, cfg.in_chans, cfg.full_res_width, cfg.flow_init_std)
        # 8c. optional cascade: a conv U-Net on the moving image warped by the flow so far adds a correction
        self.cascade: CascadeStage | None = None
        if cfg.cascade_width > 0:
            self.cascade = CascadeStage(cfg.in_chans, dec1, cfg.cascade_width, cfg.flow_init_std)
        # 9. warp
        self.transformer = SpatialTransformer(
            cfg.img_size, mode="bilinear", sampler=cfg.warp_sampler, padding="zeros"
        )

    def _check_inputs(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        if is_tracing():  # shapes are fixed by the example inputs; no Python checks in a traced graph
            return
        size = self.config.img_size
        ok = (
            moving.dim() == 5
            and fixed.dim() == 5
            and tuple(moving.shape[2:]) == size
            and tuple(fixed.shape[2:]) == size
            and moving.shape[0] == fixed.shape[0]
            and moving.shape[1] + fixed.shape[1] == self.config.in_chans
        )
        if not ok:
            raise InputError(
                f"EfficientMorph '{self.config.name}' expects moving and fixed of shape (B, 1, {size[0]}, "
                f"{size[1]}, {size[2]}); got {tuple(moving.shape)} and {tuple(fixed.shape)}; fix: resample "
                f"to the model grid or build the model with img_size matching the input"
            )

    def forward_flow(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Displacement field (B, 3, D, H, W) in voxels (no warp)."""
        self._check_inputs(moving, fixed)
        x = torch.cat([moving, fixed], dim=1)  # (B, 2, D, H, W)
        t = self.pos_enc(self.patch_embed(x))  # (B, D/2, H/2, W/2, P)
        t = self.hires_merge(t)  # (B, D/4, H/4, W/4, C0)
        for blk in self.stage0:
            t = blk(t)
        f0 = self.norm0(t)  # (B, D/4, H/4, W/4, C0)
        t = self.merge1(f0)  # (B, D/8, H/8, W/8, C1)
        for blk in self.stage1:
            t = blk(t)
        f1 = self.norm1(t)  # (B, D/8, H/8, W/8, C1)

        # Decoder. In eager CPU inference it runs channels_last_3d (NDHWC memory, same NCDHW shapes): the
        # permuted (B, D, H, W, C) tokens already are channels-last views, trilinear upsampling, cat, oneDNN
        # conv and ConvBlock3d's norm keep that layout, and oneDNN's 3D conv needs no reorders on it. Export
        # and training see plain tensors (ONNX has no memory format, so the exported graph is the same).
        cl = _use_onednn(x)  # eager CPU float32 inference
        y = _up2(f1.permute(0, 4, 1, 2, 3))  # (B, C1, D/4, H/4, W/4)
        y = self.up2(torch.cat([y, f0.permute(0, 4, 1, 2, 3)], dim=1))  # (B, dec0, D/4, H/4, W/4)
        y = _up2(y)  # (B, dec0, D/2, H/2, W/2)
        pooled = self.skip_pool(x)  # (B, 2, D/2, H/2, W/2)
        if cl:
            pooled = pooled.contiguous(memory_format=torch.channels_last_3d)
        skip = self.skip(pooled)  # (B, skip, D/2, H/2, W/2)
        if cl:  # = up3(cat([y, skip])) without materialising the concatenation (see ConvBlock3d.forward_cat)
            y = self.up3[1](self.up3[0].forward_cat([y, skip]))  # (B, dec1, D/2, H/2, W/2)
        else:  # export/training: the original module calls (same ONNX graph and node names)
            y = self.up3(torch.cat([y, skip], dim=1))  # (B, dec1, D/2, H/2, W/2)
        if cl:  # oneDNN flow head (it falls to slow_conv3d otherwise), then back to a plain NCDHW flow
            flow = _up2(onednn_conv(self.flow_head, y).contiguous())  # (B, 3, D, H, W)
        else:
            flow = _up2(self.flow_head(y))  # (B, 3, D, H, W)
        if self.full_res is not None:
            pair = x
            if self.config.full_res_input == "warped":  # the stage sees what the D/2 flow leaves
                pair = torch.cat([self.transformer(moving, flow), fixed], dim=1)  # (B, 2, D, H, W)
            flow = flow + self.full_res(y, pair)  # (B, 3, D, H, W)
        if self.cascade is not None:  # the stage sees what the flow so far leaves
            pair = torch.cat([self.transformer(moving, flow), fixed], dim=1)  # (B, 2, D, H, W)
            flow = flow + self.cascade(pair, y)  # (B, 3, D, H, W)
        return flow

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flow = self.forward_flow(moving, fixed)  # (B, 3, D, H, W)
        warped = self.transformer(moving, flow)  # (B, 1, D, H, W)
        return warped, flow


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (all are trainable)."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["EfficientMorph", "count_parameters"]
