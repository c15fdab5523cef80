"""`--out` safety: files clsemb did not write are never replaced, outputs appear complete or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captum_clsemb.cli import report as report_module
from captum_clsemb.cli.main import main

FAST = ["--no-progress", "--max-images", "4", "--batch-size", "4", "--sections", "identifiability"]


def _report(out: Path, *extra: str) -> int:
    return main(["report", "--out", str(out), *FAST, *extra])


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the run gets as far as loading the model (the checks must come first)."""

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(report_module, "load_model", fail)
    from captum_clsemb.cli import compare as compare_module

    monkeypatch.setattr(compare_module, "load_model", fail)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("clsemb: error: ")
    return err


def test_a_users_report_json_is_not_overwritten(tmp_path: Path, capsys, no_model) -> None:
    # mkdir d; echo mine > d/report.json; clsemb report --out d
    d = tmp_path / "d"
    d.mkdir()
    (d / "report.json").write_text("mine\n")
    assert _report(d) == 2
    err = _one_line_error(capsys)
    assert "--overwrite" in err and "report.json" in err
    assert (d / "report.json").read_text() == "mine\n"
    assert sorted(p.name for p in d.iterdir()) == ["report.json"]
    # --overwrite never replaces a file that clsemb did not write either
    assert _report(d, "--overwrite") == 2
    assert "report.json" in _one_line_error(capsys)
    assert (d / "report.json").read_text() == "mine\n"


def test_a_users_results_md_is_not_overwritten_by_compare(tmp_path: Path, capsys, no_model) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "results.md").write_text("my notes\n")
    assert main(["compare", "--out", str(d), "--num-images", "2", "--no-progress"]) == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert (d / "results.md").read_text() == "my notes\n"


def test_non_empty_folder_needs_overwrite_and_keeps_other_files(tmp_path: Path, capsys, monkeypatch) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("keep me\n")
    calls = []
    real = report_module.load_model
    monkeypatch.setattr(report_module, "load_model", lambda *a: calls.append(a) or real(*a))
    assert _report(d) == 2
    assert "--overwrite" in _one_line_error(capsys) and not calls  # refused before any work
    assert _report(d, "--overwrite") == 0
    assert (d / "notes.txt").read_text() == "keep me\n"
    manifest = json.loads((d / ".clsemb-manifest.json").read_text())
    assert set(manifest["files"]) == {
        "report.html",
        "report.json",
        *(f"{name}.{ext}" for name in ("identifiability_curves", "identifiability_rate", "token_maps")
          for ext in ("png", "svg")),
    }  # fmt: skip
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((d / name).read_bytes()).hexdigest() == digest


def test_rerun_replaces_only_its_own_files(tmp_path: Path, capsys) -> None:
    d = tmp_path / "d"
    assert _report(d) == 0
    first = _snapshot(d)
    (d / "notes.txt").write_text("added by the user\n")
    # an earlier clsemb output folder is replaced without --overwrite; fewer images, other numbers
    assert (
        main(["report", "--out", str(d), *FAST[:-4], "--max-images", "2", "--sections", "identifiability"])
        == 0
    )
    second = _snapshot(d)
    assert (d / "notes.txt").read_text() == "added by the user\n"
    assert second["report.json"] != first["report.json"]
    assert (
        json.loads((d / "report.json").read_text())["sections"]["class_identifiability_across_blocks"][
            "num_images"
        ]
        == 2
    )
    # a file of the earlier run that the user edited since is theirs now: refused, kept as it is
    (d / "report.html").write_text("my edits\n")
    assert _report(d) == 2
    err = _one_line_error(capsys)
    assert "report.html" in err
    assert (d / "report.html").read_text() == "my edits\n"
    assert not [
        p for p in tmp_path.iterdir() if p.name.startswith(".d.")
    ]  # no temporary folders or locks left


class Crash(Exception):
    pass


