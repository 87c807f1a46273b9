"""Native-space registration: the embeddable :class:`Registrar` and its :class:`Result`.

Pipeline per pair (times of each stage go to ``qc["times_s"]``):

1. ``load``: validate both images (paths, nibabel images or ``(array, affine)`` pairs;
   :mod:`emorph_deploy.data`).
2. ``affine`` (on by default, :data:`~emorph_deploy.registration.defaults.DEFAULTS`):
   :func:`~emorph_deploy.registration.affine.affine_prealign` on a ~4 mm pair, inside the masks when given,
   from ``initial_affine`` when given (the start kept, ``qc["affine_accepted"]`` False and
   ``qc["affine_reason"]`` when the fit fails its check); without it, ``initial_affine`` is the pre-alignment.
3. ``resample``: intensity normalisation on the native voxels and trilinear resampling in world coordinates
   onto the model grid (RAS, the artifact's :class:`~emorph_deploy.data.Preprocessing`, centred on the
   fixed FOV).
4. ``infer``: the runner (TensorRT / ONNX Runtime / torch), under a lock — one warm engine, many threads.
5. ``resample_back``: :func:`~emorph_deploy.registration.native.warp_to_native` — the original moving image
   (and labels) sampled on the fixed native grid at ``T(p + u(p))``; the ITK displacement ``d(p)``.
6. ``qc``: Jacobian statistics and NCC before/after (model grid, inside the fixed mask or the fixed image's
   foreground: ``qc["qc_region"]``), Dice before/after with ``fixed_labels`` and moving labels (fixed native
   grid), centre slices for ``qc.png``.

Nothing touches the disk until :meth:`Result.save`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import nibabel as nib
import numpy as np

from emorph_deploy.choices import Similarity
from emorph_deploy.errors import (
    ConfigMismatchError,
    EmorphError,
    InputError,
    OutputExistsError,
    ProcessingError,
)
from emorph_deploy.registration.defaults import DEFAULTS
from emorph_deploy.timing import stopwatch

if TYPE_CHECKING:
    from emorph_deploy.contrast import IntensityMap
    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.refine import RefineConfig
    from emorph_deploy.registration.affine import AffineConfig
    from emorph_deploy.registration.native import NativeWarp
    from emorph_deploy.runners.base import Runner

__all__ = [
    "OUTPUT_FILES",
    "Registrar",
    "RegistrationQC",
    "Result",
    "check_passes",
    "check_prefix",
    "default_artifact",
    "load_extras",
    "load_inputs",
    "output_targets",
    "refuse_existing",
]

#: File names written by :meth:`Result.save` (``voxel_flow`` only on request).
OUTPUT_FILES = {
    "warped": "warped.nii.gz",
    "warped_labels": "warped_labels.nii.gz",
    "displacement": "displacement.nii.gz",
    "inverse_displacement": "inverse_displacement.nii.gz",
    "jacobian": "jacobian.nii.gz",
    "affine": "affine.mat",
    "voxel_flow": "voxel_flow.nii.gz",
    "qc_json": "qc.json",
    "qc_png": "qc.png",
}


def check_prefix(prefix: str) -> str:
    """``prefix`` if it can start a file name in the output folder (no folder separators, not hidden);
    InputError otherwise."""
    if any(c in prefix for c in ("/", "\\", "\0")) or prefix.startswith(".") or prefix.strip() != prefix:
        raise InputError(
            f"--prefix: expected the start of a file name (no folders, spaces at the ends or leading dot), "
            f"got {prefix!r}; fix: pass e.g. --prefix sub01_ and choose the folder with --out"
        )
    return prefix


def output_names(prefix: str = "") -> dict[str, str]:
    """:data:`OUTPUT_FILES` with ``prefix`` before every file name."""
    return {n: f"{check_prefix(prefix)}{name}" for n, name in OUTPUT_FILES.items()}


def output_targets(
    out: Path,
    *,
    labels: bool,
    voxel_flow: bool,
    qc_png: bool,
    affine: bool = False,
    inverse: bool = True,
    jacobian: bool = True,
    prefix: str = "",
) -> dict[str, Path]:
    """The files :meth:`Result.save` writes into ``out`` (name → path), in writing order (``affine``: the
    pre-alignment ran; ``inverse``/``jacobian``: the result carries them; ``prefix`` starts every name)."""
    names = ["warped", *(["warped_labels"] if labels else []), "displacement"]
    names += [*(["inverse_displacement"] if inverse else []), *(["jacobian"] if jacobian else [])]
    names += [*(["affine"] if affine else []), "qc_json"]
    names += [*(["voxel_flow"] if voxel_flow else []), *(["qc_png"] if qc_png else [])]
    files = output_names(prefix)
    return {n: Path(out) / files[n] for n in names}


def refuse_existing(out: Path, targets: Iterable[Path], force: bool, prefix: str = "") -> None:
    """Before any work: ``out`` must be a folder (or not exist yet) that can be written; without ``force``
    no target and no output of an earlier run with the same ``prefix`` (:data:`OUTPUT_FILES`) may exist."""
    from emorph_deploy.fileio import check_dir_writable

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output: expected a folder, got the file {out}; fix: choose another --out")
    check_dir_writable(out)
    if not force:
        for p in [*targets, *(out / name for name in output_names(prefix).values())]:
            if p.exists():
                raise OutputExistsError(f"output {p} already exists: pass --force to overwrite it")


def default_artifact() -> Path:
    """The packaged default model (``emorph_deploy.weights``), or its InputError saying none is packaged."""
    from emorph_deploy.weights import default_checkpoint_path

    return default_checkpoint_path()


def _ras_label_dtype(img: nib.Nifti1Image) -> np.dtype:
    from emorph_deploy.data.nifti import label_dtype

    return label_dtype(img)


@dataclass
class Result:
    """Registration outputs, all on the fixed image's native grid (in memory; see :meth:`save`).

    ``warped``: moving image warped onto the fixed grid (float32, fixed header).
    ``displacement``: ITK/ANTs displacement field (LPS mm, 5D (X, Y, Z, 1, 3), intent "vector").
    ``warped_labels``: moving labels (nearest, original values and on-disk dtype) or ``None``.
    ``qc``: stage times, backend, precision, Jacobian statistics, NCC before/after.
    ``pre_affine``: the affine pre-alignment (fixed world → moving world, RAS mm) or ``None``.
    ``inverse_displacement``: the inverse ITK displacement on the moving grid (LPS mm, 5D, moving header
    codes) or ``None``, computed on first use (by :meth:`save` or an access; a fixed-point inversion on the
    moving grid, the slowest stage of a 1 mm pair, so in-process callers that never need it do not pay for
    it) and kept; ``jacobian``: det of the full transform's Jacobian on the fixed grid or ``None``.
    """

    warped: nib.Nifti1Image
    displacement: nib.Nifti1Image
    warped_labels: nib.Nifti1Image | None
    qc: dict[str, Any]
    pre_affine: np.ndarray | None = None
    jacobian: nib.Nifti1Image | None = None
    qc_slices: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    #: the inverse image, or a zero-argument function computing it (see ``inverse_displacement``)
    _inverse: Any = field(default=None, repr=False)
    _inverse_lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def inverse_displacement(self) -> nib.Nifti1Image | None:
        if callable(self._inverse):
            with self._inverse_lock:  # one computation when several threads ask at once
                if callable(self._inverse):
                    times: dict[str, float] = {}
                    with stopwatch(times, "inverse"):
                        self._inverse = self._inverse()
                    self.qc.setdefault("times_s", {})["inverse"] = times["inverse"]
        return self._inverse

    def displacement_lps(self) -> np.ndarray:
        """The displacement as (X, Y, Z, 3) float32 LPS mm (a view)."""
        data = np.asanyarray(self.displacement.dataobj)
        return data.reshape(*data.shape[:3], 3, order="F")

    def voxel_flow(self) -> nib.Nifti1Image:
        """Learn2Reg convention: displacement in fixed-grid voxels, (X, Y, Z, 3) float32 NIfTI."""
        from emorph_deploy.registration.native import voxel_flow_image

        return voxel_flow_image(self.displacement_lps(), self.warped.affine)

    def qc_png(self) -> bytes:
        from emorph_deploy.qc import qc_figure_png

        q = self.qc
        title = (
            f"backend {q.get('backend')} ({q.get('precision')}) | NCC {q.get('ncc_before', float('nan')):.3f}"
            f" → {q.get('ncc_after', float('nan')):.3f} | J≤0 {100 * q.get('frac_jac_nonpos', 0.0):.3f}% | "
            f"SDlogJ {q.get('sdlogj', float('nan')):.3f}"
        )
        return qc_figure_png(self.qc_slices, title=title)

    def save(
        self,
        out_dir: str | os.PathLike,
        force: bool = False,
        *,
        voxel_flow: bool = DEFAULTS.voxel_flow,
        qc_png: bool = DEFAULTS.qc_png,
        prefix: str = "",
    ) -> dict[str, Path]:
        """Write the outputs into ``out_dir`` all-or-nothing (a temporary sibling folder swapped in at the
        end, :func:`emorph_deploy.fileio.atomic_dir`), each file name starting with ``prefix``.

        Refuses to overwrite any existing output without ``force`` (checked before anything is written); with
        ``force`` the earlier run's whole output set (same ``prefix``) is replaced, and no other file. On
        any error or interruption no output file (and no folder, temporary or not) is left behind.
        """
        from emorph_deploy.fileio import atomic_dir

        out = Path(out_dir)
        targets = output_targets(
            out,
            labels=self.warped_labels is not None,
            voxel_flow=voxel_flow,
            qc_png=qc_png,
            affine=self.pre_affine is not None,
            inverse=self._inverse is not None,  # computed below, after the output checks
            jacobian=self.jacobian is not None,
            prefix=prefix,
        )
        refuse_existing(out, targets.values(), force, prefix)
        times: dict[str, float] = {}
        try:
            with atomic_dir(out, owned=output_names(prefix).values(), force=force) as staging:
                tmp = {n: staging / p.name for n, p in targets.items()}
                with stopwatch(times, "write_nifti"):
                    images = [(self.warped, tmp["warped"])]
                    if "warped_labels" in tmp:
                        images.append((self.warped_labels, tmp["warped_labels"]))
                    images.append((self.displacement, tmp["displacement"]))
                    for name in ("inverse_displacement", "jacobian"):
                        if name in tmp:
                            images.append((getattr(self, name), tmp[name]))
                    if "voxel_flow" in tmp:
                        images.append((self.voxel_flow(), tmp["voxel_flow"]))
                    _save_niis(images)
                    if "affine" in tmp:
                        from emorph_deploy.data.transforms import write_itk_affine

                        write_itk_affine(tmp["affine"], self.pre_affine)
                if "qc_png" in tmp:
                    with stopwatch(times, "write_png"):
                        tmp["qc_png"].write_bytes(self.qc_png())
                qc = dict(self.qc)
                qc["times_s"] = {**self.qc.get("times_s", {}), **times}
                qc["times_s"]["write"] = sum(times.values())
                qc["outputs"] = {n: p.name for n, p in targets.items()}
                tmp["qc_json"].write_text(json.dumps(_jsonable(qc), indent=2) + "\n")
        except OSError as exc:
            raise ProcessingError(
                f"output: expected to write {out}, got {type(exc).__name__}: {exc}; "
                "fix: check free space and permissions"
            ) from exc
        self.qc["times_s"] = qc["times_s"]
        return targets


def _save_niis(images: list[tuple[nib.Nifti1Image, Path]]) -> None:
    """Parallel-gzip writer for our plain outputs (one pool for all files); nibabel for anything it does not
    cover."""
    from emorph_deploy.registration.niftiio import save_nifti_gz_many

    try:
        save_nifti_gz_many(images)
    except ValueError:  # raised before anything is written: one image needs nibabel
        for img, path in images:
            try:
                save_nifti_gz_many([(img, path)])
            except ValueError:
                nib.save(img, str(path))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


@dataclass(frozen=True)
class RegistrationQC:
    """The registration's quality record, written as ``qc.json`` (:meth:`to_dict`, keys in file order).

    Shapes are (D, H, W) / (I, J, K) voxel counts; ``model_spacing_mm`` in mm. ``affine`` holds the affine
    pre-alignment's keys (``affine_matrix``, ``affine_source``, ``affine_accepted``, ...; empty without it);
    ``ncc_before``/``ncc_after`` are measured inside ``qc_region`` ("fixed-mask", "fixed-foreground" or
    "volume" when the fixed image has no usable foreground); ``deformable_check`` whether the deformable
    stage lowered the NCC of the image it registered below its pre-aligned start
    (:func:`emorph_deploy.qc.deformable_check`); ``masks`` which masks were given; ``passes`` the
    network passes (0 without the network);
    ``label_overlap`` Dice before/after with fixed labels (:func:`emorph_deploy.qc.label_overlap`; empty
    without); ``deformation`` the Jacobian statistics on the model grid
    (:func:`emorph_deploy.qc.deformation_stats`); ``contrast`` whether the moving image was mapped to the
    fixed image's contrast before the network, with :func:`~emorph_deploy.contrast.contrast_agreement`'s
    figures (None with matching off); ``refine`` the refinement settings and the similarity used, or None;
    ``times_s`` the stage seconds (the dict is shared with the caller, which adds the
    writing times).
    """

    backend: str
    precision: str
    model_grid: tuple[int, ...]
    model_spacing_mm: tuple[float, ...]
    fixed_shape: tuple[int, ...]
    moving_shape: tuple[int, ...]
    affine_prealignment: bool
    affine: dict[str, Any]
    ncc_before: float
    ncc_after: float
    qc_region: str
    deformable_check: dict[str, Any]
    masks: dict[str, bool]
    label_overlap: dict[str, Any]
    deformation: dict[str, Any]
    model_latency_s: float | None
    network: bool
    passes: int
    contrast: dict[str, Any] | None
    refine: dict[str, Any] | None
    times_s: dict[str, float]

    FORMAT: ClassVar[str] = "emorph-register-qc/1"

    def to_dict(self) -> dict[str, Any]:
        """The ``qc.json`` document (a new dict; ``times_s`` is the same dict object)."""
        return {
            "format": self.FORMAT,
            "backend": self.backend,
            "precision": self.precision,
            "model_grid": list(self.model_grid),
            "model_spacing_mm": list(self.model_spacing_mm),
            "fixed_shape": list(self.fixed_shape),
            "moving_shape": list(self.moving_shape),
            "affine_prealignment": self.affine_prealignment,
            **self.affine,
            "ncc_before": self.ncc_before,
            "ncc_after": self.ncc_after,
            "qc_region": self.qc_region,
            "deformable_check": dict(self.deformable_check),
            "masks": dict(self.masks),
            **self.label_overlap,
            **self.deformation,
            "jacobian_grid": "model",
            "model_latency_s": self.model_latency_s,
            "network": self.network,
            "passes": self.passes,
            "contrast": self.contrast,
            "refine": self.refine,
            "times_s": self.times_s,
        }


@dataclass(frozen=True)
class _ModelGridPair:
    """Both images normalised to [0, 1] and resampled onto the model grid: (D, H, W) float32 each.

    ``moving`` is after the affine pre-alignment; ``moving_unaligned`` without any registration (the same
    array when there is no pre-alignment); ``affine`` the grid's voxel → world (RAS mm) map;
    ``fixed_mask`` the fixed mask's share of each voxel (float32 in [0, 1]) or None; ``matched`` the moving
    image mapped to the fixed image's contrast when contrast matching found them different (else None) and
    ``contrast`` its figures for ``qc.json`` (None with matching off).
    """

    fixed: np.ndarray
    moving: np.ndarray
    moving_unaligned: np.ndarray
    affine: np.ndarray
    fixed_mask: np.ndarray | None = None
    matched: np.ndarray | None = None
    contrast: dict[str, Any] | None = None

    @property
    def moving_for_network(self) -> np.ndarray:
        """What the network and the refinement see: ``matched`` (the moving image in the fixed image's
        contrast, :func:`emorph_deploy.contrast.fit_inversion_map` or
        :func:`~emorph_deploy.contrast.fit_intensity_map`) when the contrasts differed, else
        ``moving``."""
        return self.moving if self.matched is None else self.matched

    @property
    def loosely_matched(self) -> bool:
        """``matched`` came from the conditional-median map (a loose fit: the refinement then works on the
        moving image as given, see :meth:`Registrar._refine`); False for the inversion map and without
        matching."""
        return self.matched is not None and (self.contrast or {}).get("map") != "inversion"


#: Least fraction of the model grid where both images have signal for a registration to be meaningful.
MIN_OVERLAP = 0.01


def check_passes(passes: Any) -> int:
    """``passes`` as an int in 1..:data:`~emorph_deploy.registration.defaults.MAX_PASSES`; InputError
    otherwise."""
    from emorph_deploy.registration.defaults import MAX_PASSES

    if isinstance(passes, bool) or not isinstance(passes, int | np.integer) or not 1 <= passes <= MAX_PASSES:
        raise InputError(
            f"passes: expected an integer from 1 to {MAX_PASSES} (network passes), got {passes!r}; fix: pass "
            "1 (one inference) or 2 (the network again on its own result)"
        )
    return int(passes)


def check_overlap(fixed: np.ndarray, moving: np.ndarray, affine: bool) -> float:
    """The fraction of the model grid (both (D, H, W), normalised to [0, 1]) where both images are non-zero;
    ProcessingError below :data:`MIN_OVERLAP` (the moving image lies outside the fixed field of view, or
    is too small or empty there): a registration without overlap has nothing to align."""
    both = np.count_nonzero((fixed > 0) & (moving > 0)) / fixed.size
    if both < MIN_OVERLAP or float(moving.max()) == float(moving.min()):
        fix = "check the headers (both in scanner/world mm) and the field of view" + (
            "" if affine else ", or run the affine pre-alignment (drop --no-affine)"
        )
        raise ProcessingError(
            f"registration: expected the moving image to overlap the fixed image, got {100 * both:.2f}% of "
            f"the fixed field of view (at least {100 * MIN_OVERLAP:g}% needed); fix: {fix}"
        )
    return both


class Registrar:
    """Load a model once, register many pairs: ``Registrar.load(artifact).register(fixed, moving)``.

    Thread-safe: the runner is called under a lock (one warm engine shared by all threads); every other stage
    works on per-call data, so concurrent results are identical to serial ones. No files are read or written
    unless paths are passed in / :meth:`Result.save` is called.
    """

    def __init__(
        self,
        runner: Runner,
        preprocessing: Preprocessing | dict[str, Any] | None = None,
        *,
        affine: bool = DEFAULTS.affine,
        affine_config: AffineConfig | None = None,
        match_contrast: bool = DEFAULTS.match_contrast,
        passes: int = DEFAULTS.passes,
        warmup: bool = True,
    ) -> None:
        from emorph_deploy.data.preprocess import Preprocessing

        self.runner = runner
        if preprocessing is None:
            pre_d = runner.meta.get("preprocessing")
            if pre_d:
                preprocessing = Preprocessing.from_dict(pre_d)
            else:
                preprocessing = Preprocessing(grid_shape=tuple(runner.grid_shape))
        elif isinstance(preprocessing, dict):
            preprocessing = Preprocessing.from_dict(preprocessing)
        self.preprocessing = preprocessing
        grid = tuple(int(s) for s in runner.grid_shape)
        if grid != tuple(preprocessing.grid_shape):
            raise ConfigMismatchError(
                "artifact: expected a model grid matching its preprocessing grid "
                f"{tuple(preprocessing.grid_shape)}, "
                f"got model input grid {grid}; fix: re-export the artifact from a checkpoint whose "
                "preprocessing grid_shape equals the model img_size"
            )
        self.grid_shape = grid
        self.backend = str(runner.name)
        self.precision = runner.precision
        self.affine = affine
        self.affine_config = affine_config
        self.match_contrast = match_contrast
        self.passes = check_passes(passes)
        self._lock = threading.Lock()
        self.warmup_s: float | None = None
        self.backend_notes: list[str] = []
        if warmup:
            z = np.zeros((1, 1, *grid), dtype=np.float32)
            times: dict[str, float] = {}
            with stopwatch(times, "warmup"), self._lock:
                runner.infer({"moving": z, "fixed": z})
            self.warmup_s = times["warmup"]

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls, artifact: str | os.PathLike | None = None, backend: str = "auto", **kwargs: Any
    ) -> Registrar:
        """Open ``artifact`` (checkpoint ``.json``/``.safetensors``, ``.onnx`` + manifest, ``.plan`` /
        ``.engine``) with ``backend`` ("auto" | "tensorrt" | "onnxruntime" | "torch"); ``None`` = the packaged
        default model. ``kwargs`` go to :class:`Registrar` (``affine``, ``match_contrast``, ``passes``
        (defaults: :data:`~emorph_deploy.registration.defaults.DEFAULTS`), ``affine_config``, ``warmup``)."""
        from emorph_deploy.runners import resolve

        path = Path(artifact) if artifact is not None else default_artifact()
        if not path.exists():
            raise InputError(
                f"model: expected an existing model artifact, got a missing path {path}; "
                "fix: check the path of --model/--onnx/--engine"
            )
        notes: list[str] = []
        reg = cls(resolve(path, backend, notes), **kwargs)
        reg.backend_notes = notes
        return reg

    # ------------------------------------------------------------------ registration
    def register(
        self,
        fixed: Any,
        moving: Any,
        labels: Any = None,
        *,
        affine: bool | None = None,
        validate: bool = True,
        refine: int | RefineConfig | None = None,
        network: bool = True,
        passes: int | None = None,
        fixed_mask: Any = None,
        moving_mask: Any = None,
        fixed_labels: Any = None,
        initial_affine: Any = None,
    ) -> Result:
        """Register ``moving`` to ``fixed``; ``labels`` (moving label map) are warped with nearest neighbour.

        Inputs: paths, nibabel images or ``(array, affine)`` pairs. Returns a :class:`Result` on the fixed
        grid.
        ``affine``: run the affine pre-alignment (None = this registrar's setting, by default on).
        ``validate=False`` skips re-validating nibabel images that already come from
        :func:`emorph_deploy.data.load_volume` / :func:`~emorph_deploy.data.load_label_map` (see
        :func:`load_inputs`).
        ``refine``: None = the defaults (:meth:`RegistrationDefaults.refine_config
        <emorph_deploy.registration.defaults.RegistrationDefaults.refine_config>`), ``N`` = the defaults
        with N steps, or a :class:`~emorph_deploy.refine.RefineConfig`: test-time Adam steps on the
        displacement (see :func:`emorph_deploy.refine.refine_flow`), starting from the network's flow. Runs
        outside the runner lock (per-call data only); the network is untouched.
        ``network=False`` skips the network: the flow starts at zero (the identity after the affine
        pre-alignment), so ``refine=N`` is refinement alone and ``refine=0`` the affine (or no) registration
        — the ablation rows of ``benchmarks/validation_suite.py``.
        ``passes``: network passes (None = this registrar's setting, by default 1); each further pass
        registers the moving image warped by the flow so far and composes its flow (a cascade).
        ``fixed_mask``/``moving_mask``: masks on the fixed/moving image's grid (nonzero = inside) that
        restrict the affine fit, weight the refinement's similarity (fixed mask) and bound the QC NCC (fixed
        mask). ``fixed_labels``: a label map on the fixed grid; with ``labels`` the QC gets Dice before/after.
        ``initial_affine``: an ITK affine file (``.mat``/``.txt``, as ``affine.mat``) or a (4, 4) fixed world
        → moving world RAS matrix: the start of the affine fit, or the pre-alignment itself with
        ``affine=False``; composed into every output like a fitted one.
        """
        from emorph_deploy.registration.native import (
            jacobian_determinant_native,
            warp_to_native,
        )

        refine_cfg = _refine_config(refine)  # a bad value fails before any work on the pair
        n_passes = self.passes if passes is None else check_passes(passes)
        use_affine = self.affine if affine is None else affine
        initial = _initial_matrix(initial_affine)
        times: dict[str, float] = {}
        with stopwatch(times, "total"):
            with stopwatch(times, "load"):
                fixed_img, moving_img, labels_img = self._load(fixed, moving, labels, validate)
                extras = load_extras(
                    fixed_img,
                    moving_img,
                    fixed_mask=fixed_mask,
                    moving_mask=moving_mask,
                    fixed_labels=fixed_labels,
                )
            f_data, f_aff = np.asanyarray(fixed_img.dataobj), np.asarray(fixed_img.affine, dtype=np.float64)
            m_data, m_aff = np.asanyarray(moving_img.dataobj), np.asarray(moving_img.affine, dtype=np.float64)
            pre, qc_affine = initial, {}
            if use_affine:
                with stopwatch(times, "affine"):
                    pre, qc_affine = self._prealign(f_data, f_aff, m_data, m_aff, extras, initial)
            elif initial is not None:
                qc_affine = {"affine_matrix": initial.tolist(), "affine_source": "initial"}
            with stopwatch(times, "resample"):
                pair = self._to_model_grid(
                    fixed_img, f_data, f_aff, m_data, m_aff, pre, extras.get("fixed_mask")
                )
            check_overlap(pair.fixed, pair.moving, pre is not None)
            with stopwatch(times, "infer"):
                out, model_s = self._infer(pair, network, n_passes)
            flow = self._checked_flow(out)
            refine_info: dict[str, Any] = {}  # the similarity used ("auto" resolved) and why, for qc.json
            if refine_cfg.steps:
                with stopwatch(times, "refine"):
                    flow = self._refine(pair, flow, refine_cfg, refine_info, out.get("warped"), network)
                out = {"flow": flow}  # the network's "warped" is stale after refinement: QC re-warps
            with stopwatch(times, "resample_back"):
                nw = warp_to_native(
                    flow,
                    pair.affine,
                    f_data.shape,
                    f_aff,
                    m_data,
                    m_aff,
                    pre_affine=pre,
                    labels=np.asanyarray(labels_img.dataobj) if labels_img is not None else None,
                    labels_affine=labels_img.affine if labels_img is not None else None,
                )
            with stopwatch(times, "qc"):
                # the network warped what it was fed: a contrast-matched image is not the moving image
                net_warped = out.get("warped") if pair.matched is None else None
                ncc_before, ncc_after, region, stats, slices, check = self._quality(pair, flow, net_warped)
                overlap = _label_overlap(extras.get("fixed_labels"), labels_img, nw, fixed_img)
            inverse = _lazy_inverse(flow, pair.affine, m_data.shape, m_aff, pre, moving_img.header)
            with stopwatch(times, "jacobian"):
                jac = jacobian_determinant_native(nw.displacement_lps, f_aff)
            with stopwatch(times, "package"):
                warped_img, disp_img, labels_out = _package(nw, fixed_img, labels_img)
                jac_img = like_fixed(jac, fixed_img, np.float32, "emorph Jacobian determinant")
        qc = RegistrationQC(
            backend=self.backend,
            precision=self.precision,
            model_grid=self.grid_shape,
            model_spacing_mm=self.preprocessing.spacing_mm,
            fixed_shape=f_data.shape,
            moving_shape=m_data.shape,
            affine_prealignment=pre is not None,
            affine=qc_affine,
            ncc_before=ncc_before,
            ncc_after=ncc_after,
            qc_region=region,
            deformable_check=check,
            masks={"fixed": fixed_mask is not None, "moving": moving_mask is not None},
            label_overlap=overlap,
            deformation=stats,
            model_latency_s=model_s,
            network=bool(network),
            passes=n_passes if network else 0,
            contrast=pair.contrast,
            refine={**refine_cfg.to_dict(), **refine_info} if refine_cfg.steps else None,
            times_s=times,
        )
        return Result(
            warped=warped_img,
            displacement=disp_img,
            warped_labels=labels_out,
            qc=qc.to_dict(),
            pre_affine=pre,
            jacobian=jac_img,
            _inverse=inverse,
            qc_slices=slices,
        )

    # ------------------------------------------------------------------ stages
    @staticmethod
    def _load(
        fixed: Any, moving: Any, labels: Any, validate: bool
    ) -> tuple[nib.Nifti1Image, nib.Nifti1Image, nib.Nifti1Image | None]:
        """The three images, validated unless ``validate`` is False and both images are already nibabel."""
        if validate or not all(isinstance(x, nib.Nifti1Image) for x in (fixed, moving)):
            return load_inputs(fixed, moving, labels)
        if labels is None or isinstance(labels, nib.Nifti1Image):
            return fixed, moving, labels
        from emorph_deploy.data.nifti import as_label_image

        return fixed, moving, as_label_image(labels, name="moving labels")

    def _prealign(
        self,
        f_data: np.ndarray,
        f_aff: np.ndarray,
        m_data: np.ndarray,
        m_aff: np.ndarray,
        extras: dict[str, np.ndarray],
        initial: np.ndarray | None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The affine pre-alignment (4, 4) fixed world → moving world (RAS mm; the identity, or ``initial``,
        when the fit is rejected) and its qc.json keys."""
        from emorph_deploy.registration.affine import affine_prealign

        fit = affine_prealign(
            f_data,
            f_aff,
            m_data,
            m_aff,
            self.affine_config,
            fixed_mask=extras.get("fixed_mask"),
            moving_mask=extras.get("moving_mask"),
            initial=initial,
        )
        source = "fit" if initial is None else "initial+fit"
        # fit.qc(): affine_ncc_init/final, _metric, _value_init/final, _accepted, _start, _reason, _mi_*
        return fit.matrix, {"affine_matrix": fit.matrix.tolist(), "affine_source": source, **fit.qc()}

    def _to_model_grid(
        self,
        fixed_img: nib.Nifti1Image,
        f_data: np.ndarray,
        f_aff: np.ndarray,
        m_data: np.ndarray,
        m_aff: np.ndarray,
        pre: np.ndarray | None,
        fixed_mask: np.ndarray | None = None,
    ) -> _ModelGridPair:
        """Intensity normalisation on the native voxels, then trilinear resampling onto the model grid
        (centred on the fixed FOV; the moving image through the pre-alignment ``pre``), clipped to [0, 1];
        the fixed mask (native grid) resampled as the share of each model voxel inside it."""
        from emorph_deploy.data.resample import resample_to_grid

        prep = self.preprocessing
        grid = prep.grid_affine(fixed_img)
        shape = self.grid_shape
        # the two percentile searches are single-threaded numpy (GIL released): run them side by side
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="emorph-norm") as pool:
            f_job, m_job = pool.submit(prep.normalise, f_data), pool.submit(prep.normalise, m_data)
            (f_norm, _, _), (m_norm, _, _) = f_job.result(), m_job.result()
        fixed_m = resample_to_grid(f_norm, f_aff, shape, grid, order=1, cval=0.0)
        m_src_aff = m_aff if pre is None else np.linalg.inv(pre) @ m_aff
        moving_m = resample_to_grid(m_norm, m_src_aff, shape, grid, order=1, cval=0.0)
        del f_norm
        np.clip(fixed_m, 0.0, 1.0, out=fixed_m)
        np.clip(moving_m, 0.0, 1.0, out=moving_m)
        moving_id = moving_m
        if pre is not None:  # for "NCC before": the moving image without any registration
            moving_id = resample_to_grid(m_norm, m_aff, shape, grid, order=1, cval=0.0)
            np.clip(moving_id, 0.0, 1.0, out=moving_id)
        imap, contrast = self._contrast_map(moving_m, fixed_m) if self.match_contrast else (None, None)
        matched = None
        if imap is not None:
            # mapped on the native voxels, then resampled: at an inverted brain's edge the bright rim is made
            # dark before trilinear blending with the background, not a blend made mid-grey after it
            matched = resample_to_grid(imap(m_norm), m_src_aff, shape, grid, order=1, cval=0.0)
            np.clip(matched, 0.0, 1.0, out=matched)
        mask_m = None
        if fixed_mask is not None:
            mask_m = resample_to_grid(fixed_mask.astype(np.float32), f_aff, shape, grid, order=1, cval=0.0)
            if not np.count_nonzero(mask_m >= 0.5):
                raise InputError(
                    "fixed mask: expected voxels inside the model's field of view (centred on the fixed "
                    "image), got none; fix: pass the mask of this fixed image"
                )
        return _ModelGridPair(
            fixed=fixed_m,
            moving=moving_m,
            moving_unaligned=moving_id,
            affine=grid,
            fixed_mask=mask_m,
            matched=matched,
            contrast=contrast,
        )

    @staticmethod
    def _contrast_map(moving: np.ndarray, fixed: np.ndarray) -> tuple[IntensityMap | None, dict[str, Any]]:
        """The map that gives the moving image the fixed image's contrast, fitted on the pre-aligned pair
        (D, H, W) on the model grid, when :func:`contrast_agreement` finds the contrasts different (else
        None), and the figures for ``qc.json``: an inversion by :func:`fit_inversion_map` (``map``
        "inversion"), any other relation by :func:`fit_intensity_map` (``map`` "conditional-median")."""
        from emorph_deploy.contrast import contrast_agreement, fit_intensity_map, fit_inversion_map

        agreement = contrast_agreement(moving, fixed)
        info = {"matched": False, **agreement}
        if agreement["same_contrast"]:
            return None, info
        if agreement["relation"] == "inverted":
            return fit_inversion_map(moving, fixed), {**info, "matched": True, "map": "inversion"}
        return fit_intensity_map(moving, fixed), {**info, "matched": True, "map": "conditional-median"}

    def _infer(
        self, pair: _ModelGridPair, network: bool, passes: int = 1
    ) -> tuple[dict[str, np.ndarray], float | None]:
        """The runner's outputs (``flow`` (1, 3, D, H, W), maybe ``warped``) and its latency in seconds (all
        passes); ``network=False``: a zero flow and no latency. With ``passes`` > 1 the moving image warped
        by the flow so far is registered again and the flows are composed
        (:func:`emorph_deploy.models.warp.compose`); the output is then the composed ``flow`` alone."""
        if not network:  # ablation: no network, zero initial flow
            return {"flow": np.zeros((1, 3, *self.grid_shape), dtype=np.float32)}, None
        moving = pair.moving_for_network
        out, latency = self._run_network(moving, pair.fixed)
        for _ in range(passes - 1):
            import torch

            from emorph_deploy.models.warp import compose, warp

            total = torch.from_numpy(self._checked_flow(out))[None]  # (1, 3, D, H, W)
            warped = warp(torch.from_numpy(moving)[None, None], total)[0, 0].numpy()  # one interpolation
            nxt, secs = self._run_network(warped, pair.fixed)
            step = torch.from_numpy(self._checked_flow(nxt))[None]
            out, latency = {"flow": compose(total, step).numpy()}, latency + secs
        return out, latency

    def _run_network(self, moving: np.ndarray, fixed: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
        """One inference on (D, H, W) model-grid arrays: the runner's outputs and latency in seconds."""
        feed = {"moving": moving[None, None], "fixed": fixed[None, None]}
        try:
            with self._lock:
                return self.runner.infer(feed), self.runner.last_latency_s
        except EmorphError:
            raise
        except Exception as exc:
            raise ProcessingError(
                f"inference: expected the {self.backend} runner to produce a flow, got "
                f"{type(exc).__name__}: {exc}; fix: check the artifact with `emorph check`"
            ) from exc

    def _checked_flow(self, out: dict[str, np.ndarray]) -> np.ndarray:
        """The runner's flow as (3, D, H, W) float32 model-grid voxels; ProcessingError unless finite and of
        the model grid's shape."""
        shape = self.grid_shape
        flow = np.asarray(out["flow"], dtype=np.float32)
        if flow.shape != (1, 3, *shape):
            raise ProcessingError(
                f"inference: expected flow (1, 3, {', '.join(map(str, shape))}), got "
                f"{flow.shape}; fix: re-export the artifact"
            )
        flow = flow[0]
        if not np.isfinite(flow).all():
            raise ProcessingError(
                "inference: expected a finite flow, got NaN/Inf; fix: check the artifact "
                "(e.g. fp16 overflow) with `emorph check`"
            )
        return flow

    @staticmethod
    def _refine(
        pair: _ModelGridPair,
        flow: np.ndarray,
        cfg: RefineConfig,
        info: dict[str, Any],
        warped: np.ndarray | None = None,
        network: bool = True,
    ) -> np.ndarray:
        """Test-time refinement of ``flow`` (3, D, H, W) on the model grid; ``info`` receives the similarity
        used and why. A pair matched by the inversion map (a histogram match, as faithful as a same-contrast
        image) refines its matched image as a same-contrast pair. A pair matched by the conditional-median
        map refines the moving image *as given* on a modality-independent similarity (NGF under ``auto``, or
        the NGF / MIND-SSC requested): that map gives tissues sharing a moving intensity one fixed
        intensity, so the matched image lacks edges the fixed image has, and local NCC on it pulled those
        pairs off (see the model card, "Across contrasts"); only a requested NCC refines the matched image.
        ``network``: the flow is the network's (False: a zero flow, refinement alone)."""
        import torch

        from emorph_deploy.refine import refine_flow

        requested = Similarity.coerce(cfg.similarity)
        as_given = pair.loosely_matched and requested is not Similarity.ncc
        moving = pair.moving if as_given else pair.moving_for_network
        similarity = Similarity.ngf if as_given and requested is Similarity.auto else requested
        mask = None if pair.fixed_mask is None else torch.from_numpy(pair.fixed_mask)[None, None]
        seen = None if warped is None or as_given else torch.from_numpy(np.asarray(warped, np.float32))
        out = refine_flow(
            torch.from_numpy(moving)[None, None],
            torch.from_numpy(pair.fixed)[None, None],
            torch.from_numpy(flow)[None],
            **{**cfg.to_dict(), "similarity": similarity},
            info=info,
            fixed_mask=mask,
            warped_init=seen,
            network_init=network,
        )[0].numpy()
        if pair.loosely_matched:
            info["similarity_requested"] = requested.value
            image = "the moving image as given" if as_given else "the matched image"
            info["contrast"] = {"matched": True, "map": "conditional-median", "refined": image}
        return out

    def _quality(
        self, pair: _ModelGridPair, flow: np.ndarray, warped: np.ndarray | None
    ) -> tuple[float, float, str, dict[str, Any], dict[str, dict[str, np.ndarray]], dict[str, Any]]:
        """NCC before/after inside the QC region (and its name), Jacobian statistics, the centre slices
        for ``qc.png`` and the deformable stage's check, all on the model grid. ``warped`` is the
        network's warped moving image (1, 1, D, H, W) when it returned one for this ``flow``; otherwise the
        moving image is warped here."""
        import torch

        from emorph_deploy.qc import (
            deformation_stats,
            fixed_foreground,
            jacobian_determinant_fast,
            orthogonal_slices,
            region_ncc,
        )

        shape = self.grid_shape
        warped_seen = None  # the contrast-matched image warped, for the deformable check
        # the network's own output is the warped moving image only when it was fed that image (unmatched)
        if warped is not None and pair.matched is None and np.shape(warped) == (1, 1, *shape):
            warped_m = np.asarray(warped, dtype=np.float32)[0, 0]
        else:
            from emorph_deploy.models.warp import warp

            # the matched image rides along as a second channel: one sampling pass for both
            images = [pair.moving] if pair.matched is None else [pair.moving, pair.matched]
            with torch.inference_mode():
                stack = torch.from_numpy(np.stack(images))[None]
                out = warp(stack, torch.from_numpy(flow)[None]).numpy()[0]
            warped_m = out[0]
            warped_seen = out[1] if pair.matched is not None else None
        jac = jacobian_determinant_fast(flow)
        stats = deformation_stats(jac)
        if pair.fixed_mask is not None:
            region, name = pair.fixed_mask >= 0.5, "fixed-mask"
        else:
            region = fixed_foreground(pair.fixed)
            name = "volume" if region is None else "fixed-foreground"
        ncc_before = region_ncc(pair.fixed, pair.moving_unaligned, region)
        ncc_after = region_ncc(pair.fixed, warped_m, region)
        check = self._deformable_check(pair, warped_m, region, warped_seen)
        slices = orthogonal_slices(pair.fixed, pair.moving_unaligned, warped_m, flow, jac)
        return ncc_before, ncc_after, name, stats, slices, check

    @staticmethod
    def _deformable_check(
        pair: _ModelGridPair,
        warped_m: np.ndarray,
        region: np.ndarray | None,
        warped_seen: np.ndarray | None,
    ) -> dict[str, Any]:
        """:func:`~emorph_deploy.qc.deformable_check` on the image the network and the refinement saw: the
        pre-aligned moving image (``warped_m`` after the flow), or its contrast-matched version
        (``warped_seen``; judged only when it ends correlated by ``NCC_MIN_R``). Not judged when the
        contrasts differ and were not matched."""
        from emorph_deploy.contrast import NCC_MIN_R
        from emorph_deploy.qc import deformable_check

        if pair.matched is not None:
            return deformable_check(pair.fixed, pair.matched, warped_seen, region, min_ncc=NCC_MIN_R)
        if not (pair.contrast or {}).get("same_contrast", True):
            reason = "the contrasts differ and were not matched (--no-match-contrast): NCC says little"
            return {"judged": False, "reason": reason}
        return deformable_check(pair.fixed, pair.moving, warped_m, region)

    def __repr__(self) -> str:
        return f"Registrar(backend={self.backend!r}, precision={self.precision!r}, grid={self.grid_shape})"


def _lazy_inverse(
    flow: np.ndarray,
    grid_affine: np.ndarray,
    moving_shape: tuple[int, ...],
    moving_affine: np.ndarray,
    pre: np.ndarray | None,
    header: Any,
) -> Any:
    """A function computing the inverse displacement image (ITK, LPS mm on the moving grid) of ``flow``."""

    def compute() -> nib.Nifti1Image:
        from emorph_deploy.registration.native import inverse_displacement, itk_displacement_image

        inv_lps = inverse_displacement(flow, grid_affine, moving_shape, moving_affine, pre_affine=pre)
        return itk_displacement_image(inv_lps, moving_affine, header=header)

    return compute


def _package(
    nw: NativeWarp,
    fixed_img: nib.Nifti1Image,
    labels_img: nib.Nifti1Image | None,
) -> tuple[nib.Nifti1Image, nib.Nifti1Image, nib.Nifti1Image | None]:
    """The native-grid outputs as NIfTI images with the fixed image's header: warped, ITK displacement,
    warped labels (or None)."""
    from emorph_deploy.registration.native import itk_displacement_image

    f_aff = np.asarray(fixed_img.affine, dtype=np.float64)
    warped_img = like_fixed(nw.warped, fixed_img, np.float32, "emorph warped moving", intensity=True)
    disp_img = itk_displacement_image(nw.displacement_lps, f_aff, header=fixed_img.header)
    labels_out = None
    if labels_img is not None and nw.warped_labels is not None:
        labels_out = like_fixed(
            nw.warped_labels,
            fixed_img,
            _ras_label_dtype(labels_img),
            "emorph warped labels",
            intent=labels_img.header,
        )
    return warped_img, disp_img, labels_out


def _refine_config(refine: int | RefineConfig | None) -> RefineConfig:
    """``refine`` of :meth:`Registrar.register` as a config: None = the defaults, N = the defaults with N
    steps; InputError on a bad value."""
    from emorph_deploy.refine import RefineConfig

    if isinstance(refine, RefineConfig):
        return RefineConfig.coerce(refine)
    return DEFAULTS.refine_config(steps=refine)


def _initial_matrix(initial: Any) -> np.ndarray | None:
    """``initial_affine`` as a (4, 4) float64 RAS matrix (an ITK affine file is read); InputError when it
    is neither a readable file nor an invertible 4x4 affine."""
    if initial is None:
        return None
    if isinstance(initial, str | os.PathLike):
        from emorph_deploy.data.transforms import read_itk_affine

        return read_itk_affine(initial, name="initial affine")
    m = np.asarray(initial, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:3, :3])) < 1e-9:
        raise InputError(
            f"initial affine: expected an invertible (4, 4) matrix or an ITK affine file, got shape "
            f"{m.shape}; fix: pass the affine.mat of an earlier run"
        )
    return m


