"""NIfTI input/output with validation.

Every problem a user can cause (missing file, not NIfTI, corrupt gzip, truncated data, wrong dimensionality,
NaN/Inf voxels, constant volume, singular affine, non-integer label values) raises :class:`InputError` with
one line: what was expected, what was got, and the fix.

Images returned by :func:`load_volume` / :func:`as_image` are in-memory ``nib.Nifti1Image`` objects holding a
3D array (a 4D file with a single volume is squeezed) and the validated affine (``img.affine``, RAS+ world
mm). Intensity images hold float32 data; label maps (:func:`load_label_map`) hold integer data with the
original values, and ``img.header.get_data_dtype()`` still records the on-disk dtype so outputs can be written
with it (see :func:`label_dtype`).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from emorph_deploy.errors import InputError

__all__ = [
    "ImageLike",
    "as_image",
    "as_label_image",
    "check_affine",
    "header_codes",
    "label_dtype",
    "load_label_map",
    "load_volume",
    "save_nifti_atomic",
]

#: Anything accepted where an image is expected: a path, a nibabel image, or an ``(array, affine)`` pair.
ImageLike = Any

_NIFTI_TYPES = (nib.Nifti1Pair, nib.Nifti2Pair)
#: Header fields an input's in-memory image keeps (the geometry codes are carried by :func:`header_codes`).
_KEPT_HEADER_KEYS = (
    "xyzt_units",
    "descrip",
    "intent_code",
    "intent_name",
    "intent_p1",
    "intent_p2",
    "intent_p3",
    "cal_min",
    "cal_max",
)  # Nifti1Image / Nifti2Image are subclasses
#: Largest voxel data (bytes) read by the one-call ``.nii.gz`` decoder; bigger files stream through nibabel.
FAST_READ_MAX_BYTES = 1 << 30
#: Largest voxel data (bytes) a header may declare: far above any 3D scan (a 0.25 mm whole head in float32 is
#: ~2 GB), far below what would exhaust memory. Checked before anything is allocated.
MAX_VOXEL_BYTES = 4 << 30
#: deflate cannot expand data more than ~1032:1, so a ``.nii.gz`` smaller than declared/1032 is truncated
_DEFLATE_MAX_RATIO = 1032


def _describe(name: str, source: object) -> str:
    return f"{name} {source}" if isinstance(source, str | os.PathLike) else name


#: voxel sizes (mm, the column norms of the affine) outside this range are a corrupt header, not a scan:
#: 0.1 µm (beyond any microscopy registered with a 3D brain model) to 10 m
VOXEL_MM_RANGE = (1e-4, 1e4)
#: world coordinates of the first voxel beyond ±1 km are a corrupt header (scanner coordinates are metres)
MAX_ORIGIN_MM = 1e6


def check_affine(affine: Any, what: str = "image") -> np.ndarray:
    """Return ``affine`` as a float64 (4, 4) array, or raise InputError if it is non-finite, singular, has
    voxel sizes outside :data:`VOXEL_MM_RANGE` or an origin beyond :data:`MAX_ORIGIN_MM`."""
    try:
        a = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"{what}: expected a 4x4 numeric affine, got {type(affine).__name__}; fix: pass a 4x4 "
            "voxel-to-world matrix"
        ) from exc
    if a.shape == (3, 4):
        a = np.vstack([a, [0.0, 0.0, 0.0, 1.0]])
    if a.shape != (4, 4):
        raise InputError(
            f"{what}: expected a 4x4 affine, got shape {a.shape}; fix: pass a 4x4 voxel-to-world matrix"
        )
    if not np.all(np.isfinite(a)):
        raise InputError(
            f"{what}: expected a finite affine, got NaN/Inf entries in the voxel-to-world matrix; "
            "fix: repair the header (sform/qform) of the file"
        )
    lin = a[:3, :3]
    scale = float(np.abs(lin).max())
    with np.errstate(over="ignore"):  # text headers (NRRD, DICOM) can hold 1e308: det is then inf
        det = float(np.linalg.det(lin))
    # relative to the scale (not det <= 1e-9 * scale**3, which overflows for such headers)
    if scale == 0.0 or abs(float(np.linalg.det(lin / scale))) <= 1e-9:
        raise InputError(
            f"{what}: expected an invertible affine, got a singular voxel-to-world matrix "
            f"(det {det:.3g}); fix: repair the header (sform/qform, pixdim) of the file"
        )
    from emorph_deploy.data.orientation import voxel_sizes

    with np.errstate(over="ignore"):
        voxel_mm = voxel_sizes(a)
    lo, hi = VOXEL_MM_RANGE
    if not np.all((voxel_mm >= lo) & (voxel_mm <= hi)):
        sizes = " x ".join(f"{v:.3g}" for v in voxel_mm)
        raise InputError(
            f"{what}: expected voxel sizes between {lo:g} and {hi:g} mm, got {sizes} mm in the "
            "voxel-to-world matrix; fix: repair the header (sform/qform, pixdim) of the file"
        )
    origin = a[:3, 3]
    if np.abs(origin).max() > MAX_ORIGIN_MM:
        where = ", ".join(f"{v:.3g}" for v in origin)
        raise InputError(
            f"{what}: expected the first voxel within {MAX_ORIGIN_MM:g} mm of the world origin, got "
            f"({where}) mm; fix: repair the header (sform/qform offsets) of the file"
        )
    return a


def _squeeze_to_3d(data: np.ndarray, what: str) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    elif data.ndim == 5 and data.shape[3] == 1 and data.shape[4] == 1:
        data = data[..., 0, 0]
    if data.ndim == 4:
        raise InputError(
            f"{what}: expected a 3D volume (or 4D with one volume), got a 4D series of "
            f"{data.shape[3]} volumes {data.shape}; fix: extract one volume first "
            "(e.g. fslroi in out 0 1)"
        )
    if data.ndim != 3:
        raise InputError(
            f"{what}: expected a 3D volume, got {data.ndim}D data of shape {data.shape}; "
            "fix: pass a single 3D image"
        )
    if min(data.shape) < 2:
        raise InputError(
            f"{what}: expected a 3D volume with at least 2 voxels per axis, got shape {data.shape}; "
            "fix: pass a 3D volume, not a single slice"
        )
    return data


def _check_values(data: np.ndarray, what: str, *, allow_constant: bool = False) -> None:
    flat = data.ravel(order="K")  # a view for C- and Fortran-ordered data: numpy's fast contiguous loops
    if data.dtype.kind == "f" or data.dtype.kind == "c":
        finite = np.isfinite(flat)
        if not finite.all():
            n_bad = int(data.size - np.count_nonzero(finite))
            raise InputError(
                f"{what}: expected finite voxel values, got {n_bad} NaN/Inf voxels; "
                "fix: replace them (e.g. fslmaths in -nan out) or re-export the image"
            )
    if data.dtype.kind not in "biuf":
        raise InputError(
            f"{what}: expected numeric voxel data, got dtype {data.dtype}; fix: convert the image "
            "to an integer or float type"
        )
    if not allow_constant:
        lo, hi = flat.min(), flat.max()
        if lo == hi:
            kind = "all-zero" if lo == 0 else f"constant ({float(lo):g})"
            raise InputError(
                f"{what}: expected an image with contrast, got an {kind} volume; "
                "fix: check that the right file was passed and that it is not empty"
            )


def _read_nii_gz_fast(p: Path) -> tuple[nib.spatialimages.SpatialImage, np.ndarray] | None:
    """A single-file ``.nii.gz`` decoded in one call (ISA-L's igzip when installed, else zlib), outside the
    GIL, then parsed by nibabel from memory: faster than nibabel's streamed gzip reader, and concurrent
    reads really overlap. None for anything it does not cover (or any failure): the caller falls back to
    ``nib.load``, which also produces the error message.

    Peak memory is ~3x the voxel data (compressed file, decoded bytes, array), so volumes over
    :data:`FAST_READ_MAX_BYTES` take nibabel's streamed path (one copy)."""
    if not p.name.lower().endswith(".nii.gz"):
        return None
    try:
        try:
            from isal.igzip import decompress
        except ImportError:  # pragma: no cover - isal is a dependency; plain zlib works too
            from gzip import decompress
        packed = p.read_bytes()
        head = zlib.decompressobj(31).decompress(packed[: 1 << 16], 540)  # the header first: how big is it?
        nifti2 = 540 in (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big"))
        hdr_cls, cls = (nib.Nifti2Header, nib.Nifti2Image) if nifti2 else (nib.Nifti1Header, nib.Nifti1Image)
        if len(head) < hdr_cls.sizeof_hdr:
            return None
        hdr = hdr_cls(binaryblock=head[: hdr_cls.sizeof_hdr], check=False)
        nbytes = int(np.prod(hdr.get_data_shape(), dtype=np.int64)) * hdr.get_data_dtype().itemsize
        if nbytes > FAST_READ_MAX_BYTES:
            return None
        img = cls.from_bytes(decompress(packed))
        return img, np.asanyarray(img.dataobj)
    except Exception:
        return None


def _load_nifti(path: str | os.PathLike, what: str) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """Open a NIfTI file (or another format / a DICOM folder, see :mod:`emorph_deploy.data.imageio_formats`)
    and read its (scaled) voxel array, mapping every failure to InputError."""
    from emorph_deploy.data.imageio_formats import FORMATS_HINT, is_foreign, read_foreign

    p = Path(path)
    if not p.exists():
        raise InputError(
            f"{what}: expected an existing image file ({FORMATS_HINT}), got a missing path; "
            "fix: check the path"
        )
    if is_foreign(p):  # MGH/NRRD/MetaImage file or DICOM folder: same guarantees, own header checks
        return read_foreign(p, what)
    _check_header(p, what)
    fast = _read_nii_gz_fast(p)
    if fast is not None:
        return fast
    try:
        img = nib.load(str(p))
    except nib.filebasedimages.ImageFileError as exc:
        raise InputError(
            f"{what}: expected an image file ({FORMATS_HINT}), got a file nibabel cannot read as an "
            f"image ({_short(exc)}); fix: convert it to NIfTI (e.g. dcm2niix, mri_convert)"
        ) from exc
    except Exception as exc:  # gzip/zlib/EOF/header errors
        raise InputError(
            f"{what}: expected a readable NIfTI file, got a corrupt or truncated file "
            f"({type(exc).__name__}: {_short(exc)}); fix: re-export or re-download it"
        ) from exc
    if not isinstance(img, _NIFTI_TYPES):
        raise InputError(
            f"{what}: expected an image file ({FORMATS_HINT}), got {type(img).__name__}; fix: convert it to "
            "NIfTI (e.g. mri_convert in.img out.nii.gz)"
        )
    try:
        data = np.asanyarray(img.dataobj)
        if isinstance(data, np.memmap):  # read now, in the file's order: no file-backed arrays leave here
            data = np.array(data, order="K")
    except Exception as exc:  # corrupt gzip stream, truncated data, ...
        raise InputError(
            f"{what}: expected a complete NIfTI file, got corrupt or truncated voxel data "
            f"({type(exc).__name__}: {_short(exc)}); fix: re-export or re-download it"
        ) from exc
    return img, data


def _read_header_bytes(p: Path, n: int = 544) -> bytes:
    """The first ``n`` (decompressed) bytes of ``p``: enough for a NIfTI-1 or NIfTI-2 header."""
    with open(p, "rb") as f:
        raw = f.read(1 << 16 if p.name.lower().endswith(".gz") else n)
    if not p.name.lower().endswith(".gz"):
        return raw
    try:
        return zlib.decompressobj(31).decompress(raw, n)
    except zlib.error:
        return b""  # not gzip: nibabel reports it


def declared_voxel_bytes(header: Any) -> int:
    """Bytes of voxel data a NIfTI header declares (shape x item size), in exact integer arithmetic."""
    n = 1
    for d in header.get_data_shape():
        n *= int(d)
    return n * header.get_data_dtype().itemsize


def _check_header(p: Path, what: str) -> None:
    """Refuse, before any allocation, a header that declares more voxel data than :data:`MAX_VOXEL_BYTES` or
    than the file can hold (``.nii``: the bytes after ``vox_offset``; ``.nii.gz``: the deflate bound), or
    zero voxel sizes. The raw header is read: nibabel's own checks silently repair some fields."""
    head = _read_header_bytes(p)
    hdr = None
    for cls in (nib.Nifti1Header, nib.Nifti2Header):
        if len(head) >= cls.sizeof_hdr:
            try:
                hdr = cls(binaryblock=head[: cls.sizeof_hdr], check=False)
                if int(hdr["sizeof_hdr"]) == cls.sizeof_hdr:
                    break
            except Exception:  # not this kind of header (or garbage): try the next, then leave it to nibabel
                pass
            hdr = None
    if hdr is None:
        return
    _check_voxel_sizes(hdr, what)
    try:
        declared = declared_voxel_bytes(hdr)
        offset = int(hdr["vox_offset"])
    except Exception:  # an unreadable shape/dtype: nibabel produces the error message
        return
    if declared > MAX_VOXEL_BYTES:
        raise InputError(
            f"{what}: expected at most {MAX_VOXEL_BYTES / 2**30:g} GiB of voxel data, got a header declaring "
            f"shape {tuple(hdr.get_data_shape())} {hdr.get_data_dtype()} ({declared / 2**30:.3g} GiB); "
            "fix: repair the header, or crop/downsample the image"
        )
    size = p.stat().st_size
    if p.name.lower().endswith(".gz"):
        room, unit = size * _DEFLATE_MAX_RATIO, "that a gzip file of this size can hold"
    else:
        room, unit = size - max(offset, hdr.sizeof_hdr), "in the file after its header"
    if declared > room:
        raise InputError(
            f"{what}: expected a complete NIfTI file, got a truncated file: its header declares {declared} "
            f"bytes of voxel data, more than the {max(room, 0)} bytes {unit} ({size} bytes on disk); fix: "
            "re-export or re-download it"
        )


def _check_voxel_sizes(header: Any, what: str) -> None:
    """Without an sform, the affine is built from ``pixdim``: a zero or non-finite voxel size there is
    refused (nibabel would silently read it as 1 mm)."""
    try:
        if int(header["sform_code"]) > 0:
            return
        zooms = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    except Exception:
        return
    bad = [i for i, z in enumerate(zooms) if not np.isfinite(z) or z == 0]
    if bad:
        raise InputError(
            f"{what}: expected positive voxel sizes (pixdim) in a header without sform, got "
            f"{', '.join(f'{zooms[i]:g} on axis {i}' for i in bad)}; fix: set the voxel size in the header "
            "(e.g. fslchpixdim, nibabel set_zooms) or write an sform"
        )


def _short(exc: BaseException, n: int = 120) -> str:
    s = " ".join(str(exc).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def _header_for(
    data: np.ndarray, affine: np.ndarray, header: Any = None, disk_dtype: Any = None
) -> nib.Nifti1Header:
    hdr = nib.Nifti1Header()
    if header is not None:
        try:
            for key in _KEPT_HEADER_KEYS:
                if key in header:
                    hdr[key] = header[key]
        except Exception:  # foreign header types: keep the default
            pass
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(disk_dtype if disk_dtype is not None else data.dtype)
    qcode, scode = header_codes(header)
    hdr.set_qform(affine, code=qcode)
    hdr.set_sform(affine, code=scode)
    return hdr


def header_codes(header: Any) -> tuple[int, int]:
    """``(qform_code, sform_code)`` of a NIfTI header, each at least 1 (scanner); ``(1, 1)`` for other
    headers. The meaning of the world space (2 aligned, 3 Talairach, 4 MNI, 5 template) travels with it."""
    try:
        q, s = int(header["qform_code"]), int(header["sform_code"])
    except Exception:  # None or a foreign header type
        return 1, 1
    return max(1, q), max(1, s)


def _make_image(
    data: np.ndarray, affine: np.ndarray, header: Any = None, disk_dtype: Any = None
) -> nib.Nifti1Image:
    hdr = _header_for(data, affine, header, disk_dtype)
    img = nib.Nifti1Image(data, affine, hdr)
    img.header.set_slope_inter(None, None)
    return img


def load_volume(path: str | os.PathLike, *, name: str = "image") -> nib.Nifti1Image:
    """Load and validate an intensity volume; return a 3D in-memory ``Nifti1Image`` with float32 data (one
    contiguous block, in the file's Fortran order as nibabel reads it: not transposed)."""
    what = _describe(name, path)
    img, data = _load_nifti(path, what)
    return _validated_intensity(data, img.affine, what, header=img.header)


def _validated_intensity(data: np.ndarray, affine: Any, what: str, header: Any = None) -> nib.Nifti1Image:
    affine = check_affine(affine, what)
    data = _squeeze_to_3d(np.asarray(data), what)
    _check_values(data, what)
    with np.errstate(over="ignore"):  # overflow to Inf is reported just below
        data32 = _contiguous(data, np.float32)
    if data.dtype != np.float32 and not np.all(np.isfinite(data32)):  # float32 input: checked just above
        raise InputError(
            f"{what}: expected values that fit float32, got values overflowing to Inf; fix: rescale the image"
        )
    return _make_image(data32, affine, header)


def load_label_map(path: str | os.PathLike, *, name: str = "label map") -> nib.Nifti1Image:
    """Load and validate an integer label map; values (and the on-disk dtype in the header) are preserved.

    Float label maps are accepted only if every value is an integer (e.g. FreeSurfer float32 asegs); they are
    returned as int32 arrays while ``header.get_data_dtype()`` keeps the original float dtype.
    """
    what = _describe(name, path)
    img, data = _load_nifti(path, what)
    return _validated_labels(
        data, img.affine, what, disk_dtype=img.header.get_data_dtype(), header=img.header
    )


def _validated_labels(
    data: np.ndarray, affine: Any, what: str, disk_dtype: Any = None, header: Any = None
) -> nib.Nifti1Image:
    affine = check_affine(affine, what)
    data = _squeeze_to_3d(np.asarray(data), what)
    _check_values(data, what, allow_constant=True)
    if data.dtype.kind == "b":
        data = data.astype(np.uint8)
    if data.dtype.kind == "f":
        rounded = np.round(data)
        frac = np.subtract(data, rounded)
        np.abs(frac, out=frac)
        if frac.max() > 1e-3:
            n_bad = int(np.count_nonzero(frac > 1e-3))
            raise InputError(
                f"{what}: expected integer label values, got {n_bad} voxels with fractional values "
                f"(e.g. {float(data[frac > 1e-3].flat[0]):g}); fix: pass a segmentation, not an "
                "intensity image or a probability map (threshold/argmax it first)"
            )
        del frac
        lo, hi = rounded.min(), rounded.max()
        if lo < np.iinfo(np.int32).min or hi > np.iinfo(np.int32).max:
            raise InputError(
                f"{what}: expected label values that fit int32, got range "
                f"[{lo:g}, {hi:g}]; fix: relabel the segmentation"
            )
        data = rounded.astype(np.int32, order="K")
    else:
        lo, hi = data.min(), data.max()
    nonzero = lo != 0 or hi != 0
    if not nonzero:
        raise InputError(
            f"{what}: expected at least one nonzero label, got an all-zero label map; "
            "fix: check that the right segmentation was passed"
        )
    disk = np.dtype(disk_dtype) if disk_dtype is not None else data.dtype
    return _make_image(_contiguous(data, data.dtype), affine, header, disk_dtype=disk)


def _contiguous(data: np.ndarray, dtype: Any) -> np.ndarray:
    """``data`` as ``dtype`` in one contiguous block, keeping a Fortran order (NIfTI's on-disk order, what
    nibabel reads) instead of transposing it: every consumer here takes either order, and the transposing
    copy of a 1 mm head costs more than decoding it. Other layouts become C-contiguous."""
    out = np.asarray(data, dtype=dtype)
    if out.flags.c_contiguous or out.flags.f_contiguous:
        return out
    return np.ascontiguousarray(out)


def label_dtype(img: nib.Nifti1Image) -> np.dtype:
    """The dtype a label map should be written with (the original on-disk dtype)."""
    return np.dtype(img.header.get_data_dtype())


def _split_pair(x: Any, what: str) -> tuple[np.ndarray, Any]:
    if not (isinstance(x, tuple | list) and len(x) == 2):
        raise InputError(
            f"{what}: expected a path, a nibabel image or an (array, affine) pair, got "
            f"{type(x).__name__}; fix: pass one of those"
        )
    data, affine = x
    if hasattr(data, "detach"):  # torch tensor
        data = data.detach().cpu().numpy()
    return np.asarray(data), affine


def _proxy_data_fast(img: nib.spatialimages.SpatialImage) -> np.ndarray | None:
    """The data of a ``nib.load``-ed ``.nii.gz`` (an array proxy on the file) through the one-call decoder;
    None unless the file decodes to exactly the proxy's layout and scaling (then nibabel reads it)."""
    proxy = img.dataobj
    path = getattr(proxy, "file_like", None)
    if not nib.is_proxy(proxy) or not isinstance(path, str | os.PathLike):
        return None
    got = _read_nii_gz_fast(Path(path))
    if got is None:
        return None
    mine = got[0].dataobj
    same = (
        tuple(mine.shape) == tuple(proxy.shape)
        and np.dtype(mine.dtype) == np.dtype(proxy.dtype)
        and getattr(mine, "offset", None) == getattr(proxy, "offset", None)
        and all(
            np.array_equal(
                np.asarray(getattr(mine, k, 0.0), float),
                np.asarray(getattr(proxy, k, 0.0), float),
                equal_nan=True,
            )
            for k in ("slope", "inter")
        )
    )
    return got[1] if same else None


def _image_data(img: nib.spatialimages.SpatialImage, name: str) -> np.ndarray:
    """The voxel data of an in-memory/proxy image; unreadable data is an InputError."""
    fast = _proxy_data_fast(img)
    if fast is not None:
        return fast
    try:
        return np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputError(
            f"{name}: expected readable voxel data, got {type(exc).__name__}: {_short(exc)}; "
            "fix: re-export the image"
        ) from exc


def as_image(x: ImageLike, *, name: str = "image") -> nib.Nifti1Image:
    """Validate an intensity image given as a path, a nibabel image or an ``(ndarray, affine)`` pair."""
    if isinstance(x, str | os.PathLike):
        return load_volume(x, name=name)
    if isinstance(x, nib.spatialimages.SpatialImage):
        return _validated_intensity(_image_data(x, name), x.affine, name, header=x.header)
    data, affine = _split_pair(x, name)
    return _validated_intensity(data, affine, name)


def as_label_image(x: ImageLike, *, name: str = "label map") -> nib.Nifti1Image:
    """Validate a label map given as a path, a nibabel image or an ``(ndarray, affine)`` pair."""
    if isinstance(x, str | os.PathLike):
        return load_label_map(x, name=name)
    if isinstance(x, nib.spatialimages.SpatialImage):
        return _validated_labels(
            _image_data(x, name), x.affine, name, disk_dtype=x.header.get_data_dtype(), header=x.header
        )
    data, affine = _split_pair(x, name)
    return _validated_labels(data, affine, name, disk_dtype=np.asarray(data).dtype)


def save_nifti_atomic(
    img: nib.spatialimages.SpatialImage, path: str | os.PathLike, force: bool = False
) -> Path:
    """Write ``img`` to ``path`` atomically (temp file + rename); refuse to overwrite without ``force``."""
    from emorph_deploy.fileio import atomic_path

    with atomic_path(path, force=force) as tmp:
        nib.save(img, str(tmp))
    return Path(path)
