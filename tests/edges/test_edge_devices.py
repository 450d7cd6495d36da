"""Device safety of the edge methods without a GPU: under a virtual split of a tiny model over
2 and 3 devices (``tests/device_check.py``), no op mixes devices and every number equals the
unsplit run."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch_reference as ref
from device_check import split_model

from atp_nnsight.edges import EdgeGraph, attribute_edges, patch_edge_sets
from atp_nnsight.models.tiny import tiny_model

N_LAYERS = 4
PAIRS = ref.word_pairs(31, [5, 5])
SPLITS = [(2, "accelerate"), (3, "torch")]


@functools.cache
def model(family: str):
    return tiny_model(family, n_layers=N_LAYERS, seed=5)


@functools.cache
def single(family: str, method: str):
    return attribute_edges(model(family), PAIRS, method, ig_steps=2, progress=False)


@pytest.mark.parametrize("method", ["eap", "eap*", "eap-ig"])
@pytest.mark.parametrize(("n_devices", "align"), SPLITS, ids=["2dev", "3dev-torch-hooks"])
@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_attribute_edges(family, n_devices, align, method):
    with split_model(model(family), n_devices, align=align):
        split = attribute_edges(model(family), PAIRS, method, ig_steps=2, progress=False)
    np.testing.assert_allclose(
        split.per_pair, single(family, method).per_pair, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_patch_edge_sets(family):
    graph = EdgeGraph.of(model(family))
    rng = np.random.default_rng(0)
    sets = [rng.random(graph.n_edges) < 0.3, np.ones(graph.n_edges, bool), [3, graph.n_edges - 1]]
    expected, _ = patch_edge_sets(model(family), PAIRS, sets, progress=False)
    with split_model(model(family), 3):
        split, _ = patch_edge_sets(model(family), PAIRS, sets, progress=False)
    np.testing.assert_allclose(split, expected, rtol=1e-5, atol=1e-5)
