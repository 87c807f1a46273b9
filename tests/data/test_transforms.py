"""ITK affine files: emorph writes what SimpleITK reads (both formats) and reads what SimpleITK writes."""

from __future__ import annotations

import numpy as np
import pytest

from emorph_deploy.data.orientation import RAS_TO_LPS
from emorph_deploy.data.transforms import read_itk_affine, write_itk_affine
from emorph_deploy.errors import InputError

MATRIX = np.array([[1.1, 0.1, 0.0, 3.0], [0.0, 0.9, 0.2, -2.0], [0.05, 0.0, 1.0, 5.0], [0, 0, 0, 1.0]])


@pytest.mark.parametrize("suffix", [".mat", ".txt", ".tfm"])
def test_simpleitk_reads_what_we_write(tmp_path, suffix):
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is the ITK reader under test")
    path = write_itk_affine(tmp_path / f"a{suffix}", MATRIX)
    tx = sitk.ReadTransform(str(path))
    p_ras = np.array([10.0, -20.0, 30.0])
    got = tx.TransformPoint(tuple(RAS_TO_LPS[:3, :3] @ p_ras))
    np.testing.assert_allclose(got, RAS_TO_LPS[:3, :3] @ (MATRIX[:3, :3] @ p_ras + MATRIX[:3, 3]), atol=1e-9)
    np.testing.assert_allclose(read_itk_affine(path), MATRIX, atol=1e-12)


def test_reads_simpleitk_affine_with_centre(tmp_path):
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK writes the reference file")
    tx = sitk.AffineTransform(3)
    tx.SetMatrix((1.0, 0.2, 0.0, 0.0, 1.0, 0.0, 0.1, 0.0, 0.9))
    tx.SetTranslation((1.0, 2.0, 3.0))
    tx.SetCenter((5.0, -4.0, 7.0))
    sitk.WriteTransform(tx, str(tmp_path / "c.mat"))
    m = read_itk_affine(tmp_path / "c.mat")
    p_lps = np.array([3.0, 1.0, -2.0])
    expect = tx.TransformPoint(tuple(p_lps))
    np.testing.assert_allclose(
        RAS_TO_LPS[:3, :3] @ (m[:3, :3] @ (RAS_TO_LPS[:3, :3] @ p_lps) + m[:3, 3]), expect
    )


def test_bad_file_is_input_error(tmp_path):
    (tmp_path / "x.txt").write_text("Transform: Euler3DTransform_double_3_3\nParameters: 0 0 0 0 0 0\n")
    with pytest.raises(InputError, match="AffineTransform_double_3_3"):
        read_itk_affine(tmp_path / "x.txt")
    with pytest.raises(InputError, match="missing path"):
        read_itk_affine(tmp_path / "none.mat")