def test_a_run_that_fails_while_writing_leaves_the_old_output(tmp_path: Path, monkeypatch) -> None:
    d = tmp_path / "d"
    assert _report(d) == 0
    before = _snapshot(d)

    def crash(*args, **kwargs):  # report.html and the figures are written, then the run dies
        raise Crash

    monkeypatch.setattr(report_module, "write_json", crash)
    with pytest.raises(Crash):
        main(["report", "--out", str(d), *FAST[:-4], "--max-images", "2", "--sections", "identifiability"])
    assert _snapshot(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # temporary folder and lock removed
    monkeypatch.undo()
    assert _report(d) == 0  # and the folder is usable again


def test_a_run_killed_while_moving_files_leaves_a_folder_the_next_run_accepts(
    tmp_path: Path, monkeypatch
) -> None:
    d = tmp_path / "d"
    assert _report(d) == 0
    real_replace, moved = os.replace, []

    def dies_after_two_files(src, dst):  # the process dies after two output files were moved
        if Path(dst).parent == d and Path(dst).name != ".clsemb-manifest.json":
            if len(moved) == 2:
                raise OSError("killed")
            moved.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_after_two_files)
    assert (
        main(["report", "--out", str(d), *FAST[:-4], "--max-images", "2", "--sections", "identifiability"])
        == 2
    )
    monkeypatch.undo()
    assert len(moved) == 2
    # the error names where the files not moved yet were kept
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("d-new-")]
    assert len(kept) == 1 and (kept[0] / "report.json").is_file()
    shutil.rmtree(kept[0])
    # old and new files are mixed, but every one is known to be clsemb's: the next run replaces them
    assert _report(d) == 0
    assert (
        json.loads((d / "report.json").read_text())["sections"]["class_identifiability_across_blocks"][
            "num_images"
        ]
        == 4
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_during_the_run_leaves_the_old_output(tmp_path: Path) -> None:
    d = tmp_path / "d"
    assert _report(d) == 0
    before = _snapshot(d)
    # all 200 bundled images in small batches: the run is still computing when the signal arrives
    cmd = [sys.executable, "-m", "captum_clsemb", "report", "--out", str(d), "--no-progress",
           "--batch-size", "4", "--sections", "identifiability,mechanisms"]  # fmt: skip
    # Ctrl-C in a terminal: the run must not inherit an ignored SIGINT (a shell's background job, such
    # as a test suite started with `&`, ignores it, and so would every process it starts)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".d.clsemb-tmp-*")):  # the run has started computing
            assert proc.poll() is None, "the run ended without a temporary output folder"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # exit status 130, or ended by SIGINT after printing the message below (seen under heavy load: CPython
    # ends a `python -m` run by SIGINT when an interrupt went through a nested evaluation); a shell shows
    # 130 for both
    assert proc.returncode in (130, -signal.SIGINT), err[-2000:]
    assert err.strip().splitlines()[-1] == "clsemb: interrupted; --out was left as it was"
    assert _snapshot(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_second_run_on_the_same_out_fails_while_the_first_runs(tmp_path: Path, capsys) -> None:
    from captum_clsemb.cli.output import OutputDir

    d = tmp_path / "d"
    first = OutputDir(d, "report", ["report.json"])
    tmp = first.open()  # the first run is computing
    try:
        assert _report(d) == 2
        err = _one_line_error(capsys)
        assert "another clsemb run" in err and str(os.getpid()) in err
        (tmp / "report.json").write_text("{}\n")
    finally:
        first.commit()
    assert (d / "report.json").read_text() == "{}\n"
    assert _report(d) == 0  # lock released


@pytest.mark.parametrize("case", ["file", "under_file", "unwritable"])
def test_bad_out_fails_fast(case: str, tmp_path: Path, capsys, no_model) -> None:
    f = tmp_path / "f"
    f.write_text("a file\n")
    if case == "file":
        out, message = f, "is a file"
    elif case == "under_file":
        out, message = f / "sub" / "out", "which is a file"
    else:
        if sys.platform != "linux":
            pytest.skip("uses /proc")
        out, message = Path("/proc/clsemb-out"), "cannot"  # nothing can be created in /proc
    assert _report(out) == 2
    assert message in _one_line_error(capsys)
    assert f.read_text() == "a file\n"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_parent_fails_fast(tmp_path: Path, capsys, no_model) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert _report(parent / "out") == 2
        assert "not writable" in _one_line_error(capsys)
    finally:
        parent.chmod(0o755)
