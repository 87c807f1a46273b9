"""The registration defaults, in one place: ``emorph register``/``emorph demo``'s options, batch mode and the
embeddable :class:`~emorph_deploy.registration.Registrar` all take their default values from
:data:`DEFAULTS`, so the command line and the API cannot drift apart.

Torch- and numpy-free: the CLI imports it at start-up to show the defaults in ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from emorph_deploy.choices import Similarity

if TYPE_CHECKING:
    from emorph_deploy.refine import RefineConfig

__all__ = ["DEFAULTS", "MAX_GRAD_SIGMA", "MAX_PASSES", "RegistrationDefaults"]


#: Largest refinement gradient smoothing accepted (``--refine-grad-sigma``, voxels of the level): beyond a
#: few voxels the steps stop following the image at all, so larger values are typing mistakes.
MAX_GRAD_SIGMA = 5.0

#: Most network passes accepted (``--passes``): each pass costs one inference, and the gain shrinks with
#: every pass (see the model card), so larger values are typing mistakes.
MAX_PASSES = 4


@dataclass(frozen=True)
class RegistrationDefaults:
    """Every user-facing registration default.

    ``affine``: the affine pre-alignment runs first (``--no-affine`` only for inputs already in one space).
    ``match_contrast`` (``--match-contrast/--no-match-contrast``): a pair found in different contrasts is
    registered with the moving image mapped to the fixed image's contrast
    (:mod:`emorph_deploy.contrast`).
    ``passes`` (``--passes``): network passes; pass k > 1 registers the moving image warped by the flow so far
    to the fixed image and composes its flow (a cascade of the same network).
    ``refine_steps`` (``--refine``): test-time refinement steps; ``refine_similarity``, ``refine_levels``,
    ``refine_full_steps``, ``refine_fold_weight`` and ``refine_grad_sigma``: how they run
    (:class:`~emorph_deploy.refine.RefineConfig`, whose own defaults are these). ``qc_png`` / ``voxel_flow``:
    the optional outputs written by default.
    """

    affine: bool = True
    # the moving image mapped to the fixed image's contrast (median fixed intensity per moving intensity, pre-
    # aligned) when the two differ, for the network and the refinement; the outputs still warp the moving
    # image as given
    match_contrast: bool = True
    # one pass: on the validation suite's real pairs a second pass adds ~0.02 Dice to the network alone but
    # only ~0.002 after the default refinement, for one more inference (benchmarks/validation_suite.py);
    # on synthetic pairs like the training data it over-deforms and lowers Dice
    passes: int = 1
    # chosen by measurement (benchmarks/default_settings.py): the best real-pair Dice with network +
    # refinement within ~1 s and J <= 0 below 0.1 %; full-resolution steps add Dice but fold more
    refine_steps: int = 5
    refine_similarity: Similarity = Similarity.auto
    refine_levels: int = 2  # 2: the steps at half resolution first (1/8 of the voxels per step)
    # with levels=2: steps at full resolution (None = refine_steps); on skull-stripped brains full-resolution
    # steps pay more than half-resolution ones: 5 half + 2 full cost a little more than 10 half + 1 full and
    # score higher (benchmarks/results/default_settings.md; heads gain from more half steps, see the card)
    refine_full_steps: int | None = 2
    # the folding penalty's weight: it cuts J <= 0 several-fold at a Dice cost in the third decimal; much
    # larger weights (~100) dominate Adam's normalised steps and fold more, not less (see the model card)
    refine_fold_weight: float = 10.0
    # the Gaussian (voxels of each level) that smooths every refinement step's gradient before Adam: on the
    # validation suite's real pairs it raised Dice in both contrasts at equal folding (see the model card)
    refine_grad_sigma: float = 0.7
    qc_png: bool = True
    voxel_flow: bool = False

    def refine_config(
        self, steps: int | None = None, similarity: Any = None, **overrides: Any
    ) -> RefineConfig:
        """The :class:`~emorph_deploy.refine.RefineConfig` of these defaults (``steps``/``similarity``/any
        other field overridden when given); imports torch."""
        from emorph_deploy.refine import RefineConfig

        fields: dict[str, Any] = {
            "steps": self.refine_steps if steps is None else int(steps),
            "similarity": self.refine_similarity if similarity is None else similarity,
            "levels": self.refine_levels,
            "full_steps": self.refine_full_steps,
            "fold_weight": self.refine_fold_weight,
            "grad_sigma": self.refine_grad_sigma,
        }
        fields.update(overrides)  # e.g. full_steps from --refine-full-steps
        return RefineConfig.coerce(RefineConfig(**fields))


#: The defaults every entry point uses.
DEFAULTS = RegistrationDefaults()
