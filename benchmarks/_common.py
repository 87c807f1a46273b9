"""Shared helpers of the benchmark scripts: arguments, machine info, timing, peak RSS, results files.

Every script in ``benchmarks/`` uses the same conventions:

* arguments: ``--quick`` (tiny model/grid, seconds; results under ``benchmarks/results/quick/``),
  ``--threads`` (default ``min(2, cpu_count)``; torch, ONNX Runtime intra-op and ITK all get it), ``--out``
  (output *stem*: ``<out>.json`` + ``<out>.md``), ``--runs``/``--warmup`` (timed runs after warm-up runs),
  ``--force``;
* timing: :func:`time_call` — warm-up runs, then ``runs`` timed runs; median, min, p90, mean of those;
* memory: :func:`run_measured` — a command in a fresh subprocess; its peak RSS from ``os.wait4`` (the kernel's
  ``ru_maxrss`` of exactly that child), plus what the child reports about itself (:func:`child_report`);
* results: :func:`write_results` — JSON (schema ``emorph-bench/1``: benchmark, quick, command, machine,
  params, rows, summary, notes) and a markdown file headed by the command and the machine line.

Scripts import this module as ``_common`` (``benchmarks/`` is put on ``sys.path`` by each script).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
QUICK_DIR = RESULTS_DIR / "quick"
SCHEMA = "emorph-bench/1"
#: keys every results JSON has (tests check them)
REQUIRED_KEYS = (
    "schema",
    "benchmark",
    "quick",
    "command",
    "started_utc",
    "finished_utc",
    "machine",
    "params",
    "rows",
    "summary",
    "notes",
)
MACHINE_KEYS = ("cpu_model", "logical_cpus", "cpu_flags", "threads", "torch", "load_avg_start")
#: marker of the JSON line a worker subprocess prints on stdout (see child_report / parse_child_report)
REPORT_MARK = "@@EMORPH_BENCH@@"

#: full-resolution grid of the paper (OASIS/IXI) and the default model's grid (2 mm)
FULL_GRID: tuple[int, int, int] = (160, 192, 224)
DEFAULT_GRID: tuple[int, int, int] = (80, 96, 112)
#: --quick: a narrow em-23-hires (same topology) on tiny grids
QUICK_GRIDS: tuple[tuple[int, int, int], ...] = ((32, 32, 32), (16, 24, 32))
QUICK_OVERRIDES: dict[str, Any] = {
    "embed_dims": (16, 32),
    "patch_dim": 8,
    "decoder_widths": (16, 8),
    "skip_width": 8,
}


# ---------------------------------------------------------------------------------------------- arguments
def default_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark script has."""
    ap = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny model and grid, seconds (checks the script, not the machine)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help="threads for torch / ONNX Runtime intra-op / ITK (default min(2, cpus))",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="output stem: writes <out>.json and <out>.md (default benchmarks/results/<name>, "
        "or benchmarks/results/quick/<name> with --quick)",
    )
    ap.add_argument("--runs", type=int, default=None, help="timed runs (default 5; --quick 3)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up runs before timing (default 1)")
    ap.add_argument("--force", action="store_true", help="overwrite existing results")
    return ap


