"""EfficientMorph models, the variant registry and the 3D warp.

Public API: :class:`ModelConfig`, :func:`create_model`, :func:`list_models`, :func:`model_info`,
:class:`EfficientMorph`, and (in :mod:`emorph_deploy.models.warp`) :class:`SpatialTransformer` / :func:`warp`.
"""

from __future__ import annotations

from emorph_deploy.models.config import ModelConfig, nearest_valid_size
from emorph_deploy.models.efficientmorph import EfficientMorph, count_parameters
from emorph_deploy.models.registry import (
    DEFAULT_MODEL,
    count_macs,
    count_params,
    create_model,
    get_config,
    list_models,
    model_info,
)
from emorph_deploy.models.warp import SpatialTransformer, warp

__all__ = [
    "DEFAULT_MODEL",
    "EfficientMorph",
    "ModelConfig",
    "SpatialTransformer",
    "count_macs",
    "count_parameters",
    "count_params",
    "create_model",
    "get_config",
    "list_models",
    "model_info",
    "nearest_valid_size",
    "warp",
]
