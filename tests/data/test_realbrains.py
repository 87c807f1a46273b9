"""The real-brain validation suite's building blocks on tiny synthetic volumes: the labelling method, the
contrast inversion, block averaging, the pair list, and the on-disk cache and its key."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from emorph_deploy.data import realbrains as rb
from emorph_deploy.errors import InputError


def _phantom(shape=(28, 30, 26), seed=0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nested ellipsoids: CSF shell (0.25), GM shell (0.55), WM core (0.9) + noise; (image, mask, truth)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(0))
    truth = np.zeros(shape, np.int16)
    truth[r < 0.9] = 1
    truth[r < 0.75] = 2
    truth[r < 0.5] = 3
    img = np.choose(truth, [0.0, 0.25, 0.55, 0.9]).astype(np.float32)
    img += rng.normal(0, 0.03, shape).astype(np.float32) * (truth > 0)
    return img, truth > 0, truth


def test_tissue_labels_recovers_classes_ordered_by_intensity() -> None:
    pytest.importorskip("ants")
    img, mask, truth = _phantom()
    labels, info = rb.tissue_labels(img, mask, (2.0, 2.0, 2.0))
    assert labels.dtype == np.int16
    assert not labels[~mask].any()  # 0 outside the mask
    for k in (1, 2, 3):  # label k is the k-th darkest class: CSF, GM, WM
        agree = (labels[truth == k] == k).mean()
        assert agree >= 0.95, (k, agree)
    means = info["class_means"]
    assert means == sorted(means) and means[0] < 0.4 < means[1] < 0.7 < means[2]


def test_tissue_labels_inverted_contrast_swaps_csf_and_wm() -> None:
    """Ordering by mean intensity: on an inverted image the brightest class (label 3) is the true CSF."""
    pytest.importorskip("ants")
    img, mask, truth = _phantom(seed=1)
    labels, _ = rb.tissue_labels(rb.invert_contrast(img, mask), mask, (2.0, 2.0, 2.0))
    assert (labels[truth == 1] == 3).mean() >= 0.95
    assert (labels[truth == 3] == 1).mean() >= 0.95


def test_invert_contrast_only_inside_mask() -> None:
    rng = np.random.default_rng(3)
    data = rng.uniform(0.0, 5.0, (10, 11, 12)).astype(np.float32)
    mask = np.zeros(data.shape, bool)
    mask[2:8, 3:9, 1:10] = True
    out = rb.invert_contrast(data, mask)
    np.testing.assert_array_equal(out[~mask], data[~mask])  # outside: bit-identical
    lo, hi = data[mask].min(), data[mask].max()
    np.testing.assert_allclose(out[mask], lo + hi - data[mask], rtol=0, atol=1e-5)
    assert out[mask].min() == pytest.approx(lo, abs=1e-5) and out[mask].max() == pytest.approx(hi, abs=1e-5)
    assert np.corrcoef(out[mask], data[mask])[0, 1] == pytest.approx(-1.0, abs=1e-6)
    assert data is not out and data[mask].min() == lo  # input untouched
    with pytest.raises(InputError):
        rb.invert_contrast(data, mask[:-1])


def test_block_average_values_and_affine() -> None:
    aff = np.array([[-1.0, 0, 0, 10], [0, 0, 1.5, -20], [0, 0.5, 0, 5], [0, 0, 0, 1]])  # zooms 1, 0.5, 1.5
    data = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6, 8, 5)
    out, new, k = rb.block_average(data, aff, 1.0)
    assert k == (1, 2, 1)
    assert out.shape == (6, 4, 5)
    np.testing.assert_allclose(out[2, 1, 3], data[2, 2:4, 3].mean())
    # new voxel (0, 0, 0) sits at the mean of the world positions of the voxels it averages
    w_old = [aff @ np.array([0, j, 0, 1.0]) for j in (0, 1)]
    np.testing.assert_allclose(new @ np.array([0, 0, 0, 1.0]), np.mean(w_old, axis=0), atol=1e-9)
    np.testing.assert_allclose(np.sqrt((new[:3, :3] ** 2).sum(0)), [1.0, 1.0, 1.5])
    same, aff2, k2 = rb.block_average(data, aff, 0.4)  # already finer than the target: unchanged
    assert k2 == (1, 1, 1) and same.shape == data.shape and np.array_equal(aff2, aff)


def test_pair_list_ordered_and_unordered() -> None:
    names = ["a", "b", "c", "d"]
    ordered = rb.pair_list(names)
    assert len(ordered) == 12 and len(set(ordered)) == 12
    assert all(f != m for f, m in ordered)
    assert all((m, f) in ordered for f, m in ordered)  # both directions
    unordered = rb.pair_list(names, ordered=False)
    assert len(unordered) == 6
    assert {frozenset(p) for p in unordered} == {frozenset(p) for p in ordered}
    assert ("a", "b") in unordered and ("b", "a") not in unordered  # the earlier subject is fixed
    with pytest.raises(InputError):
        rb.pair_list(["a", "a"])


# ---------------------------------------------------------------------------------------------- cache
def _source(tmp: Path, name: str = "toy", seed: int = 0) -> rb.Source:
    img, _, _ = _phantom(seed=seed)
    path = tmp / f"{name}.nii.gz"
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = [30.0, -12.0, 7.0]
    nib.save(nib.Nifti1Image(img * 100, aff), str(path))
    return rb.Source(name, "synthetic", "test phantom", (path,), "nonzero", lambda: rb._read3d(path))


def test_subject_key_tracks_version_params_and_content(tmp_path: Path) -> None:
    src = _source(tmp_path)
    params = {"spacing_mm": 2.0, "margin_mm": 8.0, "mrf": 0.1, "n4": True}
    k = rb.subject_key(src, params)
    assert k == rb.subject_key(src, dict(params))  # deterministic
    assert k != rb.subject_key(src, {**params, "spacing_mm": 3.0})
    assert k != rb.subject_key(src, params, version="realbrains-0")
    other = _source(tmp_path, seed=1)  # same name and path, new content
    assert rb.subject_key(other, params) != k


def test_load_suite_builds_once_then_reads_the_cache(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("ants")
    src = _source(tmp_path)
    missing = rb.Source("gone", "single subject", "absent", (tmp_path / "nope.nii.gz",), "nonzero", lambda: 0)
    kw = {"cache_dir": tmp_path / "cache", "extra_sources": {"toy": src, "gone": missing}}
    suite = rb.load_suite(["toy", "gone"], spacing_mm=2.0, **kw)
    assert suite.names() == ["toy"]
    assert "gone" in suite.skipped and "nope.nii.gz" in suite.skipped["gone"]
    s = suite.subjects[0]
    folder = s.paths["image"].parent
    assert folder.parent.name.startswith(rb.VERSION + "-") and folder.parent.parent == tmp_path / "cache"
    assert {p.name for p in folder.iterdir()} == {*rb.FILES.values(), "meta.json"}
    # processing: coarsened 1 mm -> 2 mm, centroid of the mask at world 0, brain scaled, labels 0..3
    assert s.meta["block"] == [2, 2, 2]
    mask = np.asarray(s.mask.dataobj) > 0
    centroid = s.mask.affine[:3, :3] @ np.argwhere(mask).mean(0) + s.mask.affine[:3, 3]
    np.testing.assert_allclose(centroid, 0.0, atol=1e-6)
    img = np.asarray(s.image.dataobj)
    assert not img[~mask].any() and np.percentile(img[mask], 99.9) == pytest.approx(1.0, rel=1e-3)
    assert set(np.unique(np.asarray(s.labels.dataobj))) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(
        np.asarray(s.image_inverted.dataobj), rb.invert_contrast(img, mask)
    )  # the cached inverted image is the inversion inside the mask

    def boom(*a, **k):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(rb, "_build", boom)
    again = rb.load_suite(["toy"], spacing_mm=2.0, **kw)  # no rebuild
    assert again.subjects[0].paths == s.paths
    with pytest.raises(AssertionError, match="rebuilt"):
        rb.load_suite(["toy"], spacing_mm=2.0, rebuild=True, **kw)
    assert not folder.exists()  # the failed rebuild left nothing half-made
    with pytest.raises(InputError):
        rb.load_suite(["gone"], strict=True, **kw)


def test_suite_pairs_contrasts(tmp_path: Path) -> None:
    def subj(name: str, kind: str) -> rb.Subject:
        img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
        paths = {k: tmp_path / name / f for k, f in rb.FILES.items()}
        return rb.Subject(name, kind, "", img, img, img, img, paths, {})

    subs = [subj("a", "average"), subj("b", "single subject"), subj("c", "single subject")]
    pairs = rb.suite_pairs(subs, ordered=True)
    assert len(pairs) == 12 and [p.contrast for p in pairs] == ["same"] * 6 + ["inverted"] * 6
    inv = pairs[6]
    assert inv.moving_path.name == rb.FILES["image_inverted"] and inv.name.endswith("(inv)")
    assert pairs[0].moving_path.name == rb.FILES["image"]
    assert len(rb.suite_pairs(subs, ordered=False, contrasts=("same",))) == 3
    with pytest.raises(InputError):
        rb.suite_pairs(subs, contrasts=("t2",))
