"""Test-time refinement: a few Adam steps on the displacement itself, on the training loss.

``refine_flow(moving, fixed, flow_init, steps=N)`` starts from the network's displacement (voxels of the model
grid, channel k along array axis k; see ``docs/conventions.md``) and minimises the same unsupervised loss the
model was trained on::

    loss(flow) = NCC_gaussian(warp(moving, flow), fixed; window 9, sigma 1.5) + reg_weight · diffusion(flow)

The displacement is the only optimised variable: the network is never touched (no weights change, no global
state), so consecutive pairs are independent and concurrent calls are safe. The optimisation is deterministic
on the CPU (fixed step count, no randomness). By default (``levels=2, full_steps=0``) the ``steps`` steps run
at half resolution (images average-pooled, flow halved) and the update is upsampled: a step costs ~1/8 of a
full-resolution one, and on the default model's 80×96×112 grid 20 such steps reached about the Dice of 20
half- + 20 full-resolution steps (lr 0.2 was the best of 0.1 / 0.2 / 0.4); see ``docs/model_card.md``.
``full_steps=N`` adds N full-resolution steps after the coarse level; ``levels=1`` runs at full resolution
only. Each step's gradient is smoothed by a Gaussian of ``grad_sigma`` voxels before Adam's update: Adam
normalises every voxel's step by that voxel's own gradient history, so in the first few steps it moves each
voxel by about ``lr`` in the direction of the sign of its gradient, noise included; smoothed, neighbouring
voxels step together (the update fields of Demons, SyN and greedy are smoothed for the same reason).

Across contrasts (``similarity``): local NCC's *squared* correlation is unchanged by a linear intensity map,
a negation included, but not by a remap that reorders tissues within its window (T1 vs T2/FLAIR/PD).
``similarity="mind"`` replaces it by MIND-SSC (:class:`~emorph_deploy.losses.MINDSSCLoss`: each image is
described by its own local self-similarity: the fixed descriptor once per level, the warped moving one per
step),
``"ngf"`` by normalised gradient fields (:class:`~emorph_deploy.losses.NGFLoss`: only the directions of the
edges count), and ``"auto"`` measures on the model grid whether the two images share a contrast
(:func:`contrast_agreement`: inside the common foreground, is the fixed intensity a positive, mostly *linear*
function of the moving one, and after the network with a correlation of at least ``NCC_MIN_R``?) and picks
NCC if so, NGF
otherwise (:func:`~emorph_deploy.contrast.refine_similarity`): starting from the network's flow, NGF was the
best of the three across contrasts on the validation suite (real brains with the moving contrast inverted,
synthetic pairs in independent contrasts) while MIND-SSC at the default step count barely moved off the
network's Dice (``benchmarks/default_settings.py --settings ...@mind,...@ngf``; figures in
``docs/model_card.md``). The choice and its figures are reported through ``info`` (and so in ``qc.json``'s
``refine``).

:meth:`emorph_deploy.registration.Registrar.register` calls it with ``refine=N`` (``emorph register`` /
``emorph demo --refine N`` and the default-model benchmark).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from emorph_deploy.choices import Similarity
from emorph_deploy.contrast import NCC_MIN_R, contrast_agreement, refine_similarity
from emorph_deploy.errors import InputError
from emorph_deploy.losses import MINDSSCLoss, NCCLoss, NGFLoss
from emorph_deploy.registration.defaults import DEFAULTS, MAX_GRAD_SIGMA

__all__ = [
    "RefineConfig",
    "Similarity",
    "contrast_agreement",
    "refine_flow",
    "refine_loss",
]


#: Most refinement steps accepted: refinement converges within hundreds of steps, and each step costs about
#: one forward and backward pass of the similarity, so far larger counts are typing mistakes.
MAX_REFINE_STEPS = 10_000


def _check_fold_weight(weight: Any) -> None:
    """InputError unless ``weight`` is a finite real number >= 0."""
    if not (isinstance(weight, numbers.Real) and 0 <= weight < float("inf")):
        raise InputError(
            f"refine: expected a finite fold_weight >= 0, got {weight!r}; fix: use 0 (off) or e.g. 10"
        )


def _check_grad_sigma(sigma: Any) -> None:
    """InputError unless ``sigma`` is a real number in [0, MAX_GRAD_SIGMA]."""
    if not (isinstance(sigma, numbers.Real) and 0 <= sigma <= MAX_GRAD_SIGMA):
        raise InputError(
            f"refine: expected grad_sigma in [0, {MAX_GRAD_SIGMA:g}] voxels, got {sigma!r}; fix: use 0 (off) "
            "or e.g. 0.7"
        )


@dataclass(frozen=True)
class RefineConfig:
    """Settings of the test-time refinement. ``lr`` is Adam's step size in voxels. ``steps=0`` is "off";
    the user-facing defaults (steps, levels, similarity) live in
    :class:`~emorph_deploy.registration.defaults.RegistrationDefaults`
    (:meth:`~emorph_deploy.registration.defaults.RegistrationDefaults.refine_config`)."""

    steps: int = 0
    lr: float = 0.2
    reg_weight: float = 1.0
    ncc_window: int = 9
    ncc_sigma: float = 1.5
    levels: int = DEFAULTS.refine_levels
    full_steps: int | None = DEFAULTS.refine_full_steps  # levels=2: steps at full resolution (None = steps)
    similarity: Similarity | str = DEFAULTS.refine_similarity  # auto: NCC for same contrast, NGF across
    fold_weight: float = DEFAULTS.refine_fold_weight  # × FoldingLoss (det(I + ∇u) below 0.05); 0 = off
    grad_sigma: float = DEFAULTS.refine_grad_sigma  # Gaussian smoothing of each step's gradient (voxels)

    def __post_init__(self) -> None:
        object.__setattr__(self, "similarity", Similarity.coerce(self.similarity))
        _check_fold_weight(self.fold_weight)
        _check_grad_sigma(self.grad_sigma)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["similarity"] = Similarity.coerce(self.similarity).value
        return d

    @classmethod
    def coerce(cls, refine: int | RefineConfig | None) -> RefineConfig:
        """``N`` → ``RefineConfig(steps=N)``; a config is returned as is; ``None`` → no refinement."""
        if isinstance(refine, cls):
            cfg = refine
        else:
            cfg = cls(steps=int(refine or 0))
        if not 0 <= cfg.steps <= MAX_REFINE_STEPS:
            raise InputError(
                f"refine: expected 0..{MAX_REFINE_STEPS} steps, got {cfg.steps}; fix: pass e.g. --refine 20"
            )
        return cfg


class _Objective:
    """One similarity as refinement uses it: ``target`` once per level (what the fixed image contributes),
    ``loss`` per step on the warped moving image."""

    def __init__(self, similarity: Similarity, ncc_window: int, ncc_sigma: float, device: torch.device):
        self.similarity = similarity
        if similarity is Similarity.ncc:
            self._loss: torch.nn.Module = NCCLoss(window=ncc_window, sigma=ncc_sigma, kind="gaussian")
        elif similarity is Similarity.mind:
            self._loss = MINDSSCLoss()
        elif similarity is Similarity.ngf:
            self._loss = NGFLoss()
        else:  # pragma: no cover - resolved by refine_flow
            raise InputError(f"refine similarity: expected a resolved similarity, got {similarity!r}")
        self._loss = self._loss.to(device)

    def target(self, fixed: torch.Tensor) -> Any:
        """What ``loss`` compares against: the fixed image's MIND descriptor, NCC statistics or NGF
        gradient, computed once per level."""
        with torch.no_grad():
            if self.similarity is Similarity.mind:
                return self._loss.descriptor(fixed)  # type: ignore[operator]
            return self._loss.prepare(fixed)  # type: ignore[operator]

    def loss(self, warped: torch.Tensor, target: Any, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The dissimilarity; with ``weight`` (1, 1, D, H, W) in [0, 1] (the fixed mask) its weighted mean
        over the voxels instead of the plain mean."""
        if self.similarity is Similarity.mind:
            # the descriptor of the *warped* image: warping the moving descriptor instead (cheaper) raised
            # the loss at the true deformation on the noisy template pairs (interpolation changes MIND)
            desc = self._loss.descriptor(warped)  # type: ignore[operator]
            if weight is None:
                return MINDSSCLoss.distance(desc, target)
            return _weighted_mean(MINDSSCLoss.distance_map(desc, target), weight)
        if self.similarity is Similarity.ncc:
            sim = self._loss.local_cc_to(warped, target)  # type: ignore[operator]
        else:
            sim = self._loss.cos2_to(warped, target)  # type: ignore[operator]
        return 1.0 - (sim.mean() if weight is None else _weighted_mean(sim, weight))


