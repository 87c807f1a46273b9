"""Native-space mapping, ITK export, QC helpers and Result.save — with a stub runner (known smooth flow)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from oracles import model_flow_to_native, warp_world
from scipy.ndimage import gaussian_filter

from emorph_deploy.data.preprocess import Preprocessing
from emorph_deploy.errors import ConfigMismatchError, InputError, OutputExistsError
from emorph_deploy.metrics import jacobian_determinant
from emorph_deploy.qc import deformation_stats, jacobian_determinant_fast
from emorph_deploy.registration import Registrar, voxel_flow

GRID = (24, 24, 24)


def smooth_flow(shape: tuple[int, int, int], amp: float = 1.5) -> np.ndarray:
    z = np.stack(np.meshgrid(*[np.linspace(0, np.pi, s) for s in shape], indexing="ij"))
    return amp * np.stack([np.sin(z[1]) * np.sin(z[2]), np.sin(z[0]), -np.sin(z[2]) * np.cos(z[0])]).astype(
        np.float32
    )


@pytest.fixture
def stub(stub_runner):
    """``stub(grid=GRID, spacing=3.0, zero=False, pre_grid=None)``: a runner returning :func:`smooth_flow`
    (or zeros) on ``grid`` at ``spacing`` mm."""

    def make(grid=GRID, spacing=3.0, zero=False, pre_grid=None):
        flow = np.zeros((3, *grid), np.float32) if zero else smooth_flow(grid)
        return stub_runner(flow, spacing=spacing, pre_grid=pre_grid)

    return make


def rotation(angle: float, axis: int) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    r = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def make_affine(lin: np.ndarray, shape, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = lin
    a[:3, 3] = np.asarray(centre) - lin @ ((np.asarray(shape) - 1) / 2)
    return a


# non-identity, non-RAS affines: LPS flip, permuted axes, anisotropic spacing, small rotation
PERM = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], float)
AFFINES = {
    "ras_iso": lambda s: make_affine(np.diag([2.0, 2.0, 2.0]), s),
    "lps_aniso": lambda s: make_affine(np.diag([-1.6, -2.1, 2.6]), s, (3, -2, 1)),
    "permuted_rotated": lambda s: make_affine(
        rotation(0.12, 2) @ PERM @ np.diag([1.8, 2.4, 2.0]), s, (-4, 2, 3)
    ),
    "flipped_permuted_rot": lambda s: make_affine(
        rotation(-0.1, 0) @ np.diag([-1, 1, -1]) @ PERM.T @ np.diag([2.2, 1.7, 2.0]), s, (2, 5, -3)
    ),
}


def blob(shape, seed):
    rng = np.random.default_rng(seed)
    v = gaussian_filter(rng.random(shape), 2.0).astype(np.float32)
    v -= v.min()
    return v / v.max()


@pytest.fixture(scope="module")
def pair():
    fs, ms = (30, 26, 28), (28, 32, 24)
    fixed = blob(fs, 0)
    moving = blob(ms, 1)
    labels = (moving > 0.5).astype(np.int16) * 3 + (moving > 0.7).astype(np.int16) * 4
    return fixed, moving, labels


def test_warp_matches_reference_resampler(pair, stub):
    """Fused float32 native warp == data.resample's float64 reference (interior) for a non-RAS pair."""
    fixed, moving, labels = pair
    a_f = AFFINES["lps_aniso"](fixed.shape)
    a_m = AFFINES["permuted_rotated"](moving.shape)
    runner = stub()
    reg = Registrar(runner, warmup=False)
    res = reg.register((fixed, a_f), (moving, a_m), labels=(labels, a_m), refine=0)
    grid = reg.preprocessing.grid_affine((fixed, a_f))
    disp = model_flow_to_native(runner.flow, grid, fixed.shape, a_f)  # (3, ...) RAS mm
    ref = warp_world(moving, a_m, fixed.shape, a_f, disp, order=1, padding="border", method="scipy")
    ref_in = warp_world(np.ones_like(moving), a_m, fixed.shape, a_f, disp, order=1, padding="zeros")
    w = np.asanyarray(res.warped.dataobj)
    interior = ref_in > 0.999  # away from the moving FOV edge (edge conventions differ by design)
    assert interior.mean() > 0.3
    assert np.abs(w - ref)[interior].max() < 1e-4
    lps = res.displacement_lps()
    assert np.abs(lps - np.moveaxis(disp, 0, -1) * np.array([-1, -1, 1])).max() < 1e-4
    ref_lab = warp_world(labels, a_m, fixed.shape, a_f, disp, order=0)
    wl = np.asanyarray(res.warped_labels.dataobj)
    assert wl.dtype == np.int16 and res.warped_labels.get_data_dtype() == np.int16
    assert set(np.unique(wl)) <= {0, 3, 7}
    assert (wl != ref_lab)[interior].mean() < 1e-3  # rounding ties only


