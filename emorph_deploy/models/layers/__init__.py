"""Building blocks of EfficientMorph (one concept per module)."""

from __future__ import annotations

from emorph_deploy.models.layers.block import PlaneBlock
from emorph_deploy.models.layers.cascade import CascadeStage
from emorph_deploy.models.layers.cascaded_attention import CascadedGroupPlaneAttention
from emorph_deploy.models.layers.conv_block import ConvBlock3d
from emorph_deploy.models.layers.drop_path import DropPath
from emorph_deploy.models.layers.full_res import FullResStage
from emorph_deploy.models.layers.mlp import Mlp
from emorph_deploy.models.layers.patch_embed import PatchEmbed3D
from emorph_deploy.models.layers.patch_merging import PatchMerging3D
from emorph_deploy.models.layers.plane_attention import PlaneAttention, plane_attention, plane_permutation
from emorph_deploy.models.layers.position import SinusoidalPositionEncoding3D, sinusoidal_encoding_3d

__all__ = [
    "CascadeStage",
    "CascadedGroupPlaneAttention",
    "ConvBlock3d",
    "DropPath",
    "FullResStage",
    "Mlp",
    "PatchEmbed3D",
    "PatchMerging3D",
    "PlaneAttention",
    "PlaneBlock",
    "SinusoidalPositionEncoding3D",
    "plane_attention",
    "plane_permutation",
    "sinusoidal_encoding_3d",
]