def load_extras(
    fixed_img: nib.Nifti1Image,
    moving_img: nib.Nifti1Image,
    *,
    fixed_mask: Any = None,
    moving_mask: Any = None,
    fixed_labels: Any = None,
) -> dict[str, np.ndarray]:
    """The optional inputs on the fixed/moving grids, validated (paths, nibabel images or ``(array,
    affine)`` pairs): ``fixed_mask``/``moving_mask`` as boolean arrays (nonzero = inside; integer-valued
    maps), ``fixed_labels`` as the label array. Only the given ones are keys. InputError when one is not
    on its image's grid (same shape and voxel-to-world affine)."""
    from emorph_deploy.data.nifti import as_label_image

    out: dict[str, np.ndarray] = {}
    for key, x, ref, role in (
        ("fixed_mask", fixed_mask, fixed_img, "fixed"),
        ("moving_mask", moving_mask, moving_img, "moving"),
        ("fixed_labels", fixed_labels, fixed_img, "fixed"),
    ):
        if x is None:
            continue
        what = key.replace("_", " ")
        img = as_label_image(x, name=what)
        aff, ref_aff = np.asarray(img.affine, float), np.asarray(ref.affine, float)
        same_affine = np.allclose(aff, ref_aff, rtol=0.0, atol=1e-3)
        if img.shape[:3] != ref.shape[:3] or not same_affine:
            raise InputError(
                f"{what}: expected the {role} image's grid (shape {tuple(ref.shape[:3])}, same "
                f"voxel-to-world affine), got shape {tuple(img.shape[:3])}"
                f"{'' if same_affine else ' and another affine'}; "
                f"fix: pass the {what.split()[-1]} made on this {role} image (or resample it onto it)"
            )
        data = np.asanyarray(img.dataobj)
        out[key] = data != 0 if key.endswith("mask") else data
    return out


