"""Readers of the non-NIfTI inputs: MGH/MGZ (nibabel), NRRD/NHDR and MetaImage MHA/MHD (SimpleITK), and a
folder holding one DICOM series (SimpleITK/GDCM).

:func:`read_foreign` returns what :func:`emorph_deploy.data.nifti.load_volume` expects of a NIfTI file: an
in-memory ``Nifti1Image`` carrying the RAS+ affine and a fresh header (sform/qform code 1, scanner; units mm;
the on-disk dtype), and the voxel array indexed (i, j, k) like NIfTI, native byte order, intensities as
stored after the format's own scaling (DICOM rescale slope/intercept). The affine and values are validated
by the caller exactly as for NIfTI.

As for NIfTI, nothing is allocated before the header's declared size has been checked against
:data:`~emorph_deploy.data.nifti.MAX_VOXEL_BYTES` and against what the file can hold (raw data: its bytes;
gzip/zlib: the deflate bound): a truncated file or a header declaring a huge volume is a one-line
:class:`InputError`. SimpleITK's ``ReadImageInformation`` parses a header without reading voxel data, so the
size checked is the size SimpleITK would allocate; where the data live (attached/detached file, offset,
encoding) comes from a small parse of the header text here.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from emorph_deploy.errors import InputError

__all__ = [
    "DICOM_SUFFIXES",
    "FOREIGN_SUFFIXES",
    "IMAGE_SUFFIXES",
    "image_suffix",
    "is_foreign",
    "read_foreign",
]

#: Suffixes (lower case) of each non-NIfTI file format read here.
MGH_SUFFIXES = (".mgh", ".mgz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
META_SUFFIXES = (".mha", ".mhd")
FOREIGN_SUFFIXES = MGH_SUFFIXES + NRRD_SUFFIXES + META_SUFFIXES
#: Every image file suffix accepted by ``load_volume`` (besides a DICOM folder).
IMAGE_SUFFIXES = (".nii", ".nii.gz", *FOREIGN_SUFFIXES)
#: Single DICOM files: refused with a hint to pass their folder.
DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")
FORMATS_HINT = ".nii/.nii.gz, .mgh/.mgz, .nrrd/.nhdr, .mha/.mhd, or a folder holding one DICOM series"

_MGH_HEADER_BYTES = 284
_MGH_ITEMSIZE = {0: 1, 1: 4, 3: 4, 4: 2}  # MRI_UCHAR, MRI_INT, MRI_FLOAT, MRI_SHORT
_DEFLATE_MAX_RATIO = 1032  # zlib/gzip cannot expand data more than ~1032:1
_HEADER_TEXT_MAX = 1 << 20  # NRRD/MetaImage text headers are a few hundred bytes
_SERIES_SHOWN = 5
#: Uncompressed DICOM transfer syntaxes (implicit/explicit little, explicit big endian): pixel data as stored.
_DICOM_RAW_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")


def image_suffix(path: str | os.PathLike) -> str:
    """The lower-case format suffix of ``path`` (``.nii.gz`` counted as one)."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def is_foreign(path: str | os.PathLike) -> bool:
    """True for a path read here rather than as NIfTI: a folder (DICOM series) or a non-NIfTI suffix."""
    p = Path(path)
    return p.is_dir() or image_suffix(p) in FOREIGN_SUFFIXES + DICOM_SUFFIXES


