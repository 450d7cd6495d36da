"""Helpers shared by the edge tests: tiny models (cached), reference lookups, comparisons."""

from __future__ import annotations

import functools

import numpy as np

SEED = 3


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