def test_zero_flow_same_grid_is_identity(pair, stub):
    _, moving, labels = pair
    a = AFFINES["flipped_permuted_rot"](moving.shape)
    res = Registrar(stub(zero=True), warmup=False).register(
        (moving, a), (moving, a), labels=(labels, a), refine=0
    )
    # float32 coordinate arithmetic: identity up to ~1e-6 of the intensity range; labels exactly
    assert np.abs(np.asanyarray(res.warped.dataobj) - moving).max() < 1e-5
    assert np.array_equal(np.asanyarray(res.warped_labels.dataobj), labels)
    assert np.abs(res.displacement_lps()).max() < 1e-4
    assert res.qc["frac_jac_nonpos"] == 0.0 and abs(res.qc["ncc_before"] - 1.0) < 1e-6


def test_qc_keys_and_stage_times(pair, stub):
    """qc.json keeps its keys, in file order; every stage is timed."""
    from emorph_deploy.registration.pipeline import RegistrationQC

    fixed, moving, _ = pair
    a = AFFINES["ras_iso"](fixed.shape)
    res = Registrar(stub(), affine=False, warmup=False).register((fixed, a), (moving, a), refine=1)
    qc = res.qc
    stats = list(deformation_stats(np.ones((4, 4, 4), np.float32)))
    assert list(qc) == [
        "format", "backend", "precision", "model_grid", "model_spacing_mm", "fixed_shape", "moving_shape",
        "affine_prealignment", "ncc_before", "ncc_after", "qc_region", "deformable_check", "masks", *stats,
        "jacobian_grid",
        "model_latency_s", "network", "passes", "contrast", "refine", "times_s",
    ]  # fmt: skip
    assert qc["format"] == RegistrationQC.FORMAT and qc["backend"] == "stub"
    assert qc["model_grid"] == list(GRID)
    stages = ["load", "resample", "infer", "refine", "resample_back", "qc", "jacobian", "package", "total"]
    assert list(qc["times_s"]) == stages
    # the inverse warp is computed on first use (save() or an access), then kept and timed
    inv = res.inverse_displacement
    assert inv is not None and res.inverse_displacement is inv
    assert list(qc["times_s"]) == [*stages, "inverse"] and qc["times_s"]["inverse"] >= 0.0
    assert RegistrationQC.__dataclass_params__.frozen