def read_foreign(path: str | os.PathLike, what: str) -> tuple[nib.Nifti1Image, np.ndarray]:
    """``(image, data)`` of a non-NIfTI input (see the module docstring); every failure is an InputError."""
    from emorph_deploy.data.nifti import _short, check_affine

    p = Path(path)
    suffix = image_suffix(p)
    if p.is_dir():
        reader: Callable[[Path, str], tuple[np.ndarray, np.ndarray]] = _read_dicom_series
    elif suffix in DICOM_SUFFIXES:
        raise InputError(
            f"{what}: expected a folder holding one DICOM series, got a single DICOM file; fix: pass the "
            "folder that holds the series' files"
        )
    elif suffix in MGH_SUFFIXES:
        reader = _read_mgh
    else:
        reader = _read_sitk_file
    noise: list[str] = []
    try:
        with contextlib.nullcontext() if reader is _read_mgh else _quiet_stderr(noise):
            data, affine = reader(p, what)
    except InputError:
        raise
    except MemoryError as exc:
        raise InputError(
            f"{what}: expected an image that fits in memory, got MemoryError; fix: crop/downsample it"
        ) from exc
    except Exception as exc:  # SimpleITK/nibabel errors on corrupt files
        said = [ln.strip() for ln in "".join(noise).splitlines() if ln.strip()]
        reason = said[0] if said else _reason(exc)  # MetaIO: the cause first
        raise InputError(
            f"{what}: expected a readable {_FORMAT_NAMES.get(suffix, 'DICOM series')} image, got a corrupt "
            f"or truncated file ({_short(reason)}); fix: re-export or re-download it, or convert it to NIfTI"
        ) from exc
    data = _native_order(data)
    affine = check_affine(affine, what)  # before the image: nibabel refuses a NaN affine with its own error
    hdr = nib.Nifti1Header()
    hdr.set_xyzt_units("mm", "sec")
    try:
        hdr.set_data_dtype(data.dtype)  # the on-disk dtype: label maps are written back with it
        img = nib.Nifti1Image(data, affine, hdr)
        img.set_sform(affine, code=1)  # scanner: what these formats' world coordinates are
        img.set_qform(affine, code=1)
    except Exception as exc:  # a dtype NIfTI cannot hold
        raise InputError(
            f"{what}: expected integer or float voxel data, got dtype {data.dtype}; fix: convert the image "
            "to an integer or float type"
        ) from exc
    return img, data


_FORMAT_NAMES = {
    ".mgh": "MGH",
    ".mgz": "MGZ",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
}


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_stderr(captured: list[str]) -> Iterator[None]:
    """Capture what C++ code writes to file descriptor 2 meanwhile into ``captured``: ITK's MetaImage layer
    (and GDCM) print parse errors straight to ``std::cerr``, which would surround the CLI's one-line error.
    The text becomes the error's reason when the read fails and is dropped otherwise (ITK's numerics print
    diagnostics on odd but readable geometry too). One capture at a time (the descriptor is process-wide);
    reads take milliseconds to seconds, while other threads rarely write to stderr."""
    with _STDERR_LOCK, contextlib.ExitStack() as stack:
        try:
            with contextlib.suppress(AttributeError, ValueError, OSError):
                sys.stderr.flush()
            tmp = stack.enter_context(tempfile.TemporaryFile())
            saved = os.dup(2)
        except OSError:  # no usable descriptor 2 or temporary file: read without capturing
            yield
            return
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read(1 << 16).decode("utf-8", errors="replace"))


def _reason(exc: BaseException) -> str:
    """The cause in an exception's text, without SimpleITK's source location and ITK's object prefix; of
    teem's (NRRD) chain of messages, the last: the root cause."""
    text = re.sub(r"^Exception thrown in SimpleITK [^\n]*\n\s*", "", str(exc))
    text = re.sub(r"(ITK ERROR|itk::ERROR): \w+\(0x[0-9a-fA-F]+\):\s*", "", text)
    teem = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("[nrrd]")]
    if teem:
        return re.sub(r"^\[nrrd\] \w+: ", "", teem[-1])
    return " ".join(text.split()) or type(exc).__name__


def _native_order(data: np.ndarray) -> np.ndarray:
    """``data`` in native byte order (MGH is big endian; the pipeline and NIfTI outputs expect native)."""
    if data.dtype.byteorder not in "=|":
        data = data.astype(data.dtype.newbyteorder("="), order="K")
    return data


def _check_declared(
    declared: int, room: int, what: str, shape: Any, dtype: Any, unit: str, size: int
) -> None:
    """Refuse a declared voxel payload over the limit or over what the file can hold: before any read."""
    from emorph_deploy.data.nifti import MAX_VOXEL_BYTES

    if declared > MAX_VOXEL_BYTES:
        raise InputError(
            f"{what}: expected at most {MAX_VOXEL_BYTES / 2**30:g} GiB of voxel data, got a header declaring "
            f"shape {tuple(shape)} {dtype} ({declared / 2**30:.3g} GiB); fix: repair the header, or "
            "crop/downsample the image"
        )
    if declared > room:
        raise InputError(
            f"{what}: expected a complete image file, got a truncated file: its header declares shape "
            f"{tuple(shape)} {dtype} ({declared} bytes of voxel data), more than the {max(room, 0)} bytes "
            f"{unit} ({size} bytes on disk); fix: re-export or re-download it"
        )


