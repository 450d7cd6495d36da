"""Shared by the edge tests: tiny models (cached), word pairs, reference lookups."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEED = 3


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run faster (and steadier on a busy machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.cache
def client(family: str, n_layers: int = 2):
    """The nnsight-wrapped tiny model (the package's side)."""
    from atp_nnsight.models.tiny import tiny_model

    return tiny_model(family, n_layers=n_layers, seed=SEED)


@functools.cache
def raw(family: str, n_layers: int = 2):
    """A separate raw copy with the same weights (the reference's side)."""
    from atp_nnsight.models.tiny import tiny_hf_model

    return tiny_hf_model(family, n_layers=n_layers, seed=SEED)


def reference_values(result, values: dict) -> np.ndarray:
    """The reference's ``{(upstream, downstream, input): value}`` in ``result``'s edge order."""
    e = result.edges
    assert len(values) == len(e), f"reference has {len(values)} edges, package {len(e)}"
    return np.array([values[key] for key in zip(e.upstream, e.downstream, e.input, strict=True)])


def assert_close(package: np.ndarray, reference: np.ndarray, rel: float = 2e-5) -> None:
    """Equal up to ``rel`` of the largest reference value (which must not be tiny)."""
    scale = np.abs(reference).max()
    assert scale > 1e-2, "the comparison would be vacuous"
    worst = np.abs(package - reference).max()
    assert worst <= rel * scale, f"max difference {worst:.3g} > {rel:g} x {scale:.3g}"
