"""Training/validation datasets from NIfTI folders or CSVs (wrapping :mod:`emorph_deploy.data.datasets`).

The training set is "virtual": ``steps_per_epoch × batch × world`` items per epoch; item ``i`` is pair
``i mod n`` of the pairing drawn for round ``i div n`` of the epoch, so every epoch visits every subject and
any iteration count works. Pairs are a deterministic function of (seed, epoch, index), which makes
``--resume`` exact.
"""

from __future__ import annotations

from typing import Any

import torch

from emorph_deploy.errors import InputError

__all__ = ["RepeatedPairs", "build_file_datasets", "validation_pairs"]


class RepeatedPairs(torch.utils.data.Dataset):
    """``length`` items cycling over a PairDataset, re-drawing inter-subject partners every pass."""

    def __init__(self, inner: Any, length: int) -> None:
        self.inner = inner
        self.length = int(length)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        if not 0 <= index < self.length:
            raise IndexError(index)
        n = len(self.inner)
        rnd = index // n
        key = int(epoch) * 100_003 + rnd
        if self.inner.epoch != key:
            self.inner.set_epoch(key)
        item = self.inner[index % n]
        item["index"] = int(index)
        return item


def validation_pairs(
    val_items: list[Any], train_items: list[Any], pre: Any, seed: int, atlas: str | None, n_pairs: int
) -> Any:
    """Fixed validation pairs: consecutive validation subjects (or atlas → subject); a lone validation subject
    is paired with a training subject."""
    from emorph_deploy.data.datasets import PairDataset, PairSpec, Subject

    if not val_items:
        return None
    if isinstance(val_items[0], PairSpec):
        return PairDataset((), pre, pairs=val_items[:n_pairs], seed=seed)
    if atlas is not None:
        return PairDataset(val_items[:n_pairs], pre, atlas=atlas, seed=seed)
    subjects: list[Subject] = list(val_items)
    if len(subjects) >= 2:
        pairs = [
            PairSpec(fixed=subjects[i], moving=subjects[(i + 1) % len(subjects)])
            for i in range(min(n_pairs, len(subjects)))
        ]
    else:
        pairs = [PairSpec(fixed=subjects[0], moving=train_items[0])]
    return PairDataset((), pre, pairs=pairs, seed=seed)


def split_items(cfg: Any) -> tuple[list[Any], list[Any], list[Any]]:
    """(subjects, train items, val items) of ``cfg.data`` with the seeded validation split."""
    from emorph_deploy.data.datasets import discover, split_subjects

    subjects, pairs = discover(cfg.data)
    items = subjects or pairs
    if cfg.val_pairs > 0 and cfg.val_fraction > 0 and len(items) >= 2:
        train_items, val_items = split_subjects(items, cfg.val_fraction, cfg.seed)
    else:
        train_items, val_items = list(items), []
    return subjects, train_items, val_items


def default_steps_per_epoch(cfg: Any, world_size: int = 1) -> int:
    """One pass over the training subjects (or explicit pairs) per epoch."""
    _, train_items, _ = split_items(cfg)
    return max(1, -(-len(train_items) // (cfg.batch_size * world_size)))


def build_file_datasets(cfg: Any, pre: Any, world_size: int = 1) -> tuple[Any, Any]:
    """(train, val) datasets from ``cfg.data`` (folder or CSV) with a seeded validation split."""
    from emorph_deploy.data.datasets import PairDataset

    subjects, train_items, val_items = split_items(cfg)
    if not train_items:
        raise InputError(
            f"dataset {cfg.data}: expected training volumes, got an empty training split; "
            f"fix: add volumes or lower --val-fraction"
        )
    if subjects:
        if cfg.atlas is None and len(train_items) < 2:
            raise InputError(
                f"dataset {cfg.data}: expected at least 2 training volumes for inter-subject "
                f"pairs, got {len(train_items)}; fix: add volumes or pass --atlas"
            )
        inner = PairDataset(train_items, pre, atlas=cfg.atlas, seed=cfg.seed)
    else:
        inner = PairDataset((), pre, pairs=train_items, seed=cfg.seed)
    # fail early, in the main process, on unreadable/invalid volumes of the first pair (one clear line)
    inner[0]
    n_train = cfg.steps_per_epoch * cfg.batch_size * world_size
    train_ds = RepeatedPairs(inner, n_train)
    val_ds = validation_pairs(val_items, train_items, pre, cfg.seed, cfg.atlas, cfg.val_pairs)
    if val_ds is not None:
        val_ds[0]
    return train_ds, val_ds
