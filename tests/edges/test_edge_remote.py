"""Remote execution of the edge methods: what a request ships, and the same numbers locally,
as nnsight's ``remote="local"`` dry run and on the strict NDIF emulator (``atp_nnsight`` not
importable there, the server's import allowlist and builtins; fp32 for exact comparisons,
bf16 compared by rank)."""

from __future__ import annotations

import numpy as np
import pytest
from remote_setup import PAIRS, assert_rank_agreement, build_setup
from test_payloads import _assert_portable, _payload

from atp_nnsight.edges import EdgeGraph, attribute_edges, patch_edge_sets

METHODS = ["eap", "eap*", "eap-ig"]


@pytest.fixture(scope="module")
def llama():
    return build_setup("llama")


def _run(s, method, remote):
    return attribute_edges(s.client, PAIRS, method, ig_steps=2, remote=remote, progress=False)


def _sets(s):
    n = EdgeGraph.of(s.client).n_edges
    return [np.arange(n) % 3 == 0, [0, n - 1]]


@pytest.mark.parametrize("method", METHODS)
def test_payload_ships_only_source(llama, method):
    client = llama.client
    _assert_portable(client, _payload(client, lambda backend: _run(llama, method, backend)))


def test_patch_payload_ships_only_source(llama):
    client = llama.client
    payload = _payload(
        client, lambda b: patch_edge_sets(client, PAIRS, _sets(llama), remote=b, progress=False)
    )
    _assert_portable(client, payload)


@pytest.mark.parametrize("method", METHODS)
def test_same_numbers_locally_dry_run_and_emulated_server(llama, method):
    local = _run(llama, method, False)
    dry = _run(llama, method, "local")
    backend = llama.exact_backend()
    emulated = _run(llama, method, backend)
    assert backend.requests >= 1 and not backend.errors
    np.testing.assert_allclose(dry.per_pair, local.per_pair, rtol=0, atol=1e-6)
    np.testing.assert_allclose(emulated.per_pair, local.per_pair, rtol=1e-5, atol=1e-5)
    bf16 = _run(llama, method, llama.backend())
    assert_rank_agreement(local.scores, bf16.scores, min_spearman=0.95)


def test_patch_edge_sets_on_emulated_server(llama):
    local, _ = patch_edge_sets(llama.client, PAIRS, _sets(llama), progress=False)
    backend = llama.exact_backend()
    emulated, _ = patch_edge_sets(llama.client, PAIRS, _sets(llama), remote=backend, progress=False)
    assert backend.requests >= 1 and not backend.errors
    np.testing.assert_allclose(emulated, local, rtol=1e-5, atol=1e-5)
