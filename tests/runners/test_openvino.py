"""OpenVINO runner (CPU): agreement with ONNX Runtime on a tiny export, precisions gated by the CPU's flags,
the IR of ``emorph build --target openvino`` and its manifest checks, auto selection, register/check CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("openvino", reason="openvino not installed (pip install 'emorph-deploy[cpu]')")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed: the reference backend")

from emorph_deploy import runtime
from emorph_deploy.errors import ConfigMismatchError, InputError
from emorph_deploy.runners import load_runner, openvino_auto_skip, resolve
from emorph_deploy.runtime import cpu_has_int8_dot, cpu_has_native_bf16

GRID = (16, 24, 32)
needs_bf16 = pytest.mark.skipif(
    not cpu_has_native_bf16(), reason="this CPU has no AVX512-BF16 or AMX-BF16: bf16 is refused here"
)
needs_vnni = pytest.mark.skipif(
    not cpu_has_int8_dot(), reason="this CPU has no VNNI or AMX-INT8: int8 is refused here"
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_em) -> dict[str, Path]:
    """A tiny em-11-hires checkpoint (4 mm grid) and its flow-only gather export."""
    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.export import onnx_from_checkpoint
    from emorph_deploy.train.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("ov")
    pre = Preprocessing(grid_shape=GRID, spacing_mm=(4.0, 4.0, 4.0))
    save_checkpoint(tiny_em(GRID), d / "ckpt" / "tiny", preprocessing=pre)
    onnx = onnx_from_checkpoint(
        d / "ckpt" / "tiny.json", d / "tiny.onnx", grid_sample="gather", outputs="flow"
    )
    return {"dir": d, "ckpt": d / "ckpt" / "tiny.json", "onnx": Path(onnx)}


def _feed(seed: int = 0) -> dict[str, np.ndarray]:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    vols = [gaussian_filter(rng.random(GRID), 1.5).astype(np.float32) for _ in range(2)]
    return {
        k: ((v - v.min()) / (v.max() - v.min()))[None, None]
        for k, v in zip(("moving", "fixed"), vols, strict=True)
    }


def _ort_flow(onnx: Path, feed) -> np.ndarray:
    return load_runner(onnx, "onnxruntime", threads=1, providers="cpu").infer(feed)["flow"]


def _delta(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.sqrt(((a.astype(np.float64) - b) ** 2).sum(axis=1))
    return float(d.max()), float(d.mean())


def test_fp32_matches_onnxruntime(exported):
    feed = _feed()
    ref = _ort_flow(exported["onnx"], feed)
    with load_runner(exported["onnx"], "openvino", threads=1) as r:
        flow = r.infer(feed)["flow"]
        assert r.name == "openvino" and r.precision == "fp32" and r.grid_shape == GRID
        assert r.meta["openvino_config"]["INFERENCE_PRECISION_HINT"] == "f32"  # asked for, not defaulted
    assert flow.shape == (1, 3, *GRID) and flow.dtype == np.float32
    assert float(np.abs(ref).max()) > 0.01  # a non-trivial flow is compared
    worst, _ = _delta(flow, ref)
    assert worst <= 1e-3  # the fp32 tolerance of `emorph check`, in voxels


@needs_bf16
def test_bf16_within_the_reduced_precision_tolerance(exported):
    feed = _feed(1)
    ref = _ort_flow(exported["onnx"], feed)
    r = load_runner(exported["onnx"], "openvino", precision="bf16", threads=1)
    assert r.precision == "bf16" and r.meta["openvino_config"]["INFERENCE_PRECISION_HINT"] == "bf16"
    worst, mean = _delta(r.infer(feed)["flow"], ref)
    assert mean <= 0.05 and worst <= 0.5  # bf16 rows of the check table: like fp16
    assert worst > 0  # really ran in bf16


def test_precision_refused_without_cpu_features(exported, monkeypatch):
    import emorph_deploy.runtime as rt

    monkeypatch.setattr(rt, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    with pytest.raises(
        ConfigMismatchError, match=r"expected a CPU with amx_bf16 or avx512_bf16.*--precision fp32"
    ):
        load_runner(exported["onnx"], "openvino", precision="bf16")


def test_int8_needs_an_int8_graph_and_fp16_is_not_a_cpu_precision(exported):
    with pytest.raises(ConfigMismatchError, match="int8: expected a graph that can run at int8"):
        load_runner(exported["onnx"], "openvino", precision="int8")
    with pytest.raises(InputError, match="expected one of fp32, bf16, int8"):
        load_runner(exported["onnx"], "openvino", precision="fp16")


@pytest.fixture(scope="module")
def qdq(exported, tmp_path_factory) -> Path:
    from emorph_deploy.calibration import calibrate

    return calibrate(
        exported["onnx"], synthetic=2, out_dir=tmp_path_factory.mktemp("qdq"), progress=False
    ).qdq_onnx


@needs_vnni
def test_int8_qdq_graph_runs_in_int8(exported, qdq):
    feed = _feed(2)
    ref = _ort_flow(exported["onnx"], feed)
    r = load_runner(qdq, "openvino", threads=1)
    assert r.precision == "int8" and r.meta["openvino_config"]["INFERENCE_PRECISION_HINT"] == "f32"
    flow = r.infer(feed)["flow"]
    assert np.isfinite(flow).all() and _delta(flow, ref)[1] > 0  # quantised: not the fp32 flow


@pytest.mark.slow
@needs_vnni
def test_int8_nncf_ir_within_the_int8_tolerance(exported, tmp_path):
    pytest.importorskip("nncf", reason="nncf not installed (pip install 'emorph-deploy[cpu]')")
    from emorph_deploy.engines.openvino import build_ir

    built = build_ir(exported["onnx"], "int8", out_dir=tmp_path, nncf_pairs=2)
    assert built.manifest["quantizer"] == "nncf" and built.manifest["cpu"]["requires_any"]
    feed = _feed(4)
    ref = _ort_flow(exported["onnx"], feed)
    r = load_runner(built.xml, "openvino", threads=1)
    assert r.precision == "int8"
    _, mean = _delta(r.infer(feed)["flow"], ref)
    assert 0 < mean <= 0.2  # the int8 row of the check table


def test_ir_build_runs_and_checks_its_manifest(exported, tmp_path):
    from emorph_deploy.engines.openvino import build_ir

    src = tmp_path / "src.onnx"
    shutil.copy(exported["onnx"], src)
    shutil.copy(exported["onnx"].with_suffix(".json"), src.with_suffix(".json"))
    built = build_ir(src, "fp32", out_dir=tmp_path / "engines")
    m = built.manifest
    assert m["format"] == "emorph-openvino/1" and m["precision"] == "fp32" and m["grid_shape"] == list(GRID)
    assert m["cpu"]["model"] and m["source"]["sha256"] and m["openvino"]["version"]
    feed = _feed(3)
    flow_ir = load_runner(built.xml, "openvino", threads=1).infer(feed)["flow"]
    flow_onnx = load_runner(src, "openvino", threads=1).infer(feed)["flow"]
    assert _delta(flow_ir, flow_onnx)[0] <= 1e-5
    with pytest.raises(InputError, match="already exists"):
        build_ir(src, "fp32", out_dir=tmp_path / "engines")

    other = dict(m, openvino={"version": "2020.1.0"})
    built.manifest_path.write_text(json.dumps(other))
    with pytest.raises(
        ConfigMismatchError, match=r"built by 2020.1.0; fix: rebuild it here with 'emorph build"
    ):
        load_runner(built.xml, "openvino")
    built.manifest_path.write_text(json.dumps(m))
    with src.open("ab") as f:  # the source graph changed after the build
        f.write(b"\0")
    with pytest.raises(ConfigMismatchError, match=r"is stale.*--target openvino"):
        load_runner(built.xml, "openvino")


@pytest.mark.parametrize("stage", ["full_res", "cascade"])
def test_bf16_ir_of_a_network_that_warps_inside(tmp_path, tiny_em, monkeypatch, stage):
    """A full-resolution stage fed the warped image, or a cascade stage: the gather export forms indices in
    integers, so the bf16 IR builds and follows torch; an export without that record (an older emorph, or
    GridSample) is refused for bf16 before anything is written."""
    import json

    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.engines.openvino import build_ir
    from emorph_deploy.export import onnx_from_checkpoint
    from emorph_deploy.train.checkpoint import save_checkpoint

    kw = {
        "full_res": {"full_res_width": 4, "full_res_input": "warped"},
        "cascade": {"cascade_width": 4},
    }[stage]
    model = tiny_em(GRID, **kw)
    if stage == "cascade":
        import torch

        torch.nn.init.normal_(model.cascade.head.weight, 0, 0.05)  # a stage that changes the flow
    pre = Preprocessing(grid_shape=GRID, spacing_mm=(4.0, 4.0, 4.0))
    save_checkpoint(model, tmp_path / "ckpt" / "warps", preprocessing=pre)
    onnx = Path(
        onnx_from_checkpoint(tmp_path / "ckpt" / "warps.json", tmp_path / "warps.onnx", grid_sample="gather")
    )
    assert json.loads(onnx.with_suffix(".json").read_text())["gather_indices"] == "int32"
    built = build_ir(onnx, "bf16", out_dir=tmp_path / "engines")
    rng = np.random.default_rng(0)
    feed = {k: rng.random((1, 1, *GRID), dtype=np.float32) for k in ("moving", "fixed")}
    got = load_runner(built.xml, "openvino").infer(feed)["flow"]
    ref = load_runner(tmp_path / "ckpt" / "warps.json", "torch").infer(feed)["flow"]
    scale = float(np.abs(ref).max())
    assert scale > 0 and float(np.abs(got - ref).max()) <= 0.05 * scale + 1e-3

    meta = json.loads(onnx.with_suffix(".json").read_text())
    del meta["gather_indices"]  # as exported before the integer indices
    onnx.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"integers.*fix: re-export"):
        build_ir(onnx, "bf16", out_dir=tmp_path / "old", force=True)
    monkeypatch.setattr(runtime, "missing_cpu_features", lambda _precision: set())  # any CPU
    with pytest.raises(ConfigMismatchError, match=r"integers.*fix: re-export"):
        load_runner(onnx, "openvino", precision="bf16", verify=False)  # the runner refuses it too
    assert not (tmp_path / "old").exists() or not any((tmp_path / "old").iterdir())
    assert build_ir(onnx, "fp32", out_dir=tmp_path / "old").xml.is_file()  # fp32 keeps any warp exact


def test_auto_prefers_openvino_where_the_rule_says(exported):
    notes: list[str] = []
    runner = resolve(exported["onnx"], "auto", notes)
    skip = openvino_auto_skip()
    if skip is None:
        assert runner.name == "openvino"
    else:
        assert runner.name == "onnxruntime" and f"openvino skipped: {skip}" in notes
    assert resolve(exported["onnx"], "openvino").name == "openvino"


def test_auto_leaves_qdq_graphs_and_missing_cpu_features_to_onnxruntime(exported, qdq, monkeypatch):
    import emorph_deploy.runtime as rt

    notes: list[str] = []
    if openvino_auto_skip() is None:
        monkeypatch.setattr(rt, "cpu_flags", lambda: VNNI)  # QDQ graphs stay on ONNX Runtime without AMX
        assert resolve(qdq, "auto", notes).name == "onnxruntime"
        assert any("a QDQ graph runs in ONNX Runtime" in n for n in notes)
    monkeypatch.setattr(rt, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    with pytest.raises(
        ConfigMismatchError, match="openvino int8: expected a CPU with amx_int8 or avx512_vnni"
    ):
        load_runner(qdq, "openvino")


AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})
#: AVX-512 with bf16 and VNNI, no AMX (the AMD EPYC Zen 4 of the measurements)
VNNI = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"}
AMX = VNNI | {"amx_tile", "amx_bf16", "amx_int8"}
#: what ``--backend auto`` runs per artifact on each CPU kind: (backend, precision), or the error it raises
AUTO_PICKS: dict[str, dict[str, tuple[str, str] | str]] = {
    "avx2-only": {
        "fp32-onnx": ("openvino", "fp32"),
        "fp32-ir": ("openvino", "fp32"),
        "bf16-ir": "openvino bf16: expected a CPU with amx_bf16 or avx512_bf16",
        "qdq-onnx": ("onnxruntime", "int8"),
        "int8-ir": "openvino int8: expected a CPU with amx_int8 or avx512_vnni or avx_vnni",
    },
    "vnni": {
        "fp32-onnx": ("openvino", "fp32"),
        "fp32-ir": ("openvino", "fp32"),
        "bf16-ir": ("openvino", "bf16"),
        "qdq-onnx": ("onnxruntime", "int8"),
        "int8-ir": ("openvino", "int8"),
    },
    "amx": {
        "fp32-onnx": ("openvino", "fp32"),
        "fp32-ir": ("openvino", "fp32"),
        "bf16-ir": ("openvino", "bf16"),
        "qdq-onnx": ("openvino", "int8"),  # OpenVINO's int8 of the QDQ graph is within tolerance with AMX
        "int8-ir": ("openvino", "int8"),
    },
    "no-avx2": {
        "fp32-onnx": ("onnxruntime", "fp32"),
        "fp32-ir": ("openvino", "fp32"),  # an IR runs only in OpenVINO: not passed over
        "bf16-ir": "openvino bf16: expected a CPU with amx_bf16 or avx512_bf16",
        "qdq-onnx": ("onnxruntime", "int8"),
        "int8-ir": "openvino int8: expected a CPU with amx_int8 or avx512_vnni or avx_vnni",
    },
}
CPU_FLAGS = {"avx2-only": AVX2_ONLY, "vnni": VNNI, "amx": AMX, "no-avx2": frozenset({"sse4_2"})}


@pytest.fixture(scope="module")
def auto_artifacts(exported, qdq, tmp_path_factory) -> dict[str, Path]:
    """The kinds of CPU artifact: the fp32 export, its fp32 and bf16 IRs, the QDQ graph and its int8 IR."""
    from emorph_deploy.engines.openvino import build_ir

    d = tmp_path_factory.mktemp("ir")
    return {
        "fp32-onnx": exported["onnx"],
        "fp32-ir": build_ir(exported["onnx"], "fp32", out_dir=d).xml,
        "bf16-ir": build_ir(exported["onnx"], "bf16", out_dir=d).xml,
        "qdq-onnx": qdq,
        "int8-ir": build_ir(qdq, "int8", out_dir=d).xml,
    }


@pytest.mark.parametrize("cpu", list(AUTO_PICKS))
def test_auto_rule_per_cpu_kind(cpu, auto_artifacts, monkeypatch):
    """``--backend auto`` on a mocked x86-64 CPU (the flags :func:`emorph_deploy.runtime.cpu_flags` reports;
    no GPU provider): OpenVINO for float graphs where there is AVX2, at the artifact's precision; QDQ graphs
    on OpenVINO with AMX, else on ONNX Runtime (fused only with VNNI); an IR always in OpenVINO, one clear
    error when the CPU cannot run its precision."""
    import platform

    import onnxruntime as ort

    import emorph_deploy.runtime as rt

    monkeypatch.setattr(rt, "cpu_flags", lambda: CPU_FLAGS[cpu])
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    for kind, expected in AUTO_PICKS[cpu].items():
        notes: list[str] = []
        if isinstance(expected, str):
            with pytest.raises(ConfigMismatchError, match=expected):
                resolve(auto_artifacts[kind], "auto", notes)
            continue
        runner = resolve(auto_artifacts[kind], "auto", notes)
        assert (runner.name, runner.precision) == expected, (kind, notes)
        if kind == "qdq-onnx" and expected[0] == "onnxruntime":
            assert any("a QDQ graph runs in ONNX Runtime" in n for n in notes) or cpu == "no-avx2"
            level = runner._session.get_session_options().graph_optimization_level
            fused = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            assert (level == fused) == (cpu == "vnni"), level  # u8s8 kernels only where they cannot saturate
        if expected[0] == "onnxruntime" and cpu == "no-avx2":
            assert any(n.startswith("openvino skipped: the CPU has no AVX2") for n in notes), notes
        runner.close()


# ------------------------------------------------------------------------------------------------ CLI
def _cli() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 always separates stderr
        return CliRunner()


def _nifti_pair(folder: Path) -> list[Path]:
    """Fixed and moving NIfTI images (18×22×26 noise at 4 mm) in ``folder``."""
    rng = np.random.default_rng(0)
    paths = [folder / "fixed.nii.gz", folder / "moving.nii.gz"]
    for path in paths:
        img = rng.random((18, 22, 26)).astype(np.float32)
        nib.save(nib.Nifti1Image(img, np.diag([4.0, 4.0, 4.0, 1.0])), str(path))
    return paths


def test_cli_register_and_check_with_openvino(exported, tmp_path):
    from emorph_deploy.cli.app import app

    out = tmp_path / "out"
    args = ["register", *_nifti_pair(tmp_path), "--onnx", exported["onnx"]]
    res = _cli().invoke(app, [str(a) for a in [*args, "--backend", "openvino", "--out", out, "--no-qc-png"]])
    assert res.exit_code == 0, res.output
    assert "backend: openvino (fp32)" in res.stderr
    assert (out / "warped.nii.gz").is_file() and (out / "displacement.nii.gz").is_file()

    res = _cli().invoke(app, ["check", str(exported["onnx"]), "--backend", "openvino", "--synthetic", "1"])
    assert res.exit_code == 0, res.output
    assert "openvino" in res.stdout and "PASS" in res.stdout
    res = _cli().invoke(app, ["check", str(exported["onnx"]), "--backend", "openvino", "--precision", "fp16"])
    assert res.exit_code == 2 and "expected one of fp32, bf16, int8" in res.stderr


def test_cli_build_openvino_then_register_and_check(exported, tmp_path):
    """``emorph build --target openvino``: IR (.xml + .bin) + manifest; ``register --engine X.xml`` and
    ``check X.xml`` run it (auto picks OpenVINO by the suffix); a second build without --force is refused."""
    from emorph_deploy.cli.app import app

    build = ["build", str(exported["onnx"]), "--target", "openvino", "--out", str(tmp_path / "engines")]
    res = _cli().invoke(app, build)
    assert res.exit_code == 0, res.output
    first, bin_line, man_line = res.stdout.splitlines()[:3]  # "<xml>  (fp32, OpenVINO …)", .bin, .json
    xml, bin_, man = Path(first.split("  (")[0]), Path(bin_line), Path(man_line)
    assert (
        xml.suffix == ".xml"
        and xml.name.startswith("tiny-fp32-openvino")
        and "(fp32, OpenVINO " in res.stdout
    )
    assert xml.is_file() and bin_ == xml.with_suffix(".bin") and bin_.stat().st_size > 0
    from emorph_deploy.engines.openvino import read_ir_manifest

    m = read_ir_manifest(man)  # paths resolved against the manifest's folder
    assert (m["format"], m["precision"], m["grid_shape"]) == ("emorph-openvino/1", "fp32", list(GRID))
    assert Path(m["source"]["onnx"]).resolve() == exported["onnx"].resolve() and m["source_checkpoint"]

    out = tmp_path / "out"
    args = ["register", *_nifti_pair(tmp_path), "--engine", xml, "--out", out, "--no-qc-png"]
    res = _cli().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    assert "backend: openvino (fp32)" in res.stderr and (out / "displacement.nii.gz").is_file()

    res = _cli().invoke(app, ["check", str(xml), "--synthetic", "1"])
    assert res.exit_code == 0, res.output
    assert "openvino" in res.stdout and "PASS" in res.stdout

    res = _cli().invoke(app, build)
    assert res.exit_code == 2 and "already exists" in res.stderr, res.output


def test_ir_manifest_follows_its_folder(exported, tmp_path):
    """IR and source graph moved together: the IR manifest's relative source path leads to the moved graph
    (a change to it is seen as stale), and the IR still runs."""
    from emorph_deploy.engines.openvino import build_ir, read_ir_manifest

    project = tmp_path / "project"
    project.mkdir()
    src = project / "src.onnx"
    shutil.copy(exported["onnx"], src)
    shutil.copy(exported["onnx"].with_suffix(".json"), src.with_suffix(".json"))
    built = build_ir(src, "fp32", out_dir=project / "engines")
    assert json.loads(built.manifest_path.read_text())["source"]["onnx"] == "../src.onnx"
    moved = tmp_path / "moved"
    shutil.move(project, moved)
    xml = moved / "engines" / built.xml.name
    m = read_ir_manifest(xml.with_suffix(".json"))
    assert m["source"]["onnx"] == str(moved / "src.onnx") and m["out_dir"] == str(moved / "engines")
    assert load_runner(xml, "openvino", threads=1).infer(_feed(1))["flow"].shape == (1, 3, *GRID)
    with (moved / "src.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ConfigMismatchError, match="is stale"):
        load_runner(xml, "openvino")
