"""The one pairs-CSV reader (``emorph_deploy.data.pairs``) and the commands that use it."""

from __future__ import annotations

from pathlib import Path

import pytest

from emorph_deploy.calibration.pairs import read_pair_csv
from emorph_deploy.data.pairs import PairRow, nifti_stem, read_pairs
from emorph_deploy.errors import InputError
from emorph_deploy.registration.batch import read_pairs as read_batch_pairs


def _csv(tmp_path: Path, text: str, name: str = "pairs.csv", bom: bool = False) -> Path:
    p = tmp_path / name
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return p


def test_bom_and_aliases_and_case(tmp_path: Path) -> None:
    p = _csv(
        tmp_path, "Moving, FIXED ,moving_label,fixed_label,id\nm.nii.gz,f.nii.gz,ml.nii,fl.nii,a\n", bom=True
    )
    (row,) = read_pairs(p)
    assert row == PairRow(
        fixed=tmp_path / "f.nii.gz",
        moving=tmp_path / "m.nii.gz",
        fixed_labels=tmp_path / "fl.nii",
        moving_labels=tmp_path / "ml.nii",
        id="a",
        line=2,
        index=1,
    )


def test_relative_absolute_and_home_paths(tmp_path: Path) -> None:
    sub = tmp_path / "lists"
    sub.mkdir()
    p = _csv(sub, "fixed,moving\n../f.nii.gz,/data/m.nii.gz\n~/f.nii.gz,m.nii.gz\n")
    a, b = read_pairs(p)
    assert a.fixed == sub / "../f.nii.gz" and a.moving == Path("/data/m.nii.gz")
    assert b.fixed == Path("~/f.nii.gz").expanduser() and b.moving == sub / "m.nii.gz"


def test_blank_cells_lines_and_comments(tmp_path: Path) -> None:
    text = (
        "# pairs\nfixed,moving,moving_labels,id\nf.nii.gz,m.nii.gz,,\n\n,,,\n# skipped\n"
        "  f2.nii , m2.nii ,l.nii, \n"
    )
    a, b = read_pairs(_csv(tmp_path, text))
    assert a.moving_labels is None and a.fixed_labels is None and a.id is None and a.line == 3
    assert b.fixed == tmp_path / "f2.nii" and b.moving_labels == tmp_path / "l.nii" and b.line == 7
    assert (a.index, b.index) == (1, 3)  # the all-empty row still counts (register's default ids)


@pytest.mark.parametrize(
    "text, match",
    [
        ("moving,labels\nm.nii,l.nii\n", r"line 1: expected columns fixed,moving.*no fixed"),
        ("a,b\nx,y\n", r"line 1: expected a header naming"),
        ("fixed,moving\nf.nii,\n", r"line 2: expected a path in column 'moving'"),
        (
            "fixed,moving,moving_label,moving_labels\nf,m,a,b\n",
            r"line 1: expected column 'moving_labels' once",
        ),
        ("fixed,moving\n", r"expected at least one pair"),
        ("", r"empty file"),
    ],
)
def test_one_line_errors_name_file_line_and_fix(tmp_path: Path, text: str, match: str) -> None:
    p = _csv(tmp_path, text)
    with pytest.raises(InputError, match=match) as exc:
        read_pairs(p)
    msg = str(exc.value)
    assert str(p) in msg and "fix: " in msg and "\n" not in msg


def test_missing_and_undecodable_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing path"):
        read_pairs(tmp_path / "none.csv")
    (tmp_path / "latin1.csv").write_bytes("fixed,moving\nf\xe9.nii,m.nii\n".encode("latin-1"))
    with pytest.raises(InputError, match="expected UTF-8"):
        read_pairs(tmp_path / "latin1.csv")


def test_register_ids(tmp_path: Path) -> None:
    p = _csv(tmp_path, "fixed,moving,id\nf.nii.gz,a/m 1.nii.gz,\nf.nii.gz,m.nii,my pair\n")
    assert [x.id for x in read_batch_pairs(p)] == ["0001_m_1", "my_pair"]
    with pytest.raises(InputError, match=r"line 3: expected a unique id"):
        read_batch_pairs(_csv(tmp_path, "fixed,moving,id\nf,m,a\nf,m,a\n", "dup.csv"))


def test_calibration_lists_with_and_without_header(tmp_path: Path) -> None:
    bare = read_pair_csv(_csv(tmp_path, "m.nii.gz,f.nii.gz\n", "bare.csv"))
    named = read_pair_csv(
        _csv(tmp_path, "fixed,moving,moving_labels\nf.nii.gz,m.nii.gz,l.nii\n", "named.csv")
    )
    assert [(s.moving, s.fixed) for s in bare] == [(str(tmp_path / "m.nii.gz"), str(tmp_path / "f.nii.gz"))]
    assert [(s.moving, s.fixed) for s in named] == [(s.moving, s.fixed) for s in bare]
    with pytest.raises(InputError, match=r"line 1: expected 2 columns moving,fixed"):
        read_pair_csv(_csv(tmp_path, "a.nii,b.nii,c.nii\n", "three.csv"))


def test_nifti_stem() -> None:
    assert [nifti_stem(p) for p in ("a/b.nii.gz", "b.nii", Path("c.mgz"), "d")] == ["b", "b", "c", "d"]
