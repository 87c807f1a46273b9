"""Torch-free ``(str, Enum)`` choices shared by the library and the command line.

The CLI imports these at start-up, so this module imports nothing heavy (no torch, no numpy).
"""

from __future__ import annotations

from enum import Enum

from emorph_deploy.errors import InputError

__all__ = ["Similarity"]


class Similarity(str, Enum):
    """Image similarity of the refinement: ``ncc`` (the training loss, same contrast), ``mind`` (MIND-SSC,
    across contrasts), ``ngf`` (normalised gradient fields) or ``auto`` (NCC or MIND by
    :func:`emorph_deploy.refine.contrast_agreement`)."""

    ncc = "ncc"
    mind = "mind"
    ngf = "ngf"
    auto = "auto"

    @classmethod
    def coerce(cls, value: str | Similarity) -> Similarity:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise InputError(
                f"refine similarity: expected one of {choices}, got {value!r}; fix: pass e.g. "
                "similarity='auto'"
            ) from None
