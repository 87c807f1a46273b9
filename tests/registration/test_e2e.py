"""End-to-end registration on an MNI152 pair with a tiny model fitted in a fixture.

The pair: nilearn's bundled MNI152 template (2 mm, block-averaged to 4 mm) and the same template warped by a
known smooth random deformation; label maps are GM/WM × octant (16 labels) warped the same way. The model is a
tiny EfficientMorph (em-11, ~58k parameters, 32×40×32 grid at 6 mm) trained for a few dozen Adam steps on this
pair with the unsupervised loss (NCC + diffusion): enough to have learned the deformation (the Dice test needs
that).
"""

from __future__ import annotations

import gc
import importlib.util
import threading
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is needed for the model")

from emorph_deploy.data.preprocess import Preprocessing  # noqa: E402
from emorph_deploy.metrics import mean_dice  # noqa: E402
from emorph_deploy.registration import Registrar  # noqa: E402

GRID = (32, 40, 32)
SPACING = 6.0
TRAIN_STEPS = 30


def _pool2(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    a = a[: a.shape[0] // 2 * 2, : a.shape[1] // 2 * 2, : a.shape[2] // 2 * 2]
    return a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, a.shape[2] // 2, 2).mean((1, 3, 5))


@pytest.fixture(scope="module")
def mni_pair():
    datasets = pytest.importorskip("nilearn.datasets", reason="nilearn ships the MNI152 template")
    from emorph_deploy.data.synthetic import random_displacement, warp_numpy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = datasets.load_mni152_template(resolution=2)
        gm = _pool2(np.asanyarray(datasets.load_mni152_gm_template(resolution=2).dataobj))
        wm = _pool2(np.asanyarray(datasets.load_mni152_wm_template(resolution=2).dataobj))
    affine = t.affine.copy()
    affine[:3, :3] *= 2.0
    affine[:3, 3] += 0.5 * np.diag(t.affine)[:3]
    fixed = _pool2(np.asanyarray(t.dataobj))
    fixed /= fixed.max()
    tissue = np.where((gm > 0.35) & (gm >= wm), 1, np.where(wm > 0.35, 2, 0))
    c = np.array(fixed.shape) // 2
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in fixed.shape], indexing="ij")
    octant = (ii >= c[0]).astype(int) + 2 * (jj >= c[1]) + 4 * (kk >= c[2])
    labels = np.where(tissue > 0, tissue + 2 * octant, 0).astype(np.int16)
    disp = random_displacement(fixed.shape, rng=0, max_disp=3.0, scale=12.0)  # voxels (≤ 12 mm)
    moving = warp_numpy(fixed, disp, order=1).astype(np.float32)
    moving_labels = warp_numpy(labels, disp, order=0).astype(np.int16)
    return {
        "fixed": fixed,
        "moving": moving,
        "labels": labels,
        "moving_labels": moving_labels,
        "affine": affine,
    }