def _label_overlap(
    fixed_labels: np.ndarray | None,
    labels_img: nib.Nifti1Image | None,
    nw: NativeWarp,
    fixed_img: nib.Nifti1Image,
) -> dict[str, Any]:
    """Dice before/after (:func:`emorph_deploy.qc.label_overlap`) when both label maps are given: the moving
    labels on the fixed grid without registration (nearest, world coordinates) and warped."""
    if fixed_labels is None or labels_img is None or nw.warped_labels is None:
        return {}
    from emorph_deploy.data.resample import resample_to_grid
    from emorph_deploy.qc import label_overlap

    before = resample_to_grid(
        np.asanyarray(labels_img.dataobj), labels_img.affine, fixed_img.shape[:3], fixed_img.affine, order=0
    )
    return label_overlap(fixed_labels, before, nw.warped_labels)


def load_inputs(fixed: Any, moving: Any, labels: Any = None) -> tuple[nib.Nifti1Image, nib.Nifti1Image, Any]:
    """Validate the inputs (paths, nibabel images or ``(array, affine)`` pairs); InputError on a defect.

    The inputs are read concurrently (gzip decoding and the numpy checks release the GIL); a defect is
    reported for the first bad input in argument order.
    """
    from emorph_deploy.data.nifti import as_image, as_label_image

    jobs: list[tuple[Any, Any, str]] = [(as_image, fixed, "fixed image"), (as_image, moving, "moving image")]
    if labels is not None:
        jobs.append((as_label_image, labels, "moving labels"))
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="emorph-load") as pool:
        futures = [pool.submit(fn, x, name=name) for fn, x, name in jobs]
    fixed_img, moving_img, *rest = (f.result() for f in futures)
    return fixed_img, moving_img, (rest[0] if rest else None)


