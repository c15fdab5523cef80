"""The tutorial notebooks execute without errors and match their generator.

Each notebook in ``tutorials/`` is executed with nbclient on a ``python3`` kernel that runs
this interpreter (the venv's), 600 s per cell at most. Skipped cleanly when nbclient,
nbformat or ipykernel are missing.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
# Generous: under `pytest -n 2` two notebooks share the cores with other tests; the 2-minute budget per
# notebook is what `tutorials/build_tutorials.py` measures on its own.
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


def _generator():
    spec = importlib.util.spec_from_file_location("build_tutorials", TUTORIALS / "build_tutorials.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_tutorials() -> None:
    assert [p.name for p in NOTEBOOKS][:1] == ["1_class_embedding_lens.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_matches_generator_and_stores_outputs(path: Path) -> None:
    # The docs render the stored outputs, so every code cell must have been executed, and the
    # committed notebook must be what tutorials/build_tutorials.py writes.
    gen = _generator()
    assert path.stem in gen.TUTORIALS, f"{path.name} has no entry in build_tutorials.TUTORIALS"
    stored = nbformat.read(path, as_version=4)
    expected = gen.build(path.stem, gen.TUTORIALS[path.stem])
    assert [(c.cell_type, c.source) for c in stored.cells] == [
        (c.cell_type, c.source) for c in expected.cells
    ]
    code = [c for c in stored.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_without_errors(path: Path, venv_kernel: str) -> None:
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name=venv_kernel, resources={"metadata": {"path": str(TUTORIALS)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # every tutorial draws at least one figure
    assert any("image/png" in o.get("data", {}) for o in outputs)
