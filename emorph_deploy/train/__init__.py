"""Training: checkpoints, the training loop (single process or DDP), evaluation."""

from __future__ import annotations

from emorph_deploy.train.checkpoint import (
    FORMAT,
    checkpoint_paths,
    load_checkpoint,
    load_checkpoint_meta,
    load_training_state,
    save_checkpoint,
    save_training_state,
)

__all__ = [
    "FORMAT",
    "checkpoint_paths",
    "load_checkpoint",
    "load_checkpoint_meta",
    "load_training_state",
    "save_checkpoint",
    "save_training_state",
]
