"""Execute the notebooks and commit-ready stamp them: ``python scripts/execute_notebooks.py``.

Each notebook in ``notebooks/`` (or the ones named on the command line) runs top to bottom in a
fresh ``python3`` kernel, in a temporary working directory (files the notebooks write stay out
of the repository), and is written back with its outputs. Every code cell gets
``metadata["atp_nnsight"]["source_sha256"]``, the SHA-256 of its source at execution time;
``tests/test_notebooks.py`` fails when a committed cell's source no longer matches its stamp
(its outputs came from other code) or when a notebook has no outputs.

The kernel runs with ``OMP_WAIT_POLICY=PASSIVE`` (unless set already). torch's CPU threads
otherwise spin at every parallel region's barrier; on a machine whose cores are shared with
other jobs the spinning thread takes the core the other thread needs, and notebook 01 took
about 5 minutes instead of about 1 (see the note in ``tests/test_notebooks.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
STAMP = "atp_nnsight"
TIMEOUT = 900
"""Seconds one cell may take."""


def source_sha256(source: str) -> str:
    """The stamp of a cell's source (UTF-8 bytes, exactly as stored)."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def kernel_env() -> dict[str, str]:
    """The environment of the notebook kernel: ours, with torch's threads waiting passively."""
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def execute(book: nbformat.NotebookNode, workdir: str | Path) -> nbformat.NotebookNode:
    """Run every cell of ``book`` in place in a fresh kernel started in ``workdir``."""
    client = NotebookClient(
        book,
        timeout=TIMEOUT,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(env=kernel_env())
    return book


def coalesce_streams(book: nbformat.NotebookNode) -> None:
    """Merge consecutive stdout/stderr outputs of a cell and apply carriage returns, as a
    notebook frontend shows them (a progress bar's updates become its final line)."""
    for cell in book.cells:
        if cell.cell_type != "code":
            continue
        merged: list[nbformat.NotebookNode] = []
        for out in cell.outputs:
            last = merged[-1] if merged else None
            if (
                out.output_type == "stream"
                and last is not None
                and last.output_type == "stream"
                and last.name == out.name
            ):
                last.text += out.text
            else:
                merged.append(out)
        for out in merged:
            if out.output_type == "stream":
                out.text = "\n".join(line.rsplit("\r", 1)[-1] for line in out.text.split("\n"))
        cell.outputs = merged


def stamp(book: nbformat.NotebookNode) -> None:
    """Record each code cell's source hash in its metadata."""
    for cell in book.cells:
        if cell.cell_type == "code":
            cell.metadata[STAMP] = {"source_sha256": source_sha256(cell.source)}


def stale_cells(book: nbformat.NotebookNode) -> list[int]:
    """Indices of code cells whose outputs were not produced by their current source."""
    return [
        i
        for i, cell in enumerate(book.cells)
        if cell.cell_type == "code"
        and (
            cell.get("execution_count") is None
            or cell.metadata.get(STAMP, {}).get("source_sha256") != source_sha256(cell.source)
        )
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        book = nbformat.read(path, as_version=4)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="atp-notebook-") as workdir:
            execute(book, workdir)
        coalesce_streams(book)
        stamp(book)
        nbformat.write(book, path)
        print(f"{path.name}: executed in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