def like_fixed(
    data: np.ndarray,
    fixed_img: nib.Nifti1Image,
    dtype: Any,
    descrip: str,
    *,
    intensity: bool = False,
    intent: Any = None,
) -> nib.Nifti1Image:
    """``data`` on the fixed grid with the fixed header: its qform/sform codes (the world's meaning),
    its intent and ``cal_min``/``cal_max`` when ``intensity`` (an image of the fixed's kind), else the
    intent of the header ``intent`` (e.g. a label map's) or none, and no display range."""
    from emorph_deploy.data.nifti import header_codes

    hdr = fixed_img.header.copy()
    img = nib.Nifti1Image(data, fixed_img.affine, hdr)
    img.header.set_data_dtype(np.dtype(dtype))
    img.header.set_slope_inter(None, None)
    if not intensity:
        img.header.set_intent("none", ())
        img.header["cal_min"] = img.header["cal_max"] = 0.0
    if intent is not None:
        with contextlib.suppress(Exception):  # a foreign header type: no intent to carry
            for key in ("intent_code", "intent_name", "intent_p1", "intent_p2", "intent_p3"):
                img.header[key] = intent[key]
    img.header["descrip"] = descrip.encode()[:79]
    qcode, scode = header_codes(fixed_img.header)
    img.set_qform(fixed_img.affine, code=qcode)
    img.set_sform(fixed_img.affine, code=scode)
    return img
