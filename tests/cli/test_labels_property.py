"""Property tests of the CSV reader and folder labelling: a correct ImageSet or a CLIError, nothing else."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from captum_clsemb.cli.loading import CLIError, ImageSet, find_images

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGES = ["a.png", "b.png", "sub/c.png", "d.jpg"]

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# characters a file name may hold on every file system we run on
name_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\\x00")


def _key(name: str) -> str:
    """Independent class-name key: case-insensitive, '_' = space, runs of spaces collapsed."""
    return " ".join(name.replace("_", " ").split()).lower()


def _label(cell: str, class_names: list[str] | None) -> int | None:
    """The class a CSV label cell names, or None when it names none."""
    cell = cell.strip()
    digits = cell[1:] if cell.startswith("-") else cell
    if digits and digits.isascii() and digits.isdigit():
        return int(cell)
    hits = [i for i, n in enumerate(class_names or []) if _key(n) == _key(cell)]
    return hits[0] if len(hits) == 1 else None


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("imgs")
    for name in IMAGES:
        (r / name).parent.mkdir(parents=True, exist_ok=True)
        (r / name).write_bytes(b"pixels")  # the reader never opens the files
    (r / ".hidden").mkdir()
    (r / ".hidden" / "e.png").write_bytes(b"pixels")
    return r


file_cells = st.one_of(
    st.sampled_from([*IMAGES, "./a.png", " b.png ", "sub/../a.png", "missing.png", "", "file"]),
    st.text(name_chars, max_size=8),
)
label_cells = st.one_of(
    st.sampled_from(["0", "3", "9", "10", "-1", "007", "cat", " Cat ", "CAT", "dog", "plane", "", "label"]),
    st.integers(-20, 20).map(str),
    st.text(max_size=6).filter(lambda s: "\x00" not in s),
)
rows = st.one_of(
    st.lists(
        st.tuples(file_cells, label_cells, st.lists(st.text(max_size=3), max_size=1)).map(
            lambda t: [t[0], t[1], *t[2]]
        ),
        max_size=8,
    ),
    # mostly well-formed: listed images with valid labels, some missing files
    st.lists(
        st.tuples(
            st.sampled_from([*IMAGES, "missing.png"]), st.sampled_from(["0", "9", "cat", "Dog", "4"])
        ).map(list),
        min_size=1,
        max_size=5,
        unique_by=lambda r: r[0],
    ),
)


def _as_csv(table: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(table)
    return buf.getvalue()


csv_texts = st.one_of(
    rows.map(_as_csv),
    st.tuples(st.sampled_from(["file,label\n", "\ufeff", "\n", ""]), rows.map(_as_csv)).map("".join),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=60),
)


def _check_csv_result(s: ImageSet, root: Path, text: str, class_names: list[str] | None) -> None:
    assert isinstance(s, ImageSet) and len(s.files) == len(s.labels)
    keys = [os.path.abspath(f) for f in s.files]
    assert len(set(keys)) == len(keys), "a file appears twice"
    assert all(os.path.isfile(f) for f in s.files)
    assert all(lab is None or 0 <= lab < 10 for lab in s.labels)
    # every visible image of the folder is there exactly once (listed or unlabelled)
    visible = {os.path.abspath(root / n) for n in IMAGES}
    assert visible <= set(keys)
    # the labels are the CSV's: parsed independently here
    parsed = [[c.strip() for c in r] for r in csv.reader(io.StringIO(text.removeprefix("\ufeff")))]
    parsed = [r for r in parsed if any(r)]
    rows_for = {}
    for i, r in enumerate(parsed):
        rows_for.setdefault(os.path.abspath(root / r[0]), []).append((i, r))
    for key, lab in zip(keys, s.labels):
        # rows naming this file, leaving out a first row that is a header (its label names no class)
        listed = [(i, r) for i, r in rows_for.get(key, []) if i > 0 or _label(r[1], class_names) is not None]
        if lab is None:
            assert not listed, (key, listed)
        else:
            assert len(listed) == 1 and _label(listed[0][1][1], class_names) == lab, (key, listed, lab)
    for file, reason in s.skipped:
        assert not os.path.isfile(file) and "not found" in reason


@SETTINGS
@given(text=csv_texts, named=st.booleans())
def test_csv_reader_gives_a_correct_image_set_or_a_cli_error(
    root: Path, tmp_path: Path, text: str, named: bool
):
    class_names = CLASSES if named else None
    path = tmp_path / "labels.csv"
    path.write_text(text, encoding="utf-8")
    try:
        s = find_images(root, path, class_names, 10)
    except CLIError as e:
        assert "\n" not in str(e)
        event("CLIError")
        return
    event("image set")
    _check_csv_result(s, root, text, class_names)


@SETTINGS
@given(data=st.binary(max_size=80))
def test_csv_reader_on_arbitrary_bytes(root: Path, tmp_path: Path, data: bytes):
    path = tmp_path / "labels.csv"
    path.write_bytes(data)
    try:
        s = find_images(root, path, CLASSES, 10)
    except CLIError:
        return
    _check_csv_result(s, root, data.decode("utf-8-sig"), CLASSES)


folder_names = st.one_of(
    st.sampled_from(
        ["cat", "Cat", "CAT", "dog", "dogs", "3", "8", "12", "007", "air_plane", "Air Plane", "x"]
    ),
    st.text(name_chars, min_size=1, max_size=6).filter(lambda s: s not in (".", "..") and s.strip() == s),
)


def _expected_folder_labels(names: list[str], class_names: list[str] | None) -> dict[str, int] | None:
    """Independent rule: all folder names are class names, or all are class indices (< 10); else None."""
    visible = [n for n in names if not n.startswith(".")]
    if not visible:
        return None
    by_name = {n: _label(n, class_names) for n in visible if not n.isdigit()} if class_names else {}
    named = bool(class_names) and len(by_name) == len(visible) and None not in by_name.values()
    if all(n.isascii() and n.isdigit() for n in visible):
        by_index = {n: int(n) for n in visible}
        return by_index if max(by_index.values()) < 10 else None
    return by_name if named else None  # type: ignore[return-value]


@SETTINGS
@given(
    names=st.one_of(
        st.lists(st.sampled_from(["cat", "Cat", "dog", "air_plane", "Air  Plane", "ship", "horse"]), min_size=1,
                 max_size=4, unique=True),
        st.lists(st.integers(0, 11).map(str), min_size=1, max_size=4, unique=True),
        st.lists(folder_names, min_size=1, max_size=4, unique=True),
    ),
    named=st.booleans(),
)  # fmt: skip
def test_folder_labels_are_all_names_or_all_indices_or_a_cli_error(names: list[str], named: bool):
    class_names = [*CLASSES[:1], "air plane", *CLASSES[2:]] if named else None
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        made = []
        for n in names:
            try:
                (root / n).mkdir()
            except OSError:  # a name this file system does not take
                continue
            (root / n / "img.png").write_bytes(b"pixels")
            made.append(n)
        expected = _expected_folder_labels(made, class_names)
        try:
            s = find_images(root, None, class_names, 10)
        except CLIError as e:
            assert "\n" not in str(e)
            assert expected is None, (made, str(e))
            event("CLIError")
            return
        event("image set")
        assert expected is not None, made
        assert {f.parent.name: lab for f, lab in zip(s.files, s.labels)} == expected
        assert len(s.files) == len(expected)
