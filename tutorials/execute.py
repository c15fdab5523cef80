#!/usr/bin/env python3
r"""Execute the tutorials and store them, with their outputs, as the paired notebooks.

Each tutorial is a Jupytext percent-format script, ``tutorials/<name>.py`` (the source: edit
it in any editor, or open it as a notebook in Jupyter with jupytext installed), paired with
``tutorials/<name>.ipynb`` (header ``formats: ipynb,py:percent``). The notebooks are
committed *with* their outputs so that the Sphinx docs render them without running anything
(``nb_execution_mode = "off"`` in ``docs/conf.py``). Run this script after changing a
tutorial, the library or the bundled demo model::

    python tutorials/execute.py            # execute every tutorial, rewrite its .ipynb
    python tutorials/execute.py 1 3        # only tutorials whose name starts with 1 or 3

It reads the cells of each ``.py``, keeps the cell ids and metadata of the existing
``.ipynb`` (so that a re-run changes only what changed), executes the notebook on a
``python3`` kernel that runs this interpreter, with ``tutorials/`` as working directory, and
writes the ``.ipynb``. The ``.py`` files are never modified. Everything runs on a CPU on the
bundled CIFAR-10 demo model, well under two minutes per notebook.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import nbformat
from jupytext.combine import combine_inputs_with_outputs
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
FORMATS = "ipynb,py:percent"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
# Environment noise that says nothing about the tutorial (tqdm without ipywidgets).
NOISE = ("TqdmWarning: IProgress not found",)


def sources(directory: Path = HERE) -> list[Path]:
    """The tutorial sources: every ``*.py`` of ``directory`` but this script, by name."""
    return sorted(p for p in directory.glob("*.py") if p.name != Path(__file__).name)


def paired_formats(source: Path) -> str | None:
    """The ``formats`` entry of the Jupytext header of ``source`` (None without one)."""
    nb = jupytext.read(source)
    return nb.metadata.get("jupytext", {}).get("formats")


def notebook_from_source(source: Path) -> nbformat.NotebookNode:
    """The cells of ``source``, with the ids and metadata of its existing ``.ipynb``."""
    nb = jupytext.read(source)
    ipynb = source.with_suffix(".ipynb")
    if ipynb.exists():
        nb = combine_inputs_with_outputs(
            nb, nbformat.read(ipynb, as_version=4), fmt="py:percent"
        )
    nb.metadata.setdefault("jupytext", {})["formats"] = FORMATS
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    return nb


def use_this_interpreter() -> None:
    """Point the ``python3`` kernel at this interpreter (ahead of any user kernelspec)."""
    root = Path(tempfile.mkdtemp(prefix="clsemb-kernel-"))
    atexit.register(shutil.rmtree, root, True)
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({**KERNELSPEC, "argv": argv}))
    os.environ["JUPYTER_PATH"] = str(root)


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> float:
    """Execute in place (working directory ``tutorials/``); returns the wall time in seconds."""
    start = time.perf_counter()
    NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,  # no timestamps in the stored notebooks
        resources={"metadata": {"path": str(HERE)}},
    ).execute()
    elapsed = time.perf_counter() - start
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [
                o
                for o in cell.outputs
                if not (
                    o.output_type == "stream"
                    and o.name == "stderr"
                    and any(n in o.text for n in NOISE)
                )
            ]
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "only",
        nargs="*",
        help="execute only tutorials whose file name starts with these",
    )
    args = parser.parse_args(argv)
    selected = [
        p
        for p in sources()
        if not args.only or any(p.name.startswith(o) for o in args.only)
    ]
    if not selected:
        parser.error(
            f"no tutorial in {HERE.name}/ starts with {' or '.join(args.only)}"
        )
    for source in selected:
        if paired_formats(source) != FORMATS:
            parser.error(
                f"{source.name} has no Jupytext header pairing it with a notebook; add one with "
                f"`jupytext --set-formats {FORMATS} {source.name}`"
            )
    use_this_interpreter()
    for source in selected:
        nb = notebook_from_source(source)
        seconds = execute(nb)
        nbformat.validate(nb)
        jupytext.write(nb, source.with_suffix(".ipynb"))
        print(
            f"{source.with_suffix('.ipynb').name}: executed in {seconds:.1f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