def finish_args(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """Fill defaults that depend on --quick; validate; set thread environment variables."""
    if args.runs is None:
        args.runs = 3 if args.quick else 5
    if args.runs < 1 or args.warmup < 0:
        raise SystemExit(f"--runs must be >= 1 and --warmup >= 0, got {args.runs}, {args.warmup}")
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    if args.out is None:
        args.out = str((QUICK_DIR if args.quick else RESULTS_DIR) / name)
    args.out = str(Path(args.out).with_suffix("")) if Path(args.out).suffix in (".json", ".md") else args.out
    if not args.quick and args.runs < 5:
        print(f"note: {args.runs} timed runs (< 5): medians are less reliable", file=sys.stderr)
    set_thread_env(args.threads)
    return args


def use_allocator(malloc: str = "heap") -> dict[str, Any]:
    """Set up a worker process's allocator: ``"heap"`` = emorph's default (CLI, ``load_runner``: glibc keeps
    freed memory for reuse), ``"system"`` = glibc defaults. Returns what was applied, for the row's JSON."""
    if malloc != "heap":
        return {"applied": False, "reason": "glibc defaults (row option malloc=system)"}
    from emorph_deploy.runtime import allocator_state, keep_freed_memory

    keep_freed_memory(force=True)
    return allocator_state()


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables that fix the thread count of OpenMP/MKL/ITK (inherited by subprocesses)."""
    t = str(int(threads))
    return {
        "OMP_NUM_THREADS": t,
        "MKL_NUM_THREADS": t,
        "OPENBLAS_NUM_THREADS": t,
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": t,
    }


def set_thread_env(threads: int) -> None:
    """Set :func:`thread_env` in this process (before torch/ants are imported) and torch's thread count."""
    os.environ.update(thread_env(threads))
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(int(threads))


def parse_size(text: str) -> tuple[int, int, int]:
    """``"160x192x224"`` (or ``×``) → (160, 192, 224)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        raise SystemExit(f"expected a grid DxHxW such as 160x192x224, got {text!r}") from None
    if len(size) != 3 or min(size) < 1:
        raise SystemExit(f"expected a grid DxHxW such as 160x192x224, got {text!r}")
    return size  # type: ignore[return-value]


def fmt_size(size: Sequence[int]) -> str:
    return "×".join(str(int(s)) for s in size)


# ---------------------------------------------------------------------------------------------- machine
_FLAG_PREFIXES = ("avx", "fma", "amx", "f16c", "sse4_2", "vnni", "avx_vnni")


def cpu_info() -> dict[str, Any]:
    """CPU model, logical/physical cores, usable cores and the SIMD flags that matter (avx2/avx512/amx,
    native bf16, int8 dot products)."""
    from emorph_deploy.runtime import PRECISION_CPU_FEATURES

    model, flags, cores = platform.processor() or platform.machine(), set(), set()
    phys_id = core_id = None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name":
            model = value
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "physical id":
            phys_id = value
        elif key == "core id":
            core_id = value
            cores.add((phys_id, core_id))
    simd = sorted(f for f in flags if f.startswith(_FLAG_PREFIXES))
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "physical_cores": len(cores) or None,
        "cpu_flags": simd,
        "avx2": "avx2" in flags,
        "avx512": any(f.startswith("avx512") for f in flags),
        "amx": any(f.startswith("amx") for f in flags),
        # what decides the backend: the packaged model's bf16 IR, int8 in OpenVINO / fused ONNX Runtime
        # (the same flag sets as emorph_deploy.runtime, which the backend resolver reads)
        "native_bf16": bool(flags & PRECISION_CPU_FEATURES["bf16"]),
        "int8_dot": bool(flags & PRECISION_CPU_FEATURES["int8"]),
    }


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def gpu_info() -> dict[str, Any]:
    """CUDA GPU visible to torch (name, memory) or the reason there is none."""
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return {
                "available": True,
                "name": p.name,
                "memory_gb": round(p.total_memory / 2**30, 1),
                "count": torch.cuda.device_count(),
            }
        return {"available": False, "reason": f"torch {torch.__version__} sees no CUDA device"}
    except Exception as exc:  # pragma: no cover - torch always importable here
        return {"available": False, "reason": f"torch.cuda check failed: {exc}"}


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(threads: int, ort_threads: int | None = None) -> dict[str, Any]:
    """Everything a reader needs to judge the numbers: CPU, flags, threads, versions, load, GPU."""
    info: dict[str, Any] = dict(cpu_info())
    info["threads"] = int(threads)
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["mkldnn_available"] = bool(torch.backends.mkldnn.is_available())
        info["mkl_available"] = bool(torch.backends.mkl.is_available())
    except Exception as exc:  # pragma: no cover
        info["torch"] = f"unavailable ({exc})"
    info["onnxruntime"] = _version("onnxruntime")
    info["ort_intra_op_threads"] = int(ort_threads if ort_threads is not None else threads)
    for mod, dist in (
        ("numpy", "numpy"),
        ("onnx", "onnx"),
        ("antspyx", "antspyx"),
        ("picsl_greedy", "picsl_greedy"),
        ("tensorrt_rtx", "tensorrt_rtx"),
        ("emorph_deploy", "emorph-deploy"),
    ):
        info[mod] = _version(dist)
    info["python"] = platform.python_version()
    info["platform"] = platform.platform()
    info["memory_gb"] = _total_memory_gb()
    info["env"] = {k: os.environ[k] for k in sorted(thread_env(1)) if k in os.environ}
    info["load_avg_start"] = load_avg()
    info["gpu"] = gpu_info()
    info["git"] = git_commit()
    return info


def _total_memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_line(m: dict[str, Any]) -> str:
    """One markdown line describing the machine (for every results table)."""
    names = {"native_bf16": "native bf16", "int8_dot": "VNNI"}
    shown = ("avx2", "avx512", "native_bf16", "int8_dot", "amx")
    flags = ", ".join(names.get(f, f) for f in shown if m.get(f)) or "no avx2"
    absent = [names.get(f, f) for f in ("avx512", "native_bf16", "amx") if f in m and not m.get(f)]
    gpu = m.get("gpu") or {}
    gpu_s = gpu.get("name") if gpu.get("available") else "no GPU"
    load = m.get("load_avg_start")
    load_s = f"load avg {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} (1/5/15 min) at start" if load else ""
    return (
        f"Machine: {m.get('cpu_model')}, {m.get('logical_cpus')} logical CPUs "
        f"({m.get('usable_cpus')} usable), {flags}"
        + (f" (no {'/'.join(absent)})" if absent else "")
        + f"; {m.get('memory_gb')} GB RAM; {gpu_s}. Threads: {m.get('threads')} "
        f"(torch {m.get('torch_threads')}, ONNX Runtime intra-op {m.get('ort_intra_op_threads')}). "
        f"torch {m.get('torch')}, onnxruntime {m.get('onnxruntime')}, python {m.get('python')}"
        + (f", git {m['git']}" if m.get("git") else "")
        + (f"; {load_s}." if load_s else ".")
    )


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Times of the timed runs (seconds) and their statistics; warm-up times kept separately."""

    times_s: list[float]
    warmup_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return float(statistics.median(self.times_s))

    @property
    def min_s(self) -> float:
        return float(min(self.times_s))

    @property
    def p90_s(self) -> float:
        return percentile(self.times_s, 90.0)

    @property
    def mean_s(self) -> float:
        return float(statistics.fmean(self.times_s))

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median_s,
            "min_s": self.min_s,
            "p90_s": self.p90_s,
            "mean_s": self.mean_s,
            "runs": len(self.times_s),
            "times_s": list(self.times_s),
            "warmup_s": list(self.warmup_s),
        }


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) without numpy."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_call(
    fn: Callable[[], Any], runs: int = 5, warmup: int = 1, timer: Callable[[], float] | None = None
) -> Timing:
    """Call ``fn`` ``warmup`` times, then ``runs`` timed times (wall clock, ``time.perf_counter``).

    ``timer`` (optional) is read after each call instead of the wall clock around it, e.g.
    ``lambda: runner.last_latency_s`` to use the runner's own measurement.
    """
    warm: list[float] = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        warm.append(timer() if timer else time.perf_counter() - t0)
    times: list[float] = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        fn()
        times.append(timer() if timer else time.perf_counter() - t0)
    return Timing(times, warm)