# ------------------------------------------------------------------------------------------------ MGH / MGZ
def _read_mgh(p: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """FreeSurfer MGH/MGZ through nibabel (its affine is RAS already; data (i, j, k[, frames]))."""
    from emorph_deploy.data.nifti import _short

    compressed = p.name.lower().endswith(".mgz")
    with open(p, "rb") as f:
        raw = f.read(1 << 16 if compressed else _MGH_HEADER_BYTES)
    if compressed:
        try:
            raw = zlib.decompressobj(31).decompress(raw, _MGH_HEADER_BYTES)
        except zlib.error as exc:
            raise InputError(
                f"{what}: expected a gzip-compressed MGZ file, got bytes that are not gzip "
                f"({_short(exc)}); fix: re-export it, or rename an uncompressed file to .mgh"
            ) from exc
    if len(raw) < _MGH_HEADER_BYTES:
        raise InputError(
            f"{what}: expected an MGH header of {_MGH_HEADER_BYTES} bytes, got {len(raw)}: a truncated or "
            "empty file; fix: re-export or re-download it"
        )
    version, *dims, mtype = (int(v) for v in np.frombuffer(raw[:24], dtype=">i4"))
    if version != 1 or mtype not in _MGH_ITEMSIZE or min(dims) < 1:
        raise InputError(
            f"{what}: expected an MGH header (version 1, positive sizes, type uchar/int/float/short), got "
            f"version {version}, sizes {tuple(dims)}, type {mtype}; fix: re-export it (e.g. mri_convert)"
        )
    declared = int(np.prod(dims, dtype=object)) * _MGH_ITEMSIZE[mtype]
    size = p.stat().st_size
    if compressed:
        room, unit = size * _DEFLATE_MAX_RATIO, "that a gzip file of this size can hold"
    else:
        room, unit = size - _MGH_HEADER_BYTES, "in the file after its header"
    _check_declared(declared, room, what, dims, f"MGH type {mtype}", unit, size)
    with np.errstate(all="ignore"):  # a NaN/zero geometry is reported by the caller's affine check
        img = nib.MGHImage.from_filename(str(p))
        affine = np.asarray(img.affine, dtype=np.float64)
    data = np.asanyarray(img.dataobj)
    if isinstance(data, np.memmap):  # read now: no file-backed arrays leave here
        data = np.array(data, order="K")
    return data, affine


# ------------------------------------------------------------------------------------------------ SimpleITK
def _sitk() -> Any:
    from emorph_deploy.errors import require

    sitk = require("SimpleITK", "formats")
    # ITK prints warnings (e.g. on DICOM slice spacing) straight to stderr, around our one-line errors; the
    # conditions that matter are checked and reported here instead
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk


def _itemsize(sitk: Any, pixel_id: int) -> int:
    """Bytes per component of a SimpleITK pixel type (8 for a type not listed: an upper bound)."""
    sizes = {
        "sitkUInt8": 1,
        "sitkInt8": 1,
        "sitkUInt16": 2,
        "sitkInt16": 2,
        "sitkUInt32": 4,
        "sitkInt32": 4,
        "sitkUInt64": 8,
        "sitkInt64": 8,
        "sitkFloat32": 4,
        "sitkFloat64": 8,
        "sitkComplexFloat32": 8,
        "sitkComplexFloat64": 16,
    }
    for name, n in sizes.items():
        for variant in (name, name.replace("sitk", "sitkVector")):
            if getattr(sitk, variant, None) == pixel_id:
                return n
    return 8


def _header_text(p: Path, what: str, end: Callable[[bytes], int]) -> tuple[str, int]:
    """The text header of ``p`` and its length in bytes (``end(raw)`` finds it, -1 when absent)."""
    with open(p, "rb") as f:
        raw = f.read(_HEADER_TEXT_MAX)
    n = end(raw)
    if n < 0:
        if len(raw) >= _HEADER_TEXT_MAX:
            raise InputError(
                f"{what}: expected a text header of at most {_HEADER_TEXT_MAX >> 10} KiB, got none ending "
                "within it; fix: re-export the image"
            )
        n = len(raw)  # a detached header may end at the end of the file
    return raw[:n].decode("latin-1"), n


def _nrrd_end(raw: bytes) -> int:
    """Bytes of an NRRD header: up to and including its blank line."""
    m = re.search(rb"\r?\n\r?\n", raw)
    return m.end() if m else -1


def _meta_end(raw: bytes) -> int:
    """Bytes of a MetaImage header: up to and including the ``ElementDataFile`` line (always last)."""
    m = re.search(rb"ElementDataFile\s*=[^\n]*\n", raw)
    return m.end() if m else -1


def _data_room(p: Path, what: str) -> tuple[int, str, str]:
    """From the header text of ``p``: the bytes its voxel data occupy at most, their encoding ("raw", "zlib",
    "hex" or "ascii") and where they are (for messages). Refuses what SimpleITK cannot or must not read."""
    suffix = image_suffix(p)
    size = p.stat().st_size
    if suffix in NRRD_SUFFIXES:
        text, hlen = _header_text(p, what, _nrrd_end)
        fields = {}
        for line in text.splitlines()[1:]:
            if ":" in line and not line.startswith("#"):
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip().lstrip("=").strip()
        encoding = fields.get("encoding", "raw").lower()
        data_file = fields.get("data file", fields.get("datafile"))
        skip = fields.get("byte skip", "0")
        codes = {
            "raw": "raw",
            "txt": "ascii",
            "text": "ascii",
            "ascii": "ascii",
            "hex": "hex",
            "gz": "zlib",
            "gzip": "zlib",
        }
    else:
        text, hlen = _header_text(p, what, _meta_end)
        fields = _meta_fields(text, what)
        binary = fields.get("binarydata", "true").lower() in ("true", "1")
        compressed = fields.get("compresseddata", "false").lower() in ("true", "1")
        encoding = "zlib" if compressed else ("raw" if binary else "ascii")
        data_file = fields.get("elementdatafile", "LOCAL")
        data_file = None if data_file.upper() in ("LOCAL", "") else data_file
        skip = fields.get("headersize", "0")
        codes = {"raw": "raw", "ascii": "ascii", "zlib": "zlib"}
    kind = codes.get(encoding)
    if kind is None:
        raise InputError(
            f"{what}: expected raw, ascii, hex or gzip encoded voxel data, got encoding {encoding!r}; fix: "
            "re-save the image with gzip or raw encoding (e.g. unu save -e gzip)"
        )
    if data_file is None:
        where, n = "in the file after its header", size - hlen
    else:
        if data_file.split()[0].upper() == "LIST" or len(data_file.split()) > 1:
            raise InputError(
                f"{what}: expected the voxel data in one file, got a list or pattern of data files "
                f"({_clip(data_file)}); fix: re-save it as a single .nrrd/.mha file"
            )
        target = (p.parent / data_file) if not Path(data_file).is_absolute() else Path(data_file)
        if not target.is_file():
            raise InputError(
                f"{what}: expected its data file {_clip(data_file)} beside the header, got a missing file; "
                "fix: keep the header and its data file together"
            )
        where, n = f"in its data file {target.name}", target.stat().st_size
    try:
        skip_n = max(int(float(skip)), 0)
    except ValueError:
        skip_n = 0
    return max(n - skip_n, 0), kind, where


#: MetaImage fields holding NDims (or NDims x NDims) numbers
_META_VECTORS = (
    "dimsize",
    "elementspacing",
    "elementsize",
    "offset",
    "position",
    "origin",
    "centerofrotation",
)
_META_MATRICES = ("transformmatrix", "rotation", "orientation")
_UINT = re.compile(r"\d{1,10}")


def _meta_fields(text: str, what: str) -> dict[str, str]:
    """The fields of a MetaImage header (keys lower case), validated where ITK's MetaIO is unsafe: it hangs
    on a negative ``NDims`` and corrupts memory on a large one, and sizes its arrays by ``NDims``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line:
            key, _, value = line.partition("=")
            key = key.strip().lower()
            if key in fields and key in ("ndims", *_META_VECTORS, *_META_MATRICES):
                raise InputError(
                    f"{what}: expected one {key} field in the MetaImage header, got two; {_META_FIX}"
                )
            fields[key] = value.strip()
    ndims = fields.get("ndims", "")
    if not _UINT.fullmatch(ndims) or not 1 <= int(ndims) <= 5:
        raise InputError(
            f"{what}: expected NDims between 1 and 5 in the MetaImage header, got {_clip(ndims)!r}; "
            f"{_META_FIX}"
        )
    n = int(ndims)
    for key in _META_VECTORS + _META_MATRICES:
        if key not in fields:
            continue
        values = fields[key].split()
        want = n * n if key in _META_MATRICES else n
        ok = (
            all(_UINT.fullmatch(v) for v in values) if key == "dimsize" else all(_is_float(v) for v in values)
        )
        if len(values) != want or not ok:
            raise InputError(
                f"{what}: expected {want} {'sizes' if key == 'dimsize' else 'numbers'} in the MetaImage "
                f"field {key} (NDims {n}), got {_clip(fields[key])!r}; {_META_FIX}"
            )
    for key, pattern in (("elementnumberofchannels", _UINT), ("headersize", re.compile(r"-?\d{1,12}"))):
        if key in fields and not pattern.fullmatch(fields[key]):
            raise InputError(
                f"{what}: expected an integer {key} in the MetaImage header, got {_clip(fields[key])!r}; "
                f"{_META_FIX}"
            )
    return fields


_META_FIX = "fix: re-export the image"


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _clip(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _read_sitk_file(p: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """NRRD/NHDR or MetaImage MHA/MHD through SimpleITK (LPS, (z, y, x) arrays) -> RAS, (i, j, k)."""
    sitk = _sitk()
    n, kind, where = _data_room(p, what)  # first: MetaIO must not parse an unsafe header
    reader = sitk.ImageFileReader()
    reader.SetImageIO("NrrdImageIO" if image_suffix(p) in NRRD_SUFFIXES else "MetaImageIO")
    reader.SetFileName(str(p))
    reader.ReadImageInformation()
    size = tuple(int(s) for s in reader.GetSize())
    _check_components(reader.GetNumberOfComponents(), what)
    item = _itemsize(sitk, reader.GetPixelID())
    declared = int(np.prod(size, dtype=object)) * item
    room, unit = {
        "zlib": (n * _DEFLATE_MAX_RATIO, f"that compressed data of this size can hold ({where})"),
        "hex": (n // 2, f"hex-encoded {where}"),
        "ascii": ((n + 1) // 2 * item, f"as text {where}"),  # a value and a separator: >= 2 characters
    }.get(kind, (n, where))
    _check_declared(
        declared, room, what, size, sitk.GetPixelIDValueAsString(reader.GetPixelID()), unit, p.stat().st_size
    )
    return _from_sitk(sitk, reader.Execute(), what)


def _check_components(n: int, what: str) -> None:
    if n != 1:
        raise InputError(
            f"{what}: expected a scalar image (one value per voxel), got {n} components per voxel (a vector "
            "or RGB image); fix: extract one channel or convert it to grey scale"
        )


def _from_sitk(sitk: Any, image: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A SimpleITK image as ``(data (i, j, k[, t]), RAS affine)``."""
    from emorph_deploy.data.orientation import itk_geometry_to_ras

    dim = image.GetDimension()
    _check_components(image.GetNumberOfComponentsPerPixel(), what)
    if dim not in (3, 4):
        raise InputError(
            f"{what}: expected a 3D volume, got a {dim}D image of size {tuple(image.GetSize())}; fix: pass a "
            "single 3D image (a DICOM series: the folder of all its slices)"
        )
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    affine = itk_geometry_to_ras(direction, image.GetSpacing()[:3], image.GetOrigin()[:3])
    data = sitk.GetArrayFromImage(image)  # (z, y, x) or (t, z, y, x), C order: a copy of the ITK buffer
    del image
    return data.T, affine  # (x, y, z[, t]) = NIfTI's (i, j, k), a Fortran-ordered view


# ------------------------------------------------------------------------------------------------ DICOM
def _read_dicom_series(folder: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The one DICOM series in ``folder`` (SimpleITK/GDCM: slices sorted along their normal, rescale
    slope/intercept applied)."""
    sitk = _sitk()
    series = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not series:
        entries = list(folder.iterdir())
        n_files = sum(1 for e in entries if e.is_file())
        got = "an empty folder" if not entries else f"a folder of {_files(n_files)} none of which is DICOM"
        subdirs = [e.name for e in entries if e.is_dir()]
        hint = f" (it has subfolders, e.g. {_clip(subdirs[0], 40)}: pass one of them)" if subdirs else ""
        raise InputError(
            f"{what}: expected an image file ({FORMATS_HINT}), got {got}{hint}; fix: pass the folder that "
            "holds the .dcm files of one series, or an image file"
        )
    files_of = {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in series}
    if len(series) > 1:
        listed = ", ".join(
            f"{uid or '(no UID)'} ({_files(len(files_of[uid]))})" for uid in series[:_SERIES_SHOWN]
        )
        more = f" and {len(series) - _SERIES_SHOWN} more" if len(series) > _SERIES_SHOWN else ""
        raise InputError(
            f"{what}: expected a folder holding one DICOM series, got {len(series)} series: {listed}{more}; "
            "fix: pass a folder per series (move each SeriesInstanceUID's files into its own folder, e.g. "
            "with dcm2niix or dicomsort)"
        )
    files = files_of[series[0]]
    _check_series(sitk, files, what)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return _from_sitk(sitk, reader.Execute(), what)


def _files(n: int) -> str:
    return f"{n} file{'s' if n != 1 else ''}"


def _check_series(sitk: Any, files: list[str], what: str) -> None:
    """Every slice's header before any pixel is read: same size, pixel type and orientation as the first,
    evenly spaced along the slice normal, and a declared payload the files can hold."""
    infos = []
    for f in files:
        r = sitk.ImageFileReader()
        r.SetImageIO("GDCMImageIO")
        r.SetFileName(f)
        r.ReadImageInformation()
        syntax = r.GetMetaData("0002|0010").strip(" \x00") if r.HasMetaDataKey("0002|0010") else ""
        infos.append(
            (r.GetSize(), r.GetPixelID(), r.GetNumberOfComponents(), r.GetDirection(), r.GetOrigin(), syntax)
        )
    size0, pid0, comp0, dir0, _, _ = infos[0]
    _check_components(comp0, what)
    for f, (size, pid, comp, direction, _, _) in zip(files, infos, strict=True):
        if size != size0 or pid != pid0 or comp != comp0:
            raise InputError(
                f"{what}: expected DICOM slices of one size and pixel type, got {Path(files[0]).name} "
                f"{tuple(size0)} and {Path(f).name} {tuple(size)}; fix: pass a folder holding one series only"
            )
        if not np.allclose(direction, dir0, atol=1e-4):
            raise InputError(
                f"{what}: expected DICOM slices of one orientation, got {Path(f).name} oriented differently "
                f"from {Path(files[0]).name} (a localizer?); fix: remove the odd slices or pass a folder per "
                "orientation"
            )
    if len(files) > 2:
        normal = np.asarray(dir0, dtype=np.float64).reshape(3, 3)[:, 2]
        pos = np.array([np.dot(normal, info[4]) for info in infos])
        gaps = np.diff(pos)
        if np.ptp(gaps) > 1e-2 * max(float(np.abs(gaps).max()), 1e-6):
            raise InputError(
                f"{what}: expected evenly spaced DICOM slices, got slice gaps from {gaps.min():.4g} "
                f"to {gaps.max():.4g} mm (missing or duplicate slices?); fix: check that the folder "
                "holds the complete series"
            )
    item = _itemsize(sitk, pid0) * comp0
    declared = len(files) * int(np.prod(size0, dtype=object)) * item
    on_disk = sum(os.path.getsize(f) for f in files)
    raw = all(info[5] in _DICOM_RAW_SYNTAXES for info in infos)
    room = on_disk if raw else on_disk * _DEFLATE_MAX_RATIO
    unit = "in its files" if raw else "that compressed files of this size can hold"
    shape = (*size0[:2], len(files) * int(np.prod(size0[2:], dtype=object)))
    _check_declared(declared, room, what, shape, sitk.GetPixelIDValueAsString(pid0), unit, on_disk)
