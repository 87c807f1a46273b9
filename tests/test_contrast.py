"""Tests for emorph_deploy.contrast: the intensity map that gives the moving image the fixed image's contrast,
the refinement similarity after it, and the Registrar stage that applies them (small volumes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emorph_deploy.choices import Similarity
from emorph_deploy.contrast import (
    NCC_MIN_R,
    IntensityMap,
    contrast_agreement,
    fit_intensity_map,
    fit_inversion_map,
)
from emorph_deploy.errors import InputError

torch.set_num_threads(1)


def test_map_recovers_a_known_intensity_relation():
    """On aligned images where fixed = g(moving) (non-monotone g), the map reproduces g to bin precision."""
    g = torch.Generator().manual_seed(0)
    moving = torch.rand(24, 24, 24, generator=g) * 0.98 + 0.02  # all foreground
    relation = lambda x: 0.2 + 0.7 * torch.sin(3.0 * x) ** 2  # noqa: E731
    fixed = relation(moving)
    imap = fit_intensity_map(moving, fixed, bins=64)
    assert len(imap.moving_levels) == 64 and list(imap.moving_levels) == sorted(imap.moving_levels)
    err = (imap(moving) - fixed).abs()
    assert float(err.mean()) < 0.005 and float(err.max()) < 0.03
    assert imap(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]  # background stays 0
    ends = imap(torch.tensor([1e-4, 5.0]))  # constant beyond the fitted levels
    assert ends.tolist() == pytest.approx([imap.fixed_levels[0], imap.fixed_levels[-1]], abs=1e-6)
    assert imap(moving[None, None]).shape == (1, 1, 24, 24, 24)
    assert IntensityMap(**imap.to_dict()) == imap  # qc/JSON round trip (lists in, tuples kept)
    with pytest.raises(InputError, match="levels"):
        IntensityMap((0.2, 0.1), (0.0, 1.0))


def test_map_resists_misaligned_voxels():
    """A third of the voxels paired with unrelated fixed intensities (what misalignment does) leave the map
    on the true relation: per bin it takes the median, which a mean would pull towards the middle."""
    g = torch.Generator().manual_seed(2)
    moving = torch.rand(24, 24, 24, generator=g) * 0.9 + 0.1
    fixed = 1.0 - moving  # an inversion
    stray = torch.rand(moving.shape, generator=g) < 1 / 3
    fixed = torch.where(stray, torch.rand(moving.shape, generator=g), fixed)
    imap = fit_intensity_map(moving, fixed)
    levels = torch.tensor(imap.moving_levels)
    assert float((torch.tensor(imap.fixed_levels) - (1.0 - levels)).abs().max()) < 0.1


def test_matching_an_inverted_brain_restores_its_contrast(inverted_brain):
    """The inverted moving image, mapped on the (unregistered) pair, agrees with the fixed contrast again and
    correlates with the original moving image; the map decreases (the inversion), the background stays 0."""
    brain = inverted_brain
    imap = fit_intensity_map(brain["inverted"], brain["fixed"])
    matched = imap(brain["inverted"])
    before = contrast_agreement(brain["inverted"], brain["fixed"])
    after = contrast_agreement(matched, brain["fixed"])
    assert not before["same_contrast"] and after["same_contrast"] and after["r"] > 0.5, (before, after)
    inside = brain["inside"]
    r_orig = np.corrcoef(matched[inside].numpy(), brain["moving"][inside].numpy())[0, 1]
    assert r_orig > 0.9
    levels = np.asarray(imap.fixed_levels)
    assert levels[:8].mean() > levels[-8:].mean() + 0.2  # dark (inverted WM) → bright, bright → dark
    assert float(matched[~inside].abs().max()) == 0.0


def test_agreement_names_the_relation(inverted_brain):
    """Same contrast, an inversion (mostly linear, decreasing) and a non-monotone remap (tissue order
    changed) are told apart; only the first counts as same contrast."""
    brain = inverted_brain
    inside = brain["inside"]
    remapped = torch.where(inside, 0.2 + 0.7 * torch.sin(8.0 * brain["moving"]) ** 2, 0.0)
    cases = {"same": brain["moving"], "inverted": brain["inverted"], "other": remapped}
    for relation, moving in cases.items():
        figures = contrast_agreement(moving, brain["fixed"])
        assert figures["relation"] == relation, (relation, figures)
        assert figures["same_contrast"] is (relation == "same")


def test_inversion_map_keeps_the_fixed_contrast_when_misaligned(inverted_brain):
    """The reverse histogram match needs no voxel-wise agreement: fitted against a fixed image shifted by
    three voxels (of 32) it still restores the original moving image (r > 0.93) with nearly the fixed image's
    spread of intensities, where the conditional median flattens towards the mean (spread and r fall)."""
    brain = inverted_brain
    inside = brain["inside"]
    fixed_spread = float(brain["fixed"][brain["fixed"] > 0].std())
    shifted = torch.roll(brain["fixed"], 3, dims=0)
    imap = fit_inversion_map(brain["inverted"], shifted)
    assert list(imap.moving_levels) == sorted(imap.moving_levels)
    assert imap.fixed_levels[0] > imap.fixed_levels[-1]  # brightest moving → darkest fixed
    matched = imap(brain["inverted"])
    median = fit_intensity_map(brain["inverted"], shifted)(brain["inverted"])
    r = np.corrcoef(matched[inside].numpy(), brain["moving"][inside].numpy())[0, 1]
    r_median = np.corrcoef(median[inside].numpy(), brain["moving"][inside].numpy())[0, 1]
    assert r > 0.93 and r > r_median + 0.1, (r, r_median)
    assert float(matched[inside].std()) > 0.85 * fixed_spread > float(median[inside].std())
    assert float(matched[~inside].abs().max()) == 0.0  # background stays 0
    with pytest.raises(InputError, match="levels"):
        fit_inversion_map(brain["inverted"], brain["fixed"], levels=1)
    with pytest.raises(InputError, match="foreground"):
        fit_inversion_map(torch.zeros(16, 16, 16), torch.rand(16, 16, 16))


def test_fit_rejects_bad_input():
    with pytest.raises(InputError, match="one shape"):
        fit_intensity_map(torch.rand(8, 8, 8), torch.rand(8, 8, 9))
    with pytest.raises(InputError, match="bins"):
        fit_intensity_map(torch.rand(16, 16, 16), torch.rand(16, 16, 16), bins=1)
    with pytest.raises(InputError, match="foreground"):
        fit_intensity_map(torch.zeros(16, 16, 16), torch.rand(16, 16, 16))


def test_refine_similarity_needs_a_linear_and_strong_correlation():
    from emorph_deploy.contrast import refine_similarity

    assert refine_similarity({"r": 0.8, "same_contrast": True}) is Similarity.ncc
    # a weak correlation passes the linearity test (r² and η² both small) but is not NCC's case
    assert refine_similarity({"r": NCC_MIN_R - 0.01, "same_contrast": True}) is Similarity.ngf
    assert refine_similarity({"r": 0.9, "same_contrast": False}) is Similarity.ngf
    # no verdict: the training loss
    assert refine_similarity({"r": None, "same_contrast": True}) is Similarity.ncc
    # from a zero flow (no network) the verdict alone decides: misalignment lowers r too
    assert refine_similarity({"r": 0.3, "same_contrast": True}, min_r=None) is Similarity.ncc
    assert refine_similarity({"r": 0.9, "same_contrast": False}, min_r=None) is Similarity.ngf
