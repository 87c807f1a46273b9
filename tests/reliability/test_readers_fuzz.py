"""Property-based fuzzing of the readers: random header fields and truncations of valid files (NIfTI-1 and
NIfTI-2, ``.nii`` and ``.nii.gz``) and random pairs CSVs. Every case ends in a valid image (pairs) or a
domain error (:class:`~emorph_deploy.errors.InputError`), never another exception, a hang (the per-example
deadline) or an allocation beyond :data:`ALLOC_BOUND` (traced with ``tracemalloc``, which sees numpy's
buffers).

The budget is fixed for CI: :data:`EXAMPLES` examples per reader, derandomised, no example database on
disk; ``EMORPH_FUZZ_EXAMPLES=2000`` runs a longer campaign locally. A new reader joins by adding a
:class:`ReaderCase` to :data:`IMAGE_READERS` (a strategy of valid files' bytes, a suffix, the read call).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
import tracemalloc
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


#: Every image reader fuzzed here; issue 20's MGH/NRRD/DICOM readers join with one entry each.
IMAGE_READERS = [
    ReaderCase("nifti", ".nii", nifti_bytes(), _read_both),
    ReaderCase("nifti-gz", ".nii.gz", _gzipped(nifti_bytes()), _read_both),
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