def _weighted_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (1, C, D, H, W) weighted per voxel by ``weight`` (1, 1, D, H, W)."""
    return (x * weight).sum() / (weight.sum() * x.shape[1]).clamp_min(1e-6)


def _check_inputs(moving: torch.Tensor, fixed: torch.Tensor, flow: torch.Tensor) -> None:
    if moving.dim() != 5 or moving.shape[:2] != (1, 1) or moving.shape != fixed.shape:
        raise InputError(
            f"refine: expected moving and fixed of shape (1, 1, D, H, W), got {tuple(moving.shape)} and "
            f"{tuple(fixed.shape)}; fix: pass images on the model grid with batch and channel axes"
        )
    if flow.shape != (1, 3, *moving.shape[2:]):
        raise InputError(
            f"refine: expected flow_init of shape (1, 3, {', '.join(map(str, moving.shape[2:]))}), got "
            f"{tuple(flow.shape)}; fix: pass the model's (1, 3, D, H, W) voxel displacement"
        )


def refine_loss(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    flow: torch.Tensor,
    reg_weight: float = RefineConfig.reg_weight,
    ncc_window: int = RefineConfig.ncc_window,
    ncc_sigma: float = RefineConfig.ncc_sigma,
) -> torch.Tensor:
    """The training loss of one direction: Gaussian NCC of the warped moving image + λ·diffusion (scalar)."""
    from emorph_deploy.losses import DiffusionLoss
    from emorph_deploy.models.warp import warp

    ncc = NCCLoss(window=ncc_window, sigma=ncc_sigma, kind="gaussian").to(flow.device)  # the training loss
    return ncc(warp(moving, flow), fixed) + reg_weight * DiffusionLoss()(flow)


class _Adam:
    """Adam (Kingma & Ba; torch.optim.Adam's defaults: betas 0.9 / 0.999, eps 1e-8, bias-corrected) on one
    tensor. Written out because ``torch.optim.Adam()`` imports ``torch._dynamo`` on first use, about 1 s
    that every one-shot ``emorph register`` paid inside its refinement stage."""

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999)):
        self.param, self.lr, self.betas, self.eps, self.t = param, lr, betas, 1e-8, 0
        self.m = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.v = torch.zeros_like(param, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self) -> None:
        g = self.param.grad
        b1, b2 = self.betas
        self.t += 1
        self.m.lerp_(g, 1.0 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        denom = (self.v.sqrt() / (1.0 - b2**self.t) ** 0.5).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-self.lr / (1.0 - b1**self.t))


def _optimise(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    flow0: torch.Tensor,
    steps: int,
    lr: float,
    reg_weight: float,
    objective: _Objective,
    losses: list[float] | None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    weight: torch.Tensor | None = None,
    fold_weight: float = 0.0,
    grad_sigma: float = 0.0,
) -> torch.Tensor:
    from emorph_deploy.losses import DiffusionLoss, FoldingLoss, gaussian_smoothing
    from emorph_deploy.models.warp import warp

    folding = FoldingLoss()
    smooth = gaussian_smoothing(grad_sigma)
    flow = flow0.detach().clone().requires_grad_(True)
    if steps == 0:
        return flow.detach()
    target = objective.target(fixed)  # once per level
    adam = _Adam(flow, lr)
    fold = fold_weight > 0 and min(flow.shape[2:]) >= 3
    for step in range(1, steps + 1):
        flow.grad = None
        loss = objective.loss(warp(moving, flow), target, weight)
        loss.backward()  # autograd for the similarity only: the penalties' gradients are closed-form
        with torch.no_grad():
            value, grad = DiffusionLoss.value_and_grad(flow)
            loss = loss.detach() + reg_weight * value
            flow.grad.add_(grad, alpha=reg_weight)
            if fold:
                value, grad = folding.value_and_grad(flow)
                loss += fold_weight * value
                flow.grad.add_(grad, alpha=fold_weight)
            # neighbouring voxels step together: per-voxel Adam on a raw gradient is close to a sign step
            # of lr everywhere after a few steps, noise included (grad_sigma 0: the identity)
            flow.grad = smooth(flow.grad)
        adam.step()
        if losses is not None:
            losses.append(float(loss.detach()))
        if callback is not None:
            callback(step, flow.detach().clone())
    return flow.detach()


def refine_flow(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    flow_init: torch.Tensor,
    steps: int = 20,
    lr: float = RefineConfig.lr,
    reg_weight: float = RefineConfig.reg_weight,
    ncc_window: int = RefineConfig.ncc_window,
    *,
    ncc_sigma: float = RefineConfig.ncc_sigma,
    levels: int = RefineConfig.levels,
    full_steps: int | None = RefineConfig.full_steps,
    similarity: Similarity | str = "ncc",
    fold_weight: float = RefineConfig.fold_weight,
    grad_sigma: float = RefineConfig.grad_sigma,
    losses: list[float] | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    info: dict[str, Any] | None = None,
    fixed_mask: torch.Tensor | None = None,
    warped_init: torch.Tensor | None = None,
    network_init: bool = True,
) -> torch.Tensor:
    """Refine a voxel displacement by ``steps`` Adam steps on a similarity (NCC) + ``reg_weight`` · diffusion
    + ``fold_weight`` · folding penalty.

    Args:
        moving, fixed: (1, 1, D, H, W) float images in [0, 1] on the model grid.
        flow_init: (1, 3, D, H, W) voxel displacement (e.g. the network's output; zeros for plain
            optimisation).
        steps: Adam steps per level; 0 returns ``flow_init`` unchanged (a detached copy).
        lr: Adam step size (voxels per step, roughly).
        reg_weight, ncc_window, ncc_sigma: the training loss (defaults: the default model's training).
        levels: 1 = full resolution only; 2 = ``steps`` at half resolution, then ``full_steps`` at full (grids
            smaller than twice the NCC window in any axis skip the coarse level).
        full_steps: steps at full resolution when ``levels=2`` (default 0: the coarse level only, its
            displacement update trilinearly upsampled; ``None`` = ``steps``).
        similarity: ``"ncc"`` (the training loss), ``"ngf"`` (normalised gradient fields, across
            contrasts), ``"mind"`` (MIND-SSC) or ``"auto"`` (NCC if :func:`contrast_agreement` of the moving
            image warped by ``flow_init`` and the fixed image says same contrast and, after a network
            (``network_init``), its ``r`` reaches :data:`~emorph_deploy.contrast.NCC_MIN_R`, else NGF).
        fold_weight: weight of :class:`~emorph_deploy.losses.FoldingLoss` (``mean(relu(0.05 − det J))``):
            it acts only where a voxel is close to folding, so it lowers the share of J ≤ 0 without the
            smoothing a larger ``reg_weight`` brings; 0 = off (the plain objective).
        grad_sigma: each step's gradient (similarity and penalties) is smoothed by a Gaussian of this
            standard deviation in voxels of the level before Adam's update, so that neighbouring voxels move
            together; 0 = off (the raw gradient).
        losses: if a list is given, the loss before each step is appended (all levels, in order).
        callback: called as ``callback(k, flow)`` after full-resolution step k (1-based) with a detached
            copy; with ``levels=1`` the flow after step k equals ``refine_flow(..., steps=k)`` (one run
            gives a whole step sweep).
        info: if a dict is given, ``similarity`` (the one used), ``similarity_requested`` and, for
            ``"auto"``, ``contrast`` (:func:`contrast_agreement`'s figures) are written into it.
        fixed_mask: (1, 1, D, H, W) weights in [0, 1] on the model grid (the fixed mask): the similarity is
            their weighted mean over the voxels (the regulariser stays global); None = all voxels alike.
        warped_init: (1, 1, D, H, W) ``moving`` already warped by ``flow_init`` (e.g. the network's own
            ``warped`` output), for ``"auto"``'s decision; None = warped here (one full-resolution warp).
        network_init: ``flow_init`` is a network's alignment, so ``"auto"``'s same-contrast verdict also
            needs ``r`` ≥ :data:`~emorph_deploy.contrast.NCC_MIN_R`; False (e.g. a zero flow): the verdict
            alone, since before any deformable alignment misalignment lowers ``r`` as much as a contrast
            change does.

    Returns a detached (1, 3, D, H, W) float32 tensor on ``flow_init``'s device. Deterministic; the inputs are
    not modified; works inside ``torch.inference_mode()`` / ``no_grad()`` callers.
    """
    if not isinstance(steps, int) or steps < 0:
        raise InputError(f"refine: expected steps >= 0, got {steps!r}; fix: pass e.g. --refine 20")
    if levels not in (1, 2):
        raise InputError(f"refine: expected levels 1 or 2, got {levels!r}; fix: pass levels=1 or 2")
    if not lr > 0:
        raise InputError(f"refine: expected a positive lr, got {lr!r}; fix: use e.g. 0.1")
    _check_fold_weight(fold_weight)
    _check_grad_sigma(grad_sigma)
    requested = Similarity.coerce(similarity)
    _check_inputs(moving, fixed, flow_init)
    if fixed_mask is not None and tuple(fixed_mask.shape) != tuple(fixed.shape):
        raise InputError(
            f"refine: expected fixed_mask of the fixed image's shape {tuple(fixed.shape)}, got "
            f"{tuple(fixed_mask.shape)}; fix: pass the mask on the model grid as (1, 1, D, H, W)"
        )
    if steps == 0:
        return flow_init.detach().clone()
    chosen = requested
    if requested is Similarity.auto:
        from emorph_deploy.models.warp import warp

        if warped_init is not None:
            if tuple(warped_init.shape) != tuple(moving.shape):
                raise InputError(
                    f"refine: expected warped_init of the moving image's shape {tuple(moving.shape)}, got "
                    f"{tuple(warped_init.shape)}; fix: pass moving warped by flow_init, or None"
                )
            warped = warped_init.float()
        else:
            with torch.no_grad():
                warped = warp(moving.float(), flow_init.float())
        min_r = NCC_MIN_R if network_init else None
        figures = {**contrast_agreement(warped, fixed), "ncc_min_r": min_r}
        chosen = refine_similarity(figures, min_r=min_r)
        if info is not None:
            info["contrast"] = figures
    if info is not None:
        info["similarity"] = chosen.value
        info["similarity_requested"] = requested.value
    with torch.inference_mode(False), torch.enable_grad():
        # clones: inference tensors from an inference_mode caller cannot be saved for backward
        mov = moving.detach().clone().float()
        fix = fixed.detach().clone().float()
        flow = flow_init.detach().clone().float()
        weight = None if fixed_mask is None else fixed_mask.detach().clone().float()
        objective = _Objective(chosen, ncc_window, ncc_sigma, flow.device)
        if levels == 2 and min(flow.shape[2:]) >= 2 * ncc_window:
            d, h, w = flow.shape[2:]
            # coarse voxel i = mean of fine voxels 2i, 2i+1 (centre at fine 2i + 0.5); displacements halve
            mov_c = F.avg_pool3d(mov, 2, ceil_mode=True)  # (1, 1, ⌈D/2⌉, ⌈H/2⌉, ⌈W/2⌉)
            fix_c = F.avg_pool3d(fix, 2, ceil_mode=True)
            flow_c0 = F.avg_pool3d(flow, 2, ceil_mode=True) / 2.0  # (1, 3, ...) coarse voxels
            weight_c = None if weight is None else F.avg_pool3d(weight, 2, ceil_mode=True)
            flow_c = _optimise(
                mov_c, fix_c, flow_c0, steps, lr, reg_weight, objective, losses,
                weight=weight_c, fold_weight=fold_weight, grad_sigma=grad_sigma,
            )  # fmt: skip
            # the same geometry back: fine x ↔ coarse (x − 0.5) / 2 (align_corners=False, scale 2)
            delta = F.interpolate(flow_c - flow_c0, scale_factor=2, mode="trilinear", align_corners=False)
            flow = flow + 2.0 * delta[..., :d, :h, :w]
            n_full = steps if full_steps is None else int(full_steps)
        else:
            n_full = steps
        out = _optimise(
            mov, fix, flow, n_full, lr, reg_weight, objective, losses, callback,
            weight=weight, fold_weight=fold_weight, grad_sigma=grad_sigma,
        )  # fmt: skip
    return out.to(flow_init.dtype)
