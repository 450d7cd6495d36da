"""Tier 5: the notebooks are committed executed, with outputs from their current cells, and
every notebook executes top to bottom on the bundled model.

Execute and stamp them with ``python scripts/execute_notebooks.py``. The kernel runs with
``OMP_WAIT_POLICY=PASSIVE`` (see that script): measured on this project's shared 2-core
machine, notebook 01 took 303 s in an nbclient kernel with torch's default spin-waiting
threads and 112 s with passive waiting, the two run side by side under the same load; a plain
process spin-waiting took as long as the kernel (622 s vs 587 s side by side), so the kernel
itself was never the cause. The execution tests run the notebooks two at a time, each kernel
with one torch thread.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
WITH_FIGURES = ("01_quickstart", "02_your_own_task", "03_comparing_methods")


def _executor():
    spec = importlib.util.spec_from_file_location(
        "execute_notebooks", ROOT / "scripts" / "execute_notebooks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


executor = _executor()


def outputs(book: nbformat.NotebookNode, kind: str | None = None) -> list[dict]:
    found = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    if kind is None:
        return found
    return [o for o in found if kind in o.get("data", {})]


def test_there_are_notebooks():
    names = {p.stem for p in NOTEBOOKS}
    assert {"01_quickstart", "02_your_own_task", "03_comparing_methods", "04_remote_ndif"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_outputs_of_its_current_cells(path):
    book = nbformat.read(path, as_version=4)
    stale = executor.stale_cells(book)
    assert not stale, (
        f"{path.name}: code cells {stale} were edited after the notebook was executed (or never "
        "executed); run python scripts/execute_notebooks.py and commit the result"
    )
    assert outputs(book), f"{path.name} has no outputs"
    assert not [o for o in outputs(book) if o.get("output_type") == "error"]
    if path.stem in WITH_FIGURES:
        assert outputs(book, "image/png"), f"{path.name} should show its figures"
    # small enough to read on a plain viewer: PNG figures, no widget state or huge HTML
    assert not outputs(book, "application/vnd.jupyter.widget-view+json")
    assert path.stat().st_size < 1_500_000, f"{path.name} is {path.stat().st_size} bytes"


def test_a_stale_or_unexecuted_cell_is_detected():
    book = nbformat.v4.new_notebook()
    book.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("x")]
    assert executor.stale_cells(book) == [0, 1]  # never executed
    for n, cell in enumerate(book.cells, start=1):
        cell.execution_count = n
    executor.stamp(book)
    assert executor.stale_cells(book) == []
    book.cells[1].source = "x + 1"  # edited after execution
    assert executor.stale_cells(book) == [1]


def _execute_copy(path: Path, folder: Path, env: dict[str, str]):
    """Execute a copy of ``path`` with its outputs cleared, by the script that stamps the
    committed notebooks, in a subprocess: ``(completed process, executed copy)``."""
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    copy = folder / path.name
    nbformat.write(book, copy)
    script = ROOT / "scripts" / "execute_notebooks.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(copy)], env=env, capture_output=True, text=True
    )
    return proc, copy


@pytest.fixture(scope="module")
def executions(tmp_path_factory):
    """Every notebook executed in its own fresh kernel, two at a time with one torch thread
    each (the test machine has two cores), the longest (03) first: stem → future of
    :func:`_execute_copy`. The NDIF notebook runs ``remote="local"`` (no API key)."""
    folder = tmp_path_factory.mktemp("notebooks")
    env = {k: v for k, v in os.environ.items() if k != "NDIF_API_KEY"}
    env["OMP_NUM_THREADS"] = "1"
    order = sorted(NOTEBOOKS, key=lambda p: p.stem != "03_comparing_methods")
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {p.stem: pool.submit(_execute_copy, p, folder, env) for p in order}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, executions):
    proc, copy = executions[path.stem].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    book = nbformat.read(copy, as_version=4)
    assert not executor.stale_cells(book), "a cell did not run"
    assert not [o for o in outputs(book) if o.get("output_type") == "error"]
    if path.stem in WITH_FIGURES:
        assert outputs(book, "image/png"), "plots should render inline"
