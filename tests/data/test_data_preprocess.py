"""Preprocessing: dict round trip, presets, normalisation to [0, 1], grid placement, labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emorph_deploy.data import Preprocessing, as_image, normalise_intensity
from emorph_deploy.data.orientation import fov_centre
from emorph_deploy.errors import InputError


def _image(shape=(30, 34, 28), seed=0):
    rng = np.random.default_rng(seed)
    data = np.zeros(shape, np.float32)
    data[5:-5, 6:-6, 4:-4] = rng.normal(500.0, 80.0, size=(shape[0] - 10, shape[1] - 12, shape[2] - 8))
    data[10, 10, 10] = 1e5  # hot outlier: clipped by the robust percentiles
    aff = np.array([[-1.2, 0, 0, 20.0], [0, 0, 1.1, -15.0], [0, -1.0, 0, 12.0], [0, 0, 0, 1]])
    return data, aff


def test_dict_round_trip_and_presets() -> None:
    pp = Preprocessing(grid_shape=(32, 40, 48), spacing_mm=(1.5, 1.5, 2.0), percentiles=(1.0, 99.0))
    d = pp.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Preprocessing.from_dict(json.loads(json.dumps(d))) == pp
    assert Preprocessing() == Preprocessing.preset("1mm")
    assert Preprocessing().grid_shape == (160, 192, 224)
    p2 = Preprocessing.preset("2mm")
    assert p2.grid_shape == (80, 96, 112) and p2.spacing_mm == (2.0, 2.0, 2.0)
    with pytest.raises(InputError, match="preset"):
        Preprocessing.preset("3mm")
    with pytest.raises(InputError, match="unknown"):
        Preprocessing.from_dict({**d, "bogus": 1})
    with pytest.raises(InputError, match="percentiles"):
        Preprocessing(percentiles=(99.0, 1.0))
    with pytest.raises(InputError, match="orientation"):
        Preprocessing(orientation="LPS")
    with pytest.raises(InputError, match="grid_shape"):
        Preprocessing(grid_shape=(16, 16))


def test_apply_normalises_and_places_grid() -> None:
    data, aff = _image()
    pp = Preprocessing(grid_shape=(24, 28, 32), spacing_mm=(1.5, 1.5, 1.5))
    vol = pp.apply((data, aff))
    assert vol.data.shape == (24, 28, 32) and vol.data.dtype == np.float32
    assert vol.data.min() >= 0.0 and vol.data.max() <= 1.0
    assert vol.data.max() > 0.7
    fg = data[data != 0]
    np.testing.assert_allclose(vol.intensity_range, np.percentile(fg, [0.5, 99.5]), rtol=1e-6)
    native, _, _ = pp.normalise(data)
    assert native.min() == 0.0 and native.max() == 1.0 and native[10, 10, 10] == 1.0  # outlier clipped
    assert np.mean(native[data != 0] >= 1.0) < 0.01
    np.testing.assert_allclose(fov_centre(vol.shape, vol.affine), fov_centre(data.shape, aff), atol=1e-9)
    np.testing.assert_allclose(vol.affine[:3, :3], np.diag([1.5, 1.5, 1.5]), atol=0)
    np.testing.assert_allclose(vol.source_affine, aff, atol=0)
    assert vol.source_shape == data.shape
    t = vol.tensor()
    assert tuple(t.shape) == (1, 24, 28, 32)
    # the same volume as a nibabel image gives the same result
    vol2 = pp.apply(as_image((data, aff)))
    np.testing.assert_array_equal(vol.data, vol2.data)


def test_reference_defines_grid_and_labels_nearest() -> None:
    data, aff = _image()
    ref_aff = aff.copy()
    ref_aff[:3, 3] += [5.0, -3.0, 2.0]
    pp = Preprocessing(grid_shape=(20, 20, 20), spacing_mm=(2.0, 2.0, 2.0))
    mov = pp.apply((data, aff), reference=(data, ref_aff))
    assert np.allclose(mov.affine, pp.grid_affine((data.shape, ref_aff)), atol=1e-12)
    np.testing.assert_allclose(pp.apply((data, aff), reference=mov.affine).data, mov.data, atol=0)
    labels = np.zeros(data.shape, np.int16)
    labels[data > 400] = 7
    labels[data > 600] = 300
    lab = pp.apply((labels, aff), reference=(data, ref_aff), is_label=True)
    assert lab.data.dtype == np.int32 and lab.is_label
    assert set(np.unique(lab.data)) <= {0, 7, 300}
    assert tuple(lab.tensor().shape) == (1, 20, 20, 20) and lab.tensor().dtype.is_floating_point is False


def test_normalise_intensity_edge_cases() -> None:
    binary = np.zeros((8, 8, 8), np.float32)
    binary[2:6, 2:6, 2:6] = 1.0  # nonzero percentiles coincide -> min/max fallback
    out, lo, hi = normalise_intensity(binary)
    assert (lo, hi) == (0.0, 1.0)
    np.testing.assert_array_equal(out, binary)
    neg = np.linspace(-1000, 3000, 512, dtype=np.float32).reshape(8, 8, 8)
    out, _, _ = normalise_intensity(neg, (0.0, 100.0))
    np.testing.assert_allclose([out.min(), out.max()], [0.0, 1.0], atol=1e-6)
    with pytest.raises(InputError, match="constant"):
        normalise_intensity(np.full((4, 4, 4), 3.0, np.float32))