@pytest.fixture(scope="module")
def tiny_checkpoint(mni_pair, tmp_path_factory):
    """Fit a tiny model to the pair (unsupervised NCC + diffusion) and save it as a checkpoint."""
    from emorph_deploy.losses import DiffusionLoss, NCCLoss
    from emorph_deploy.models import create_model
    from emorph_deploy.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    prep = Preprocessing(grid_shape=GRID, spacing_mm=(SPACING,) * 3)
    a = mni_pair["affine"]
    ref = (mni_pair["fixed"], a)
    fm = torch.from_numpy(prep.apply(ref, reference=ref).data)[None, None]
    mm = torch.from_numpy(prep.apply((mni_pair["moving"], a), reference=ref).data)[None, None]
    model = create_model(
        "em-11-hires",
        img_size=GRID,
        patch_dim=12,
        embed_dims=(16, 32),
        heads=(2, 2),
        decoder_widths=(16, 8),
        skip_width=8,
        drop_path=0.0,
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ncc, diff = NCCLoss(window=5, sigma=1.0), DiffusionLoss()
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest on a shared 2-core box
    try:
        _fit(model, opt, ncc, diff, mm, fm)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    out = tmp_path_factory.mktemp("tiny") / "tiny"
    save_checkpoint(model, out, preprocessing=prep, training={"steps": TRAIN_STEPS, "note": "test fixture"})
    return out.with_suffix(".json")


def _fit(model, opt, ncc, diff, mm, fm) -> None:
    for _ in range(TRAIN_STEPS):
        for mov, fix in ((mm, fm), (fm, mm)):  # both directions
            warped, flow = model(mov, fix)
            loss = ncc(warped, fix) + 0.5 * diff(flow)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@pytest.fixture(scope="module")
def registrar(tiny_checkpoint):
    return Registrar.load(tiny_checkpoint, backend="torch", affine=False)  # the pair shares one space


@pytest.mark.slow
def test_registration_raises_dice(mni_pair, registrar):
    a = mni_pair["affine"]
    res = registrar.register(
        (mni_pair["fixed"], a), (mni_pair["moving"], a), labels=(mni_pair["moving_labels"], a)
    )
    warped_labels = np.asanyarray(res.warped_labels.dataobj)
    before = mean_dice(mni_pair["labels"], mni_pair["moving_labels"])
    after = mean_dice(mni_pair["labels"], warped_labels)
    q = res.qc
    print(
        f"Dice {before:.4f} -> {after:.4f}; NCC {q['ncc_before']:.4f} -> {q['ncc_after']:.4f}; "
        f"J<=0 {q['frac_jac_nonpos']:.5f}; SDlogJ {q['sdlogj']:.4f}; times {q['times_s']}"
    )
    assert warped_labels.dtype == np.int16
    assert set(np.unique(warped_labels)) <= set(np.unique(mni_pair["labels"]))
    assert after > before + 0.05
    assert q["ncc_after"] > q["ncc_before"]
    assert q["frac_jac_nonpos"] < 0.01


@pytest.mark.slow
def test_torch_and_onnxruntime_agree(mni_pair, registrar, tiny_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is needed for the ONNX Runtime backend")
    from emorph_deploy.export import onnx_from_checkpoint

    onnx_path = onnx_from_checkpoint(tiny_checkpoint, tmp_path / "tiny.onnx", grid_sample="gather")
    reg_ort = Registrar.load(onnx_path, backend="onnxruntime", affine=False)
    assert reg_ort.backend == "onnxruntime"
    a = mni_pair["affine"]
    args = ((mni_pair["fixed"], a), (mni_pair["moving"], a))
    # the networks are compared: no refinement, which would amplify float differences
    r_t = registrar.register(*args, labels=(mni_pair["moving_labels"], a), refine=0)
    r_o = reg_ort.register(*args, labels=(mni_pair["moving_labels"], a), refine=0)
    # displacement (mm) -> voxels of the 4 mm native grid
    d_vox = np.abs(r_t.displacement_lps() - r_o.displacement_lps()).max() / 4.0
    w_diff = np.abs(np.asanyarray(r_t.warped.dataobj) - np.asanyarray(r_o.warped.dataobj)).max()
    lab_diff = float(
        (np.asanyarray(r_t.warped_labels.dataobj) != np.asanyarray(r_o.warped_labels.dataobj)).mean()
    )
    print(f"torch vs onnxruntime: displacement {d_vox:.2e} voxel, warped {w_diff:.2e}, labels {lab_diff:.2e}")
    assert d_vox < 1e-3
    assert w_diff < 1e-3
    assert lab_diff < 1e-3
    # auto picks a CPU backend for an .onnx artifact: OpenVINO when installed and its rule allows it on this
    # CPU (runners.AUTO_ORDER, openvino_auto_skip), else ORT
    from emorph_deploy.runners import openvino_auto_skip

    auto = Registrar.load(onnx_path)
    ov = importlib.util.find_spec("openvino") is not None and openvino_auto_skip(onnx_path) is None
    expected = "openvino" if ov else "onnxruntime"
    assert auto.backend == expected


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


@pytest.mark.slow
def test_fifty_pairs_without_memory_growth(mni_pair, registrar):
    a = mni_pair["affine"]
    fixed = (mni_pair["fixed"], a)
    moving = (mni_pair["moving"], a)
    labels = (mni_pair["moving_labels"], a)
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # small volumes: one thread is fastest on a shared box; memory is what we measure
    try:
        for _ in range(5):  # warm-up: allocator pools, lazy imports
            registrar.register(fixed, moving, labels=labels)
        gc.collect()
        start = _rss_mb()
        peak = start
        for _ in range(50):
            res = registrar.register(fixed, moving, labels=labels)
            del res
            peak = max(peak, _rss_mb())
        gc.collect()
        end = _rss_mb()
    finally:
        torch.set_num_threads(threads)
    print(
        f"RSS over 50 pairs: start {start:.1f} MB, end {end:.1f} MB, growth {end - start:+.1f} MB, "
        f"peak {peak:.1f} MB"
    )
    assert end - start < 50.0


@pytest.mark.slow
def test_four_threads_match_serial(mni_pair, registrar):
    a = mni_pair["affine"]
    rng = np.random.default_rng(0)
    inputs = []
    for i in range(4):  # four different pairs (intensity jitter + shift) so mix-ups would show
        mov = np.clip(
            mni_pair["moving"] * (1.0 + 0.05 * i)
            + 0.01 * rng.random(mni_pair["moving"].shape, dtype=np.float32),
            0,
            None,
        )
        inputs.append(((mni_pair["fixed"], a), (np.roll(mov, i, axis=0), a), (mni_pair["moving_labels"], a)))
    serial = [registrar.register(f, m, labels=lab) for f, m, lab in inputs]
    results: list = [None] * 4
    errors: list = []

    def work(i: int) -> None:
        try:
            f, m, lab = inputs[i]
            results[i] = registrar.register(f, m, labels=lab)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s, r in zip(serial, results, strict=True):
        assert np.array_equal(np.asanyarray(s.warped.dataobj), np.asanyarray(r.warped.dataobj))
        assert np.array_equal(s.displacement_lps(), r.displacement_lps())
        assert np.array_equal(np.asanyarray(s.warped_labels.dataobj), np.asanyarray(r.warped_labels.dataobj))
    assert not np.array_equal(serial[0].displacement_lps(), serial[1].displacement_lps())