@pytest.mark.parametrize("kind", sorted(AFFINES))
def test_simpleitk_reproduces_warped(tmp_path, pair, kind, stub):
    """SimpleITK's DisplacementFieldTransform + displacement.nii.gz reproduces warped.nii.gz (NCC ≥ 0.999)."""
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is needed for the ITK interoperability check")
    fixed, moving, _ = pair
    a_f = AFFINES[kind](fixed.shape)
    a_m = AFFINES["flipped_permuted_rot" if kind != "flipped_permuted_rot" else "lps_aniso"](moving.shape)
    for name, data, aff in (("fixed", fixed, a_f), ("moving", moving, a_m)):
        img = nib.Nifti1Image(data, aff)
        img.set_qform(aff, code=1)
        img.set_sform(aff, code=1)
        nib.save(img, tmp_path / f"{name}.nii.gz")
    res = Registrar(stub(), warmup=False).register(
        tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz", refine=0
    )
    res.save(tmp_path / "out", qc_png=False)
    disp = sitk.ReadImage(str(tmp_path / "out" / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    assert disp.GetNumberOfComponentsPerPixel() == 3 and disp.GetSize() == fixed.shape
    out = sitk.Resample(
        sitk.ReadImage(str(tmp_path / "moving.nii.gz"), sitk.sitkFloat32),
        sitk.ReadImage(str(tmp_path / "fixed.nii.gz"), sitk.sitkFloat32),
        sitk.DisplacementFieldTransform(disp),
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )
    ours = nib.load(tmp_path / "out" / "warped.nii.gz").get_fdata(dtype=np.float32)
    theirs = sitk.GetArrayFromImage(out).transpose(2, 1, 0)
    ncc = float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])
    print(f"{kind}: NCC(SimpleITK, ours) = {ncc:.7f}, max |diff| = {np.abs(ours - theirs).max():.2e}")
    assert ncc >= 0.999
    assert np.abs(ours - theirs).max() < 1e-3


def test_itk_header_and_voxel_flow(tmp_path, pair, stub):
    fixed, moving, _ = pair
    a_f = AFFINES["permuted_rotated"](fixed.shape)
    res = Registrar(stub(), warmup=False).register((fixed, a_f), (moving, a_f), refine=0)
    paths = res.save(tmp_path / "o", voxel_flow=True, qc_png=False)
    d = nib.load(paths["displacement"])
    assert d.shape == (*fixed.shape, 1, 3)
    assert d.header.get_intent()[0] == "vector" and d.get_data_dtype() == np.float32
    assert np.allclose(d.affine, a_f, atol=1e-5)
    vf = nib.load(paths["voxel_flow"]).get_fdata(dtype=np.float32)  # (X, Y, Z, 3) fixed voxels
    # moving voxel = fixed voxel + flow when the grids coincide: world displacement = A_f[:3,:3] @ flow
    world = np.einsum("ab,...b->...a", a_f[:3, :3], vf)
    lps = res.displacement_lps()
    assert np.abs(world * np.array([-1, -1, 1]) - lps).max() < 1e-3
    assert np.abs(voxel_flow(lps, a_f) - vf).max() < 1e-5
    q = json.loads(paths["qc_json"].read_text())
    for key in ("backend", "precision", "frac_jac_nonpos", "sdlogj", "ncc_before", "ncc_after", "times_s"):
        assert key in q
    for stage in ("load", "resample", "infer", "resample_back", "write"):
        assert stage in q["times_s"]


def test_jacobian_fast_matches_metrics():
    flow = smooth_flow((12, 14, 10), amp=2.5)
    ref = jacobian_determinant(flow)
    fast = jacobian_determinant_fast(flow)
    assert fast.dtype == np.float32 and np.abs(fast - ref).max() < 1e-4
    s = deformation_stats(fast)
    assert abs(s["frac_jac_nonpos"] - float((ref <= 0).mean())) < 1e-9
    assert abs(s["sdlogj"] - float(np.log(ref[ref > 0]).std())) < 1e-4


@pytest.mark.parametrize("folds", [0, 37])
def test_deformation_stats_match_float64_numpy(folds):
    """float32 logs with double accumulation: every statistic within 1e-6 (relative) of float64 numpy."""
    rng = np.random.default_rng(5)
    jac = (1.0 + 0.3 * rng.standard_normal((20, 30, 40))).clip(0.05, None).astype(np.float32)
    jac.reshape(-1)[rng.choice(jac.size, folds, replace=False)] = -0.2
    s = deformation_stats(jac)
    j64 = jac.astype(np.float64).ravel()
    assert s["frac_jac_nonpos"] == folds / jac.size
    np.testing.assert_allclose(s["sdlogj"], np.log(j64[j64 > 0]).std(), rtol=1e-6)
    np.testing.assert_allclose(s["sdlogj_l2r"], np.log(np.clip(j64 + 3.0, 1e-9, 1e9)).std(), rtol=1e-6)
    assert s["jac_min"] == float(j64.min()) and s["jac_max"] == float(j64.max())


