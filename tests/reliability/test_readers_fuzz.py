"""Property-based fuzzing of the readers: random header fields and truncations of valid files (NIfTI-1 and
NIfTI-2 ``.nii``/``.nii.gz``, MGH/MGZ, NRRD, MetaImage ``.mha``, DICOM series) and random pairs CSVs. Every
case ends in a valid image (pairs) or a domain error (:class:`~emorph_deploy.errors.InputError`), never
another exception, a hang (the per-example deadline) or an allocation beyond :data:`ALLOC_BOUND` (traced with
``tracemalloc``, which sees numpy's buffers; SimpleITK's C++ buffers are not traced, but every image it
decodes is then copied into numpy, which is).

The budget is fixed for CI: :data:`EXAMPLES` examples per reader, derandomised, no example database on
disk; ``EMORPH_FUZZ_EXAMPLES=2000`` runs a longer campaign locally. A new reader joins by adding a
:class:`ReaderCase` to :data:`IMAGE_READERS` (a strategy of valid files' bytes, a suffix, the read call).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import os
import shutil
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

hypothesis = pytest.importorskip(
    "hypothesis", reason="hypothesis is in the dev extra: pip install -e '.[dev]'"
)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from emorph_deploy.data.nifti import load_label_map, load_volume  # noqa: E402
from emorph_deploy.data.pairs import read_pairs, read_table  # noqa: E402
from emorph_deploy.errors import InputError  # noqa: E402

EXAMPLES = int(os.environ.get("EMORPH_FUZZ_EXAMPLES", "60"))
#: Peak traced allocation allowed while reading one fuzzed file (files are at most a few kB).
ALLOC_BOUND = 32 << 20

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=5000,  # ms per example: a hang fails the test
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@dataclass(frozen=True)
class ReaderCase:
    """A reader under fuzz: ``files`` draws a valid file's bytes, written with ``suffix`` and read by
    ``read`` (which returns the image)."""

    name: str
    suffix: str
    files: st.SearchStrategy[bytes]
    read: Callable[[Path], object]


# ------------------------------------------------------------------------------------------------ NIfTI
_DTYPES = (np.uint8, np.int16, np.int32, np.float32, np.float64)
# (offset, struct format) of fields worth corrupting, NIfTI-1 (348-byte header, little endian)
_NIFTI1_FIELDS = {
    "sizeof_hdr": (0, "<i"),
    "dim": (40, "<8h"),
    "datatype": (70, "<h"),
    "bitpix": (72, "<h"),
    "pixdim": (76, "<8f"),
    "vox_offset": (108, "<f"),
    "scl_slope": (112, "<f"),
    "scl_inter": (116, "<f"),
    "qform_code": (252, "<h"),
    "sform_code": (254, "<h"),
    "srow_x": (280, "<4f"),
}
_SHORT = st.integers(-(2**15), 2**15 - 1)
_FLOAT = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e30])
)
_FIELD_VALUES = {
    "sizeof_hdr": st.tuples(st.sampled_from([348, 540, 0, -1, 2**31 - 1, 1543569408])),
    "dim": st.tuples(
        st.integers(-2, 9), *[st.one_of(st.integers(0, 64), st.integers(200, 2000), _SHORT)] * 7
    ),
    "datatype": st.tuples(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 2304, 77])),
    "bitpix": st.tuples(st.sampled_from([0, 1, 8, 16, 32, 64, 128, 999])),
    "pixdim": st.tuples(*[_FLOAT] * 8),
    "vox_offset": st.tuples(st.one_of(st.sampled_from([0.0, 352.0, 351.0, 1e9, -352.0]), _FLOAT)),
    "scl_slope": st.tuples(_FLOAT),
    "scl_inter": st.tuples(_FLOAT),
    "qform_code": st.tuples(st.integers(-1, 5)),
    "sform_code": st.tuples(st.integers(-1, 5)),
    "srow_x": st.tuples(*[_FLOAT] * 4),
}


@st.composite
def nifti_bytes(draw: st.DrawFn) -> bytes:
    """A small valid NIfTI-1/2 file (uncompressed bytes), then corrupted: NIfTI-1 header fields set to
    random values, and/or the file truncated."""
    shape = tuple(draw(st.integers(2, 6)) for _ in range(3))
    dtype = draw(st.sampled_from(_DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    data = (rng.random(shape) * 100).astype(dtype)
    cls = draw(st.sampled_from([nib.Nifti1Image, nib.Nifti2Image]))
    img = cls(data, np.diag([draw(st.sampled_from([0.5, 1.0, 2.0]))] * 3 + [1.0]))
    raw = bytearray(img.to_bytes())
    if (
        cls is nib.Nifti1Image and draw(st.integers(0, 3)) == 0
    ):  # a header-only-sized file claiming a big volume
        big = [draw(st.integers(200, 2000)) for _ in range(3)]
        raw[40:56] = struct.pack("<8h", 3, *big, 1, 1, 1, 1)
    if cls is nib.Nifti1Image:
        for name in draw(st.lists(st.sampled_from(sorted(_NIFTI1_FIELDS)), max_size=4, unique=True)):
            offset, fmt = _NIFTI1_FIELDS[name]
            values = draw(_FIELD_VALUES[name])
            raw[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    if draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw)))]
    return bytes(raw)


def _gzipped(files: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """``files`` gzip-compressed, sometimes with the compressed stream truncated."""

    @st.composite
    def gz(draw: st.DrawFn) -> bytes:
        packed = gzip.compress(draw(files), compresslevel=1)
        if draw(st.booleans()):
            packed = packed[: draw(st.integers(0, len(packed)))]
        return packed

    return gz()


def _read_both(path: Path) -> object:
    img = load_volume(path)
    data = np.asanyarray(img.dataobj)
    assert data.ndim == 3 and data.dtype == np.float32 and np.isfinite(data).all()
    assert np.isfinite(img.affine).all()
    with contextlib.suppress(InputError):  # intensities are seldom integer label maps
        load_label_map(path)
    return img


# ------------------------------------------------------------------------------------------------ MGH
# (offset, big-endian struct format) of the MGH header fields (284-byte header, then the data)
_MGH_FIELDS = {
    "version": (0, ">i"),
    "dims": (4, ">4i"),
    "type": (20, ">i"),
    "goodRASFlag": (28, ">h"),
    "delta": (30, ">3f"),
    "Mdc": (42, ">9f"),
    "Pxyz_c": (78, ">3f"),
}
_INT = st.one_of(st.integers(-2, 70), st.integers(200, 3000), st.integers(-(2**31), 2**31 - 1))
_MGH_VALUES = {
    "version": st.tuples(st.sampled_from([1, 0, 2, -1, 2**31 - 1])),
    "dims": st.tuples(_INT, _INT, _INT, st.sampled_from([1, 1, 2, 0, -1, 100000])),
    "type": st.tuples(st.sampled_from([0, 1, 3, 4, 2, 5, 6, -1, 99])),
    "goodRASFlag": st.tuples(st.integers(-1, 2)),
    "delta": st.tuples(*[_FLOAT] * 3),
    "Mdc": st.tuples(*[_FLOAT] * 9),
    "Pxyz_c": st.tuples(*[_FLOAT] * 3),
}


@st.composite
def mgh_bytes(draw: st.DrawFn) -> bytes:
    """A small valid MGH file (nibabel), then header fields set to random values and/or the file truncated."""
    shape = tuple(draw(st.integers(2, 6)) for _ in range(3))
    dtype = draw(st.sampled_from((np.uint8, np.int16, np.int32, np.float32)))
    data = (np.random.default_rng(draw(st.integers(0, 2**16))).random(shape) * 100).astype(dtype)
    raw = bytearray(
        nib.MGHImage(data, np.diag([draw(st.sampled_from([0.5, 1.0, 2.0]))] * 3 + [1.0])).to_bytes()
    )
    for name in draw(st.lists(st.sampled_from(sorted(_MGH_FIELDS)), max_size=4, unique=True)):
        offset, fmt = _MGH_FIELDS[name]
        raw[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, *draw(_MGH_VALUES[name]))
    if draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw)))]
    return bytes(raw)


# ------------------------------------------------------------------------------------------------ NRRD / MHA
_TEXT_GARBAGE = st.one_of(
    st.sampled_from(
        [
            "",
            "0",
            "-1",
            "nan",
            "1e308",
            "4000 3000 2000",
            "2 2",
            "(nan,0,0) (0,1,0) (0,0,1)",
            "none",
            "LIST",
            "../../etc/passwd",
            "/dev/zero",
            "bzip2",
            "hex",
            "ascii",
            "gzip",
            "raw",
            "big",
            "MET_DOUBLE",
            "True",
            "False",
            "-5",
            "3 3 3 3",
            "(0,0,0) (0,0,0) (0,0,0)",
            "1 1 1 1 1 1 1 1 1",
            "2147483647 2 2",
        ]
    ),
    st.text(alphabet=st.characters(codec="latin-1", exclude_characters="\n\r"), max_size=10),
)


def _text_image(draw: st.DrawFn, fields: dict[str, str], sep: str, magic: str, tail: list[str]) -> bytes:
    """``magic`` line (if any), ``fields`` as ``key<sep>value`` lines (random values replaced or dropped),
    ``tail`` lines last, then the (maybe gzip- or text-encoded) data."""
    keys = sorted(fields)
    for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
        fields[key] = draw(_TEXT_GARBAGE)
    for key in draw(st.lists(st.sampled_from(keys), max_size=2, unique=True)):
        fields.pop(key, None)
    lines = ([magic] if magic else []) + [f"{k}{sep}{v}" for k, v in fields.items()] + tail
    return ("\n".join(lines) + "\n").encode("latin-1")


def _payload(draw: st.DrawFn, data: np.ndarray, encoding: str) -> bytes:
    if encoding == "ascii":
        return " ".join(str(v) for v in data.ravel()).encode()
    raw = data.tobytes()
    return gzip.compress(raw, compresslevel=1) if encoding == "gzip" else raw


_SITK_TYPES = {
    np.uint8: ("uchar", "MET_UCHAR"),
    np.int16: ("short", "MET_SHORT"),
    np.float32: ("float", "MET_FLOAT"),
}


@st.composite
def nrrd_bytes(draw: st.DrawFn) -> bytes:
    """A small valid attached-header NRRD (raw, gzip or ascii), then fields garbled or dropped and/or
    truncated."""
    shape = tuple(draw(st.integers(2, 5)) for _ in range(3))
    dtype = draw(st.sampled_from(sorted(_SITK_TYPES, key=str)))
    data = (np.random.default_rng(draw(st.integers(0, 2**16))).random(shape[::-1]) * 100).astype(dtype)
    encoding = draw(st.sampled_from(["raw", "gzip", "ascii"]))
    fields = {
        "type": _SITK_TYPES[dtype][0],
        "dimension": "3",
        "space": "left-posterior-superior",
        "sizes": " ".join(map(str, shape)),
        "space directions": "(1.5,0,0) (0,2,0) (0,0,1)",
        "kinds": "domain domain domain",
        "endian": "little",
        "encoding": encoding,
        "space origin": "(1,2,3)",
    }
    raw = _text_image(draw, fields, ": ", "NRRD0004", [""]) + _payload(draw, data, encoding)
    if draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


@st.composite
def mha_bytes(draw: st.DrawFn) -> bytes:
    """A small valid MetaImage .mha (raw, zlib or ascii), then fields garbled or dropped and/or truncated."""
    shape = tuple(draw(st.integers(2, 5)) for _ in range(3))
    dtype = draw(st.sampled_from(sorted(_SITK_TYPES, key=str)))
    data = (np.random.default_rng(draw(st.integers(0, 2**16))).random(shape[::-1]) * 100).astype(dtype)
    encoding = draw(st.sampled_from(["raw", "zlib", "ascii"]))
    payload = zlib.compress(data.tobytes()) if encoding == "zlib" else _payload(draw, data, encoding)
    fields = {
        "ObjectType": "Image",
        "NDims": "3",
        "BinaryData": "False" if encoding == "ascii" else "True",
        "BinaryDataByteOrderMSB": "False",
        "CompressedData": "True" if encoding == "zlib" else "False",
        "TransformMatrix": "1 0 0 0 1 0 0 0 1",
        "Offset": "1 2 3",
        "ElementSpacing": "1.5 2 1",
        "DimSize": " ".join(map(str, shape)),
        "ElementType": _SITK_TYPES[dtype][1],
    }
    if encoding == "zlib":
        fields["CompressedDataSize"] = str(len(payload))
    raw = _text_image(draw, fields, " = ", "", ["ElementDataFile = LOCAL"]) + payload
    if draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


# ------------------------------------------------------------------------------------------------ DICOM
@functools.cache
def _dicom_series(dtype: str) -> tuple[bytes, ...]:
    """The files of a small valid DICOM series (4 slices of 6 x 5, oblique), written once by SimpleITK."""
    import tempfile

    from locale_guard import restoring_locale

    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK reads DICOM series")
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    data = (np.random.default_rng(0).random((4, 5, 6)) * 100).astype(dtype)
    uid = "1.2.826.0.1.3680043.9.99"
    files = []
    with tempfile.TemporaryDirectory() as tmp, restoring_locale():  # GDCM's writer leaves the locale at "C"
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for z in range(data.shape[0]):
            sl = sitk.GetImageFromArray(data[z])
            sl.SetSpacing((1.5, 2.0))
            for tag, value in {
                "0008|0060": "MR",
                "0020|000e": uid,
                "0008|0018": f"{uid}.{z + 1}",
                "0020|0037": "0.8\\0.6\\0\\-0.6\\0.8\\0",
                "0020|0032": f"1\\2\\{3 + 2.5 * z}",
                "0018|0050": "2.5",
                "0020|0013": str(z + 1),
            }.items():
                sl.SetMetaData(tag, value)
            path = Path(tmp) / f"s{z}.dcm"
            writer.SetFileName(str(path))
            writer.Execute(sl)
            files.append(path.read_bytes())
    return tuple(files)


# DICOM tags worth corrupting (group, element little endian) -> values: integers (US, 2 bytes) or strings
_DICOM_US = {
    b"\x28\x00\x10\x00": "Rows",
    b"\x28\x00\x11\x00": "Columns",
    b"\x28\x00\x00\x01": "BitsAllocated",
    b"\x28\x00\x02\x00": "SamplesPerPixel",
    b"\x28\x00\x03\x01": "PixelRepresentation",
}
_DICOM_DS = {
    b"\x20\x00\x32\x00": "ImagePositionPatient",
    b"\x20\x00\x37\x00": "ImageOrientationPatient",
    b"\x28\x00\x30\x00": "PixelSpacing",
    b"\x20\x00\x0e\x00": "SeriesInstanceUID",
}
_PIXEL_DATA = b"\xe0\x7f\x10\x00"


def _patch_dicom(draw: st.DrawFn, raw: bytearray) -> bytearray:
    """Set a few tags of an implicit-VR little-endian dataset to random values (same value length)."""
    for tag in draw(st.lists(st.sampled_from(sorted(_DICOM_US)), max_size=2, unique=True)):
        i = raw.find(tag, 300)
        if i > 0:
            raw[i + 8 : i + 10] = struct.pack(
                "<H", draw(st.sampled_from([0, 1, 3, 8, 16, 32, 64, 4096, 65535]))
            )
    for tag in draw(st.lists(st.sampled_from(sorted(_DICOM_DS)), max_size=2, unique=True)):
        i = raw.find(tag, 300)
        if i > 0:
            n = struct.unpack("<I", raw[i + 4 : i + 8])[0]
            value = draw(
                st.sampled_from(["nan\\nan\\nan", "0\\0\\0\\0\\0\\0", "1e308\\1\\1", "0\\0", "x", ""])
            )
            raw[i + 8 : i + 8 + n] = value.encode().ljust(n)[:n]
    if draw(st.integers(0, 4)) == 0:  # the pixel data's declared length
        i = raw.find(_PIXEL_DATA, 300)
        if i > 0:
            raw[i + 4 : i + 8] = struct.pack("<I", draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 10**6])))
    return raw


@st.composite
def dicom_series_bytes(draw: st.DrawFn) -> bytes:
    """A small DICOM series packed into one blob (length-prefixed files, see :func:`_read_dicom_blob`):
    slices dropped or duplicated, tags set to random values, files truncated."""
    files = [bytearray(f) for f in _dicom_series(draw(st.sampled_from(["int16", "uint8"])))]
    if draw(st.booleans()):
        del files[draw(st.integers(0, len(files) - 1))]
    if draw(st.integers(0, 3)) == 0:
        files.append(bytearray(files[0]))
    for k in draw(st.lists(st.integers(0, len(files) - 1), max_size=2, unique=True)):
        files[k] = _patch_dicom(draw, files[k])
        if draw(st.booleans()):
            files[k] = files[k][: draw(st.integers(0, len(files[k])))]
    return b"".join(struct.pack("<I", len(f)) + bytes(f) for f in files)


def _read_dicom_blob(path: Path) -> object:
    """Unpack a :func:`dicom_series_bytes` blob into a fresh folder beside ``path`` and read the folder."""
    folder = path.with_name(path.name + ".d")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    blob, n = path.read_bytes(), 0
    while n + 4 <= len(blob):
        size = struct.unpack("<I", blob[n : n + 4])[0]
        (folder / f"f{n}.dcm").write_bytes(blob[n + 4 : n + 4 + size])
        n += 4 + size
    return _read_both(folder)


#: Every image reader fuzzed here; a new reader joins with one entry.
IMAGE_READERS = [
    ReaderCase("nifti", ".nii", nifti_bytes(), _read_both),
    ReaderCase("nifti-gz", ".nii.gz", _gzipped(nifti_bytes()), _read_both),
    ReaderCase("mgh", ".mgh", mgh_bytes(), _read_both),
    ReaderCase("mgz", ".mgz", _gzipped(mgh_bytes()), _read_both),
    ReaderCase("nrrd", ".nrrd", nrrd_bytes(), _read_both),
    ReaderCase("mha", ".mha", mha_bytes(), _read_both),
    ReaderCase("dicom", ".dcmblob", dicom_series_bytes(), _read_dicom_blob),
]


def _ends_cleanly(read: Callable[[Path], object], path: Path) -> None:
    """``read(path)`` returns or raises InputError, within :data:`ALLOC_BOUND` of traced allocation."""
    tracemalloc.start()
    try:
        read(path)
    except InputError as exc:
        assert "\n" not in str(exc), "a domain error is one line"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= ALLOC_BOUND, f"reading {path.stat().st_size} bytes allocated {peak} bytes"


@pytest.mark.parametrize("case", IMAGE_READERS, ids=lambda c: c.name)
def test_image_readers_end_in_an_image_or_a_domain_error(case: ReaderCase, tmp_path: Path) -> None:
    @FUZZ
    @given(blob=case.files)
    def run(blob: bytes) -> None:
        path = tmp_path / f"fuzz{case.suffix}"
        path.write_bytes(blob)
        _ends_cleanly(case.read, path)

    run()


# ------------------------------------------------------------------------------------------------ pairs CSV
_CELLS = st.one_of(
    st.sampled_from(
        ["fixed", "moving", "moving_labels", "fixed_labels", "id", "FIXED", " moving ", "#x", ""]
    ),
    st.sampled_from(["a.nii.gz", "~/b.nii", "/abs/c.nii.gz", "d e.nii", '"q,uoted".nii', "x\x00y"]),
    st.text(max_size=12),
)


@st.composite
def pairs_csv_bytes(draw: st.DrawFn) -> bytes:
    """A CSV of random rows of plausible and random cells: maybe a BOM, CRLF, quotes, NUL bytes, invalid
    UTF-8 or a truncation."""
    rows = draw(st.lists(st.lists(_CELLS, max_size=6), max_size=6))
    sep = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = sep.join(",".join(r) for r in rows)
    raw = text.encode("utf-8", errors="surrogatepass" if draw(st.booleans()) else "replace")
    if draw(st.booleans()):
        raw = b"\xef\xbb\xbf" + raw
    if draw(st.booleans()):
        raw += draw(st.binary(max_size=8))
    if draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


def test_pairs_csv_reader_ends_in_rows_or_a_domain_error(tmp_path: Path) -> None:
    @FUZZ
    @given(blob=pairs_csv_bytes())
    def run(blob: bytes) -> None:
        path = tmp_path / "pairs.csv"
        path.write_bytes(blob)
        for read in (read_pairs, lambda p: read_table(p, {"image": (), "label": ()})):
            try:
                rows = read(path)
            except InputError as exc:
                assert "\n" not in str(exc)
                continue
            assert rows is not None

    run()