# ---------------------------------------------------------------------------------------------- memory
def self_peak_rss_bytes() -> int:
    """Peak RSS of this process so far: ``VmHWM`` of /proc/self/status where available, else ``ru_maxrss``.

    ``ru_maxrss`` of a freshly started child is at least its parent's RSS at fork time (Linux keeps the
    pre-exec high-water mark), so a benchmark parent holding a model would inflate it; ``VmHWM`` belongs to
    the process's own (post-exec) address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int | None:
    """Current RSS of this process (from /proc/self/statm), or None where unavailable."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def child_report(payload: dict[str, Any]) -> None:
    """Print the worker's result (plus its own peak/current RSS) as the marked JSON line on stdout."""
    payload = dict(payload)
    payload.setdefault("self_peak_rss_bytes", self_peak_rss_bytes())
    payload.setdefault("self_current_rss_bytes", current_rss_bytes())
    sys.stdout.write(REPORT_MARK + json.dumps(payload, default=_json_default) + "\n")
    sys.stdout.flush()


def parse_child_report(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(REPORT_MARK):
            return json.loads(line[len(REPORT_MARK) :])
    return None


@dataclass
class Measured:
    """A finished subprocess: exit code, output, wall time, and its peak RSS as the kernel counted it."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_bytes: int | None  # the child's own VmHWM when it reported one, else rusage_maxrss_bytes
    report: dict[str, Any] | None
    rusage_maxrss_bytes: int | None = None  # os.wait4 ru_maxrss: includes the parent's RSS at fork time

    def error_line(self) -> str:
        lines = [ln for ln in (self.stderr or "").strip().splitlines() if ln.strip()]
        return lines[-1][:300] if lines else f"exit code {self.returncode}"


def run_measured(
    cmd: Sequence[str],
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    cwd: str | os.PathLike | None = None,
    echo: bool = False,
) -> Measured:
    """Run ``cmd`` in a fresh process; return its output, wall time and peak RSS.

    Peak RSS: the child's own ``VmHWM`` when it reports through :func:`child_report` (exact), else
    ``ru_maxrss`` from ``os.wait4`` of that child alone (``RUSAGE_CHILDREN`` would be the maximum over every
    child ever waited for) — an upper bound that includes this process's RSS at fork time, so run generic
    commands from a small parent. stdout/stderr go to temporary files (no pipe deadlock).
    ``echo`` copies the child's stderr (progress) to ours when it ends.
    """
    import tempfile

    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=full_env, cwd=cwd)
        deadline = None if timeout is None else t0 + timeout
        rusage = None
        status = 0
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                _, status, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if deadline is not None and wall > (timeout or 0):
        stderr += f"\ntimed out after {timeout:.0f} s"
    if echo and stderr.strip():
        sys.stderr.write(stderr if stderr.endswith("\n") else stderr + "\n")
    rusage_peak = None
    if rusage is not None:
        rusage_peak = int(rusage.ru_maxrss if sys.platform == "darwin" else rusage.ru_maxrss * 1024)
    report = parse_child_report(stdout)
    peak = rusage_peak
    if report and report.get("self_peak_rss_bytes"):
        peak = int(report["self_peak_rss_bytes"])  # the child's own VmHWM: exact (see self_peak_rss_bytes)
    return Measured(proc.returncode, stdout, stderr, wall, peak, report, rusage_peak)


def flow_diff(flow: Any, ref: Any) -> tuple[Any, dict[str, float]]:
    """Flow (1, 3, D, H, W) against a reference: the float64 difference (3, D, H, W) and the max/mean of its
    per-voxel Euclidean norm (``max_dflow_voxel``, ``mean_dflow_voxel``, voxels)."""
    import numpy as np

    d = np.asarray(flow)[0].astype(np.float64) - np.asarray(ref)[0].astype(np.float64)
    norm = np.sqrt((d * d).sum(0))
    return d, {"max_dflow_voxel": float(norm.max()), "mean_dflow_voxel": float(norm.mean())}


def gib(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**30


# ---------------------------------------------------------------------------------------------- compute
def matmul_peak(n: int = 2048, threads: int = 2, runs: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Measured fp32 matmul peak: ``torch.mm`` of two n×n matrices (2·n³ FLOP), median of ``runs``."""
    import torch

    torch.set_num_threads(int(threads))
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    c = torch.empty(n, n)
    timing = time_call(lambda: torch.mm(a, b, out=c), runs=runs, warmup=warmup)
    flop = 2.0 * n**3
    return {
        "n": n,
        "threads": int(threads),
        "dtype": "float32",
        "flop": flop,
        "gflops_median": flop / timing.median_s / 1e9,
        "gflops_best": flop / timing.min_s / 1e9,
        "timing": timing.to_dict(),
    }


def checkpoint_config(checkpoint: str | os.PathLike) -> Any:
    """The ``ModelConfig`` a checkpoint (``.json``/``.safetensors``) records, without loading its weights."""
    from emorph_deploy.models import ModelConfig
    from emorph_deploy.train.checkpoint import load_checkpoint_meta

    meta, _ = load_checkpoint_meta(checkpoint)
    return ModelConfig.from_dict(meta["model"])


def model_gflop(config: Any) -> float:
    """GFLOP of one forward (batch 1): ``torch.utils.flop_counter.FlopCounterMode`` on the meta device.

    Counts convolutions, linear layers and attention matmuls (2 FLOP per MAC); not the warp, norms or softmax.
    """
    from emorph_deploy.models.registry import REFERENCE_MACS, count_macs, get_spec

    name = getattr(config, "name", None)
    try:
        spec = get_spec(name) if name else None
    except Exception:
        spec = None
    if spec is not None and name in REFERENCE_MACS and config == spec.config.replace(img_size=FULL_GRID):
        return 2.0 * REFERENCE_MACS[name] / 1e9
    return 2.0 * count_macs(config) / 1e9


# ---------------------------------------------------------------------------------------------- checkpoints
#: The packaged default model (trained at ``DEFAULT_GRID``).
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "emorph_deploy" / "weights" / "default.json"


def grid_checkpoint(folder: str | os.PathLike, grid: Sequence[int], quick: bool) -> tuple[Path, str]:
    """``(checkpoint, description)`` for a backend benchmark at ``grid``: the packaged default model at its
    own grid, else a seeded random-init ``em-23-hires`` written into ``folder`` (``quick``: a tiny
    ``em-11-hires``, also at the default grid)."""
    if tuple(grid) == DEFAULT_GRID and not quick:
        return DEFAULT_MODEL, "the packaged default model (trained weights)"
    small = {"patch_dim": 6, "embed_dims": (8, 16), "heads": (1, 2)} if quick else None
    model = "em-11-hires" if quick else "em-23-hires"
    return make_checkpoint(Path(folder) / "ckpt", grid, model=model, overrides=small)


def make_checkpoint(
    folder: str | os.PathLike,
    size: Sequence[int],
    *,
    model: str = "em-23-hires",
    overrides: dict[str, Any] | None = None,
    source: str | os.PathLike | None = None,
    spacing_mm: float | None = None,
    flow_rms: float = 2.0,
    seed: int = 0,
    stem: str | None = None,
) -> tuple[Path, str]:
    """Write a checkpoint at grid ``size`` into ``folder``; return ``(path to .json, description)``.

    With ``source`` (a trained checkpoint) its weights are reused at ``size`` (EfficientMorph weights do not
    depend on the grid; the checkpoint's own grid is kept when ``size`` equals it). Otherwise a seeded
    random init of ``model`` (+ ``overrides``) whose flow head is rescaled so the flow RMS is ``flow_rms``
    voxels on a random pair (the untrained head is N(0, 1e-5): a ~0 flow would make warp and accuracy
    figures meaningless). The rescale factor is measured on a ≤ 48³ grid with the same weights (cheap).
    """
    import torch

    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.models import create_model
    from emorph_deploy.train.checkpoint import load_checkpoint, save_checkpoint

    size = tuple(int(s) for s in size)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if spacing_mm is None:
        spacing_mm = 1.0 if tuple(size) == FULL_GRID else 2.0 if tuple(size) == DEFAULT_GRID else 1.0
    pre = Preprocessing(grid_shape=size, spacing_mm=(spacing_mm,) * 3)
    if source is not None:
        src_model, meta = load_checkpoint(source)
        cfg = src_model.config.replace(img_size=size)
        model_obj = create_model(cfg)
        model_obj.load_state_dict(src_model.state_dict(), strict=True)
        if meta.get("preprocessing") and tuple(meta["preprocessing"].get("grid_shape", ())) == size:
            pre = Preprocessing.from_dict(meta["preprocessing"])
        desc = f"weights of {source}"
        name = stem or f"{cfg.name}-{'x'.join(map(str, size))}"
    else:
        torch.manual_seed(seed)
        model_obj = create_model(model, img_size=size, **(overrides or {}))
        desc = f"random init of {model} (seed {seed})"
        if flow_rms > 0:
            small = tuple(min(s, 48) for s in size)
            probe = create_model(model_obj.config.replace(img_size=small)).eval()
            probe.load_state_dict(model_obj.state_dict(), strict=True)
            gen = torch.Generator().manual_seed(seed + 1)
            x = (torch.rand((1, 1, *small), generator=gen), torch.rand((1, 1, *small), generator=gen))
            with torch.inference_mode():
                _, flow = probe(*x)
            rms = float(flow.pow(2).mean().sqrt())
            with torch.no_grad():
                for p in model_obj.flow_head.parameters():
                    p.mul_(flow_rms / max(rms, 1e-12))
            desc += f", flow head rescaled to flow RMS ≈ {flow_rms} voxels"
        name = stem or f"{model}-random-{'x'.join(map(str, size))}"
    model_obj.eval()
    paths = save_checkpoint(
        model_obj,
        folder / name,
        preprocessing=pre,
        training={"note": "benchmark checkpoint", "description": desc},
        force=True,
    )
    return Path(paths.meta), desc


# ---------------------------------------------------------------------------------------------- results
def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that produced a result, relative to the repository root when possible."""
    script = Path(sys.argv[0])
    try:
        script_s = str(script.resolve().relative_to(REPO_DIR))
    except ValueError:
        script_s = str(script)
    args = list(sys.argv[1:] if argv is None else argv)
    return "python " + " ".join(shlex.quote(a) for a in [script_s, *args])


def new_result(
    name: str, args: argparse.Namespace, argv: Sequence[str] | None = None, ort_threads: int | None = None
) -> dict[str, Any]:
    """The result skeleton (schema, command, machine, params from ``args``); scripts fill rows/summary."""
    return {
        "schema": SCHEMA,
        "benchmark": name,
        "quick": bool(getattr(args, "quick", False)),
        "command": command_line(argv),
        "started_utc": utc_now(),
        "finished_utc": None,
        "machine": machine_info(args.threads, ort_threads),
        "params": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "rows": [],
        "summary": {},
        "notes": [],
    }


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are str()-ed and pipes escaped."""

    def cell(v: Any) -> str:
        return ("-" if v is None else str(v)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(v: Any, spec: str = ".3g", none: str = "-") -> str:
    """Format a number (None/NaN → ``none``)."""
    if v is None:
        return none
    try:
        if isinstance(v, float) and math.isnan(v):
            return none
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def markdown_document(result: dict[str, Any], title: str, body: str) -> str:
    """Title, command, machine line, the body (tables), then notes."""
    parts = [f"# {title}", ""]
    if result.get("quick"):
        parts += [
            "**--quick run: tiny model/grid, checks the script only — not a measurement of the machine.**",
            "",
        ]
    load_end = result.get("summary", {}).get("load_avg_end")
    parts += [
        f"Command: `{result['command']}`  ",
        f"Run: {result['started_utc']} → {result.get('finished_utc')}"
        + (f" (load avg at end {load_end[0]:.2f})" if load_end else ""),
        "",
        machine_line(result["machine"]),
        "",
        body.rstrip(),
        "",
    ]
    if result.get("notes"):
        parts += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(parts)


def finalize(result: dict[str, Any]) -> dict[str, Any]:
    """Stamp the end time and load average (call before rendering the markdown)."""
    result["finished_utc"] = utc_now()
    result.setdefault("summary", {})["load_avg_end"] = load_avg()
    return result


def publish(result: dict[str, Any], render: Any, args: Any) -> tuple[Path, Path]:
    """Finalize ``result``, render its markdown with ``render(result)``, write both files, print the table."""
    finalize(result)
    md = render(result)
    paths = write_results(result, args.out, md, force=args.force)
    print(md)
    log(f"wrote {paths[0]} and {paths[1]}")
    return paths


def write_results(
    result: dict[str, Any], out_stem: str | os.PathLike, markdown: str, force: bool = False
) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` atomically (no overwrite without ``force``)."""
    from emorph_deploy.fileio import write_bytes_atomic

    if not result.get("finished_utc"):
        finalize(result)
    stem = Path(out_stem)
    json_path, md_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")
    text = json.dumps(result, indent=2, default=_json_default, allow_nan=True) + "\n"
    write_bytes_atomic(json_path, text.encode(), force=force)
    write_bytes_atomic(md_path, markdown.encode(), force=force)
    return json_path, md_path


def check_outputs_writable(out_stem: str | os.PathLike, force: bool) -> None:
    """Fail before any work if the outputs exist (without --force) or cannot be written."""
    from emorph_deploy.fileio import check_writable

    stem = Path(out_stem)
    for suffix in (".json", ".md"):
        check_writable(stem.with_name(stem.name + suffix), force=force, create=True)


def validate_result(result: dict[str, Any]) -> list[str]:
    """Problems with a results dict against the common schema (empty list = valid)."""
    problems = [f"missing key {k!r}" for k in REQUIRED_KEYS if k not in result]
    if result.get("schema") != SCHEMA:
        problems.append(f"schema is {result.get('schema')!r}, expected {SCHEMA!r}")
    machine = result.get("machine") or {}
    problems += [f"machine lacks {k!r}" for k in MACHINE_KEYS if k not in machine]
    if not isinstance(result.get("rows"), list):
        problems.append("rows is not a list")
    return problems


def log(msg: str) -> None:
    """Progress to stderr (stdout is reserved for results / worker reports)."""
    print(msg, file=sys.stderr, flush=True)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or (isinstance(a, float) and math.isnan(a)):
        return None
    return float(a) / float(b)