def test_save_is_all_or_nothing(tmp_path, pair, monkeypatch, stub):
    fixed, moving, labels = pair
    a = AFFINES["ras_iso"](fixed.shape)
    res = Registrar(stub(), affine=False, warmup=False).register(
        (fixed, a), (moving, a), labels=(labels, a), refine=0
    )
    out = tmp_path / "o"
    import emorph_deploy.registration.niftiio as niftiio

    calls = {"n": 0}

    def failing_open(path, mode="r", *a, **k):  # the disk fills up while the second NIfTI is written
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return open(path, mode, *a, **k)

    monkeypatch.setattr(niftiio, "open", failing_open, raising=False)
    with pytest.raises(Exception, match="No space left"):
        res.save(out, qc_png=False)
    assert calls["n"] == 2
    assert not out.exists() or list(out.iterdir()) == []
    monkeypatch.delattr(niftiio, "open")
    res.save(out, qc_png=True)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert set(before) == {
        "warped.nii.gz",
        "warped_labels.nii.gz",
        "displacement.nii.gz",
        "inverse_displacement.nii.gz",
        "jacobian.nii.gz",
        "qc.json",
        "qc.png",
    }
    with pytest.raises(OutputExistsError):
        res.save(out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    res.save(out, force=True, qc_png=False)


def test_grid_mismatch_and_bad_arrays(pair, stub):
    fixed, moving, _ = pair
    with pytest.raises(ConfigMismatchError, match="grid"):
        Registrar(stub(pre_grid=(16, 16, 16)), warmup=False)
    reg = Registrar(stub(), warmup=False)
    a = np.eye(4)
    bad = fixed.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        reg.register((bad, a), (moving, a))
    with pytest.raises(InputError, match=r"singular|invertible"):
        reg.register((fixed, np.diag([1.0, 0.0, 1.0, 1.0])), (moving, a))
    with pytest.raises(InputError, match="all-zero"):
        reg.register((fixed, a), (np.zeros_like(moving), a))
    with pytest.raises(InputError, match="integer label"):
        reg.register((fixed, a), (moving, a), labels=(moving * 3.3, a))


@pytest.mark.slow
def test_affine_prealignment_recovers_known_affine(stub):
    """MNI152 moved by a known affine onto a rotated, anisotropic grid: ``affine=True`` recovers it."""
    datasets = pytest.importorskip("nilearn.datasets", reason="nilearn ships the MNI152 template")
    from emorph_deploy.data.resample import resample_to_grid

    t = datasets.load_mni152_template(resolution=2)
    fixed = np.asanyarray(t.dataobj).astype(np.float32)
    a_f = t.affine
    t_true = np.eye(4)
    t_true[:3, :3] = rotation(0.10, 2) @ np.diag([1.04, 0.97, 1.0])
    t_true[:3, 3] = [6.0, -4.0, 3.0]
    ms = (90, 100, 80)
    a_m = make_affine(rotation(-0.05, 0) @ np.diag([2.2, 2.2, 2.4]), ms, (5, -3, 2))
    moving = resample_to_grid(
        fixed, np.linalg.inv(t_true) @ a_f, ms, a_m, order=1
    )  # moving(y) = fixed(t_true y)
    reg = Registrar(stub(spacing=8.0, zero=True), warmup=False)
    res = reg.register((fixed, a_f), (moving, a_m), affine=True, refine=0)
    expected = np.linalg.inv(t_true)  # T (fixed world -> moving world) with moving(T p) = fixed(p)
    err_lin = np.abs(res.pre_affine[:3, :3] - expected[:3, :3]).max()
    err_t = np.abs(res.pre_affine[:3, 3] - expected[:3, 3]).max()
    print(
        f"affine error: linear {err_lin:.4f}, translation {err_t:.2f} mm, {res.qc['times_s']['affine']:.2f} s"
    )
    assert err_lin < 0.03 and err_t < 1.5
    assert res.qc["ncc_after"] > res.qc["ncc_before"] + 0.05
    # the written displacement includes the affine: it alone maps the moving image onto the fixed grid
    lps = res.displacement_lps()
    centre = np.array(fixed.shape) // 2
    p = a_f[:3, :3] @ centre + a_f[:3, 3]
    d_expected = (res.pre_affine[:3, :3] @ p + res.pre_affine[:3, 3]) - p
    assert np.abs(lps[tuple(centre)] - d_expected * np.array([-1, -1, 1])).max() < 1e-3


def test_separable_flow_path_matches_grid_sample(pair, monkeypatch, stub):
    """Axis-aligned grids use three 1D interpolations of the flow; they must equal the 3D grid_sample path."""
    import emorph_deploy.registration.native as native

    fixed, moving, labels = pair
    a_f = AFFINES["lps_aniso"](fixed.shape)  # axis-aligned with the RAS model grid (flipped, anisotropic)
    a_m = AFFINES["permuted_rotated"](moving.shape)
    runner = stub()
    grid = Preprocessing(grid_shape=GRID, spacing_mm=(3.0,) * 3).grid_affine((fixed, a_f))
    assert native.axis_map(np.linalg.inv(grid) @ a_f) is not None
    args = (runner.flow, grid, fixed.shape, a_f, moving, a_m)
    fast = native.warp_to_native(*args, labels=labels)
    monkeypatch.setattr(native, "axis_map", lambda m, tol=1e-7: None)
    slow = native.warp_to_native(*args, labels=labels)
    assert np.abs(fast.displacement_lps - slow.displacement_lps).max() < 1e-4
    assert np.abs(fast.warped - slow.warped).max() < 1e-4
    assert (fast.warped_labels != slow.warped_labels).mean() < 1e-3


def test_save_nifti_gz_many_writes_every_file_whole(tmp_path, monkeypatch):
    """One pool for several files (many small gzip members each): every file reads back exactly."""
    import nibabel as nib

    import emorph_deploy.registration.niftiio as niftiio

    monkeypatch.setattr(niftiio, "_CHUNK", 10_000)
    rng = np.random.default_rng(3)
    imgs = [
        nib.Nifti1Image(rng.random((20, 21, 22)).astype(np.float32), np.diag([1.5, 1.5, 2.0, 1.0])),
        nib.Nifti1Image((rng.random((20, 21, 22)) * 5).astype(np.uint8), np.eye(4)),
        nib.Nifti1Image(rng.random((20, 21, 22, 1, 3)).astype(np.float32), np.eye(4)),
    ]
    items = [(im, tmp_path / f"f{i}.nii.gz") for i, im in enumerate(imgs)]
    paths = niftiio.save_nifti_gz_many(items, workers=2)
    for im, p in zip(imgs, paths, strict=True):
        back = nib.load(str(p))
        assert back.get_data_dtype() == im.get_data_dtype()
        np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.asanyarray(im.dataobj))
        np.testing.assert_allclose(back.affine, im.affine)


