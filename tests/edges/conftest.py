"""Edge tests: one torch thread; ``tests`` and ``tests/edges`` importable (the reference
modules and :mod:`edge_support`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run faster (and steadier on a busy machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
