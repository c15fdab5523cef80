"""The tutorials: Jupytext sources paired with executed notebooks that run without errors.

Every ``tutorials/*.py`` but ``execute.py`` is a tutorial source in Jupytext's percent
format, paired with ``tutorials/<name>.ipynb``, the executed notebook the docs render. The
tests check the pairing (both files, the same cells), that the stored notebook was executed,
and execute each notebook with nbclient on a ``python3`` kernel that runs this interpreter
(600 s per cell at most). Skipped cleanly when jupytext, nbclient, nbformat or ipykernel are
missing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

# the notebooks take minutes together: as one group, pytest-xdist (--dist loadgroup, largest groups
# first) starts them at the beginning instead of leaving them to the end of a worker's queue
pytestmark = pytest.mark.xdist_group("tutorials")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
EXECUTE_SCRIPT = "execute.py"  # re-executes and re-pairs the notebooks; not a tutorial
SOURCES = sorted(p for p in TUTORIALS.glob("*.py") if p.name != EXECUTE_SCRIPT)
# Generous: under `pytest -n 2` two notebooks share the cores with other tests; on its own
# each notebook runs in well under two minutes (`python tutorials/execute.py` prints the times).
CELL_TIMEOUT = 600


@pytest.fixture
def venv_kernel(tmp_path, monkeypatch):
    """A ``python3`` kernelspec that runs this interpreter, ahead of any user kernelspec."""
    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    return "python3"


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source) for c in nb.cells]


def test_there_are_tutorials() -> None:
    assert [p.name for p in SOURCES][:4] == [
        "1_class_embedding_lens.py",
        "2_explanations.py",
        "3_perturbation_auc.py",
        "4_value_vectors.py",
    ]


def test_every_notebook_has_a_source() -> None:
    # A notebook without its .py would never be re-executed by tutorials/execute.py.
    orphans = [p.name for p in TUTORIALS.glob("*.ipynb") if not p.with_suffix(".py").is_file()]
    assert not orphans, f"notebooks without a paired Jupytext source: {orphans}"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_source_is_paired_with_its_executed_notebook(source: Path) -> None:
    text = jupytext.read(source)
    assert text.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", (
        f"{source.name} needs the Jupytext header pairing it with its notebook: "
        f"`jupytext --set-formats ipynb,py:percent tutorials/{source.name}`"
    )
    assert "# %%" in source.read_text(), f"{source.name} is not in the percent format"
    ipynb = source.with_suffix(".ipynb")
    assert ipynb.is_file(), f"{ipynb.name} is missing: run `python tutorials/execute.py {source.stem}`"
    stored = jupytext.read(ipynb)
    # The notebook holds exactly the source's cells (code and text), in order.
    assert _cells(stored) == _cells(text), (
        f"{ipynb.name} differs from {source.name}: run `python tutorials/execute.py {source.stem}`"
    )
    assert stored.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"
    # The docs render the stored outputs, so every code cell must have been executed.
    code = [c for c in stored.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_executes_without_errors(source: Path, venv_kernel: str) -> None:
    nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name=venv_kernel, resources={"metadata": {"path": str(TUTORIALS)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # every tutorial draws at least one figure
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_execute_script_takes_cells_from_the_source_and_ids_from_the_notebook(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("tutorials_execute", TUTORIALS / EXECUTE_SCRIPT)
    execute_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(execute_script)
    source, ipynb = SOURCES[0], SOURCES[0].with_suffix(".ipynb")
    # an edited copy of the first tutorial: one text line changed in the .py only
    edited = tmp_path / source.name
    edited.write_text(source.read_text().replace("# # 1. The class embedding lens", "# # 1. Edited title", 1))
    (tmp_path / ipynb.name).write_bytes(ipynb.read_bytes())
    assert [p.name for p in execute_script.sources(tmp_path)] == [source.name]
    nb = execute_script.notebook_from_source(edited)
    assert _cells(nb) == _cells(jupytext.read(edited)) != _cells(jupytext.read(ipynb))
    assert nb.cells[0].source.startswith("# 1. Edited title")
    assert [c.id for c in nb.cells] == [c.id for c in nbformat.read(ipynb, as_version=4).cells]
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    assert nb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