def test_affine_trilinear_value_and_gradient_match_grid_sample_autograd():
    """The affine fit's sampler: values and their derivatives along each array axis equal F.grid_sample's
    (zeros padding, align_corners=True) and its autograd gradient, inside, on and beyond the faces."""
    import torch
    import torch.nn.functional as F

    from emorph_deploy.registration.affine import _trilinear_with_gradient
    from emorph_deploy.sampling import index_to_grid

    gen = torch.Generator().manual_seed(0)
    vol = torch.rand(7, 9, 11, dtype=torch.float64, generator=gen)
    idx = torch.stack([torch.rand(600, dtype=torch.float64, generator=gen) * (n + 3) - 2 for n in vol.shape])
    out = _trilinear_with_gradient(vol, idx)  # (4, N)
    x = idx.clone().requires_grad_(True)
    n2g = torch.as_tensor(index_to_grid(vol.shape), dtype=torch.float64)
    grid = (n2g[:3, :3] @ x + n2g[:3, 3:]).T
    ref = F.grid_sample(vol[None, None], grid.view(1, 1, 1, -1, 3), align_corners=True, padding_mode="zeros")
    (grad,) = torch.autograd.grad(ref.sum(), x)
    assert (idx < 0).any() and (idx[0] > vol.shape[0] - 1).any()  # points outside are part of the test
    assert torch.allclose(out[0], ref.view(-1), atol=1e-12)
    assert torch.allclose(out[1:], grad, atol=1e-12)


