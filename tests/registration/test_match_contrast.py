"""The Registrar's contrast-matching stage (emorph_deploy.contrast applied before the network), with a stub
runner on a 32³ template pair."""

from __future__ import annotations

import numpy as np
import torch

torch.set_num_threads(1)


def test_registrar_matches_contrast_only_when_it_differs(inverted_brain, stub_runner):
    """With matching on, an inverted pair is matched (the network sees the matched image, qc.json says so),
    a same-contrast pair is not; with it off qc.json's ``contrast`` is None. Outputs warp the moving image
    as given (zero flow: the warped image equals the input, not the matched one)."""
    brain = inverted_brain
    from emorph_deploy.registration import Registrar

    class Recorder(stub_runner):
        def _infer(self, feed):
            self.seen = feed["moving"].copy()
            return super()._infer(feed)

    a = np.diag([4.0, 4.0, 4.0, 1.0])
    fixed = (brain["fixed"].numpy(), a)
    inverted = (brain["inverted"].numpy(), a)
    same = (brain["moving"].numpy(), a)
    runner = Recorder(np.zeros((3, 32, 32, 32), np.float32), spacing=4.0)
    reg = Registrar(runner, affine=False, warmup=False)
    res = reg.register(fixed, inverted, refine=2)
    contrast = res.qc["contrast"]
    assert contrast["matched"] is True and contrast["r"] < 0
    assert contrast["relation"] == "inverted" and contrast["map"] == "inversion"
    # the inversion map restores a same-contrast image: refinement judges it as such (NCC)
    assert res.qc["refine"]["similarity_requested"] == "auto"
    assert res.qc["refine"]["similarity"] == "ncc"
    assert res.qc["refine"]["contrast"]["same_contrast"] is True
    seen = runner.seen[0, 0]
    inside = brain["inside"].numpy()
    assert np.corrcoef(seen[inside], brain["moving"].numpy()[inside])[0, 1] > 0.8  # matched (input: r < 0)
    res0 = reg.register(fixed, inverted, refine=0)
    warped = np.asanyarray(res0.warped.dataobj)
    assert np.corrcoef(warped[inside], brain["inverted"].numpy()[inside])[0, 1] > 0.99  # as given
    assert reg.register(fixed, same, refine=0).qc["contrast"]["matched"] is False
    off = Registrar(runner, affine=False, warmup=False, match_contrast=False)
    assert off.register(fixed, inverted, refine=0).qc["contrast"] is None
    assert np.array_equal(runner.seen[0, 0] > 0, seen > 0) and not np.allclose(runner.seen[0, 0], seen)


