"""PyTorch eager runner from an emorph checkpoint (``.safetensors``/``.json``/stem): the reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from emorph_deploy.errors import InputError
from emorph_deploy.runners.base import FLOW, WARPED, Runner


class TorchRunner(Runner):
    """Run an EfficientMorph checkpoint in PyTorch (CPU by default), fp32.

    ``sampler`` overrides the warp sampler ("grid_sample"|"gather"); ``threads`` sets
    ``torch.set_num_threads``.
    """

    name = "torch"

    def __init__(
        self,
        checkpoint: str | Path,
        device: str = "cpu",
        threads: int | None = None,
        sampler: str | None = None,
    ) -> None:
        super().__init__()
        import torch

        from emorph_deploy.export.loaders import (
            config_dict_of,
            grid_shape_of,
            load_model_from_checkpoint,
            set_sampler,
        )

        if threads is not None:
            if int(threads) < 1:
                raise InputError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(int(threads))
        self.artifact = Path(checkpoint)
        model, meta = load_model_from_checkpoint(checkpoint)
        if sampler is not None:
            set_sampler(model, sampler)
        self._device = torch.device(device)
        self._model = model.to(self._device).eval()
        self._grid_shape = grid_shape_of(model)
        self._output_names = (FLOW, WARPED)
        cfg = config_dict_of(model, meta, sampler)
        self._meta: dict[str, Any] = {
            "format": meta.get("format"),
            "model": cfg,
            "preprocessing": meta.get("preprocessing"),
            "precision": "fp32",
            "source_checkpoint": str(self.artifact),
            "sha256_weights": meta.get("sha256_weights"),
            "backend": f"torch {torch.__version__} ({self._device})",
        }

    @property
    def model(self):
        return self._model

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            moving = torch.from_numpy(feed["moving"]).to(self._device)
            fixed = torch.from_numpy(feed["fixed"]).to(self._device)
            warped, flow = self._model(moving, fixed)  # (1, 1, D, H, W), (1, 3, D, H, W)
            return {FLOW: flow.cpu().numpy(), WARPED: warped.cpu().numpy()}