def test_affine_fit_only_accepts_steps_that_raise_ncc():
    """Levenberg-Marquardt on one level recovers a known shift; it returns the best NCC it evaluated."""
    import torch

    from emorph_deploy.registration.affine import _fit_level, _Level

    gen = torch.Generator().manual_seed(1)
    mv = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 24, 26, 28, generator=gen), 5, 1, 2)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    axes = (torch.arange(4.0, 2 * n - 4, 2.0) for n in (24, 26, 28))
    pts = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    pts = pts.reshape(3, -1).T  # (N, 3) world mm = 2 * index
    c = pts.mean(0).double().numpy()
    truth = np.zeros(12)
    truth[9:] = [1.3, -0.8, 0.6]  # mm
    fvals = _trilinear_sample(mv, (pts + torch.tensor(truth[9:], dtype=torch.float32)) / 2.0)
    level = _Level(mv, aff, pts - torch.as_tensor(c, dtype=torch.float32), fvals, c, 32)
    seen = []

    def evaluate(th):
        seen.append(level.ncc(th))
        return seen[-1]

    theta, rho0, rho = _fit_level(evaluate, np.zeros(12), 30, 1e-9)
    assert rho > rho0 + 0.05 and rho > 0.999
    assert np.abs(theta[9:] - truth[9:]).max() < 0.05
    assert rho == max(r[0] for r in seen) and seen[0][0] == rho0  # the best NCC seen is the one returned


def test_affine_starts_fitted_together_match_one_by_one():
    """The multi-start fits its starts as one batch (S, 12): each row ends where fitting it alone ends, for
    NCC and for mutual information (whose BHHH curvature adapts its scale per start)."""
    import torch

    from emorph_deploy.registration.affine import _fit_level, _Level

    gen = torch.Generator().manual_seed(2)
    mv = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 24, 26, 28, generator=gen), 5, 1, 2)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    axes = (torch.arange(4.0, 2 * n - 4, 2.0) for n in (24, 26, 28))
    pts = torch.stack(torch.meshgrid(*axes, indexing="ij")).reshape(3, -1).T
    c = pts.mean(0).double().numpy()
    fvals = _trilinear_sample(mv, (pts + torch.tensor([1.0, -0.5, 0.4])) / 2.0)
    level = _Level(mv, aff, pts - torch.as_tensor(c, dtype=torch.float32), fvals, c, 32)
    starts = np.zeros((3, 12))
    starts[1, 9:] = [3.0, 0.0, -2.0]
    starts[2, :9] = [0.05, 0.02, 0, 0, -0.04, 0, 0, 0, 0.03]
    for metric, adapt in (("ncc", False), ("mi", True)):
        together, rho0, rho = _fit_level(lambda th, m=metric: level.evaluate(m, th), starts, 6, 1e-9, adapt)
        assert together.shape == (3, 12) and rho.shape == (3,)
        for k in range(3):
            alone, r0, r = _fit_level(lambda th, m=metric: level.evaluate(m, th), starts[k], 6, 1e-9, adapt)
            assert np.allclose(together[k], alone, atol=1e-6), (metric, k)
            assert abs(rho[k] - r) < 1e-6 and abs(rho0[k] - r0) < 1e-9, (metric, k)
        assert (rho > rho0).all(), metric