def test_the_map_goes_through_the_native_voxels(stub_runner):
    """A T2-like head (dark inside, a bright 6 mm rim) on a 2 mm grid against a T1-like one on the 4 mm model
    grid: mapped before resampling, the rim's partial-volume voxels come out as dark as the T1 head's own
    (mean |difference| < 0.05 on the ring); mapped after it, its blend with the background would be mapped
    as mid-grey tissue (0.16 when measured)."""
    from emorph_deploy.registration import Registrar

    n = 64
    grid = np.mgrid[:n, :n, :n].astype(np.float32) - (n - 1) / 2
    r_mm = np.sqrt((grid**2).sum(axis=0)) * 2.0
    rng = np.random.default_rng(0)

    def head(inside, rim):
        img = np.where(r_mm < 40, inside, 0.0) + np.where((r_mm >= 40) & (r_mm < 46), rim, 0.0)
        return np.clip(img + np.where(r_mm < 46, 0.05 * rng.standard_normal(r_mm.shape), 0), 0, None)

    t2, t1 = head(0.3, 1.0).astype(np.float32), head(1.0, 0.3).astype(np.float32)
    a2 = np.diag([2.0, 2.0, 2.0, 1.0])
    a2[:3, 3] = -(n - 1)
    a4 = np.diag([4.0, 4.0, 4.0, 1.0])
    a4[:3, 3] = -(n // 2 - 1) * 2.0  # the same centre
    fixed = t1.reshape(32, 2, 32, 2, 32, 2).mean(axis=(1, 3, 5))

    class Recorder(stub_runner):
        def _infer(self, feed):
            self.seen = feed["moving"][0, 0].copy()
            return super()._infer(feed)

    runner = Recorder(np.zeros((3, 32, 32, 32), np.float32), spacing=4.0)
    reg = Registrar(runner, affine=False, warmup=False)
    qc = reg.register((fixed, a4), (t2, a2), refine=0).qc
    assert qc["contrast"]["map"] == "inversion"
    matched = runner.seen
    reg.register((fixed, a4), (t1, a2), refine=0)
    same = runner.seen
    r4 = np.sqrt(((np.mgrid[:32, :32, :32] - 15.5) ** 2).sum(axis=0)) * 4.0
    ring = (r4 > 42) & (r4 < 50)
    assert float(np.abs(matched[ring] - same[ring]).mean()) < 0.05


def test_a_remapped_contrast_gets_the_conditional_median(inverted_brain, stub_runner, monkeypatch):
    """A non-monotone remap (tissue order changed) is matched by the conditional-median map for the
    network; the refinement then works on the moving image *as given* with NGF (the map merges tissues, so
    the matched image lacks edges), and only a requested NCC refines the matched image."""
    brain = inverted_brain
    import emorph_deploy.refine as refine_mod
    from emorph_deploy.registration import Registrar

    seen = {}
    real = refine_mod.refine_flow

    def spy(moving, fixed, flow, **kw):
        seen["moving"], seen["similarity"] = moving[0, 0].numpy().copy(), str(kw["similarity"])
        return real(moving, fixed, flow, **kw)

    monkeypatch.setattr(refine_mod, "refine_flow", spy)

    class Recorder(stub_runner):
        def _infer(self, feed):
            self.seen = feed["moving"][0, 0].copy()
            return super()._infer(feed)

    a = np.diag([4.0, 4.0, 4.0, 1.0])
    remapped = torch.where(brain["inside"], 0.2 + 0.7 * torch.sin(8.0 * brain["moving"]) ** 2, 0.0)
    runner = Recorder(np.zeros((3, 32, 32, 32), np.float32), spacing=4.0)
    reg = Registrar(runner, affine=False, warmup=False)
    qc = reg.register((brain["fixed"].numpy(), a), (remapped.numpy(), a), refine=2).qc
    assert qc["contrast"]["relation"] == "other" and qc["contrast"]["map"] == "conditional-median"
    assert qc["refine"]["similarity"] == "ngf" and qc["refine"]["similarity_requested"] == "auto"
    assert qc["refine"]["contrast"]["refined"] == "the moving image as given"
    # the refinement saw the remapped image (normalised on the model grid and clipped at its percentiles),
    # the network the matched one
    assert np.corrcoef(seen["moving"].ravel(), remapped.numpy().ravel())[0, 1] > 0.95
    assert float(np.abs(runner.seen - seen["moving"]).max()) > 0.1

    qc = reg.register((brain["fixed"].numpy(), a), (remapped.numpy(), a), refine=reg_ncc()).qc
    assert qc["refine"]["similarity"] == "ncc" and qc["refine"]["contrast"]["refined"] == "the matched image"
    np.testing.assert_allclose(seen["moving"], runner.seen, atol=1e-6)


def reg_ncc():
    from emorph_deploy.registration.defaults import DEFAULTS

    return DEFAULTS.refine_config(steps=2, similarity="ncc")


def test_qc_after_is_the_moving_image_not_the_matched_one(inverted_brain, stub_runner):
    """A runner that returns its ``warped`` output warped what it was fed, the *matched* image: the QC's
    NCC after registration must still be the moving image as given (zero flow: equal to NCC before)."""
    brain = inverted_brain
    from emorph_deploy.registration import Registrar
    from emorph_deploy.runners.base import FLOW, WARPED

    class WarpedToo(stub_runner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._output_names = (FLOW, WARPED)

        def _infer(self, feed):
            return {**super()._infer(feed), WARPED: feed["moving"].copy()}  # zero flow: as fed

    a = np.diag([4.0, 4.0, 4.0, 1.0])
    runner = WarpedToo(np.zeros((3, 32, 32, 32), np.float32), spacing=4.0)
    reg = Registrar(runner, affine=False, warmup=False)
    qc = reg.register((brain["fixed"].numpy(), a), (brain["inverted"].numpy(), a), refine=0).qc
    assert qc["contrast"]["matched"] is True
    assert qc["ncc_before"] < 0 and abs(qc["ncc_after"] - qc["ncc_before"]) < 1e-5