def _trilinear_sample(mv, idx_n3):
    from emorph_deploy.registration.affine import _trilinear_with_gradient

    return _trilinear_with_gradient(mv[0, 0], idx_n3.T.contiguous())[0]


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8, np.uint16, np.int64])
def test_nearest_take_equals_grid_sample_nearest(dtype):
    """The labels' one-gather nearest sampler == grid_sample(mode="nearest", zeros) exactly: ties round half
    to even, points past half a voxel outside are 0; any label dtype, values kept."""
    import torch
    import torch.nn.functional as F

    from emorph_deploy.registration.native import _nearest_take

    gen = torch.Generator().manual_seed(3)
    src = torch.randint(1, 200, (5, 6, 7), generator=gen).to(torch.float32)
    g = torch.rand(3, 4000, generator=gen) * 2.6 - 1.3  # normalised, reaching past every face
    ties = torch.tensor(
        [
            [-1.0 + 2 * 2.5 / 6, 1.0 + 1 / 6, 0.0],
            [-1.0 + 2 * 0.5 / 5, -1.0 - 1 / 5, 0.0],
            [0.0, 0.0, -1.0 + 2 * 1.5 / 4],
        ]
    )  # exact half-voxel positions and face ties
    g = torch.cat([g, ties], dim=1)
    ref = F.grid_sample(
        src[None, None], g.T.reshape(1, 1, 1, -1, 3), mode="nearest", padding_mode="zeros", align_corners=True
    ).view(-1)
    lab = torch.from_numpy(src.numpy().astype(np.int64 if dtype == np.uint16 else dtype))
    got = _nearest_take(lab, g, torch.empty(g.shape[1], dtype=lab.dtype))
    assert got.dtype == lab.dtype
    assert (ref == 0).any() and (ref != 0).any()
    np.testing.assert_array_equal(got.numpy().astype(np.float64), ref.numpy().astype(np.float64))


def test_add_matvec_equals_matmul_and_skips_zero_entries():
    import torch

    from emorph_deploy.registration.native import _add_matvec

    gen = torch.Generator().manual_seed(4)
    f = torch.randn(3, 1000, generator=gen)
    m = np.array([[0.5, 0.0, -2.0], [0.0, 0.0, 0.0], [1.5, 0.25, 3.0]])
    ref = torch.as_tensor(m, dtype=torch.float32) @ f
    out = torch.full((3, 1000), 7.0)
    torch.testing.assert_close(_add_matvec(out, m, f, accumulate=False), ref, rtol=1e-6, atol=1e-6)
    base = torch.randn(3, 1000, generator=gen)
    torch.testing.assert_close(
        _add_matvec(base.clone(), m, f, accumulate=True), base + ref, rtol=1e-6, atol=1e-6
    )


def test_affine_pyramid_block_means_and_fortran_views():
    """Block means over every core equal avg_pool3d (any number of block slabs, tails dropped); a
    Fortran-ordered volume pools as its reversed view with the same world geometry (no copy)."""
    import torch
    import torch.nn.functional as F

    from emorph_deploy.registration.affine import _block_mean, _pooled, _pyramid

    gen = torch.Generator().manual_seed(5)
    for shape, f in (((23, 10, 9), [3, 2, 2]), ((8, 7, 6), [2, 2, 1]), ((5, 9, 9), [1, 3, 3])):
        t = torch.rand(shape, generator=gen)
        for threads in (1, 2, 3):
            prev = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                got = _block_mean(t, f)
            finally:
                torch.set_num_threads(prev)
            ref = F.avg_pool3d(t[None, None], f, f) if max(f) > 1 else t[None, None]
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    vol = np.asfortranarray(np.random.default_rng(6).random((12, 10, 14)).astype(np.float32))
    aff = np.array([[-1.5, 0, 0, 20], [0, 1.5, 0, -9], [0, 0, 1.5, 4], [0, 0, 0, 1.0]])
    pf, af = _pooled(vol, aff, 3.0)
    pc, ac = _pooled(np.ascontiguousarray(vol), aff, 3.0)

    def world_of_max(p, a):  # the pooled voxel with the largest mean, in world mm
        i = np.unravel_index(int(p.argmax()), p.shape[2:])
        return a[:3, :3] @ np.asarray(i, float) + a[:3, 3]

    assert pf.shape[2:] == pc.shape[2:][::-1]
    np.testing.assert_allclose(world_of_max(pf, af), world_of_max(pc, ac), atol=1e-9)
    levels = _pyramid(vol, aff, 3.0, 2)
    assert [round(float(np.abs(a[:3, :3]).sum(0).max()), 6) for _, a in levels] == [6.0, 3.0]
