"""Per-layer pieces of the edge methods against direct formulas on the module's weights, and
the per-head projection path against the masked one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_reference as ref
from edge_support import client
from transformers.pytorch_utils import Conv1D

from atp_nnsight.edges import attribute, attribute_edges
from atp_nnsight.edges.graph import FAMILY_NORMS
from atp_nnsight.edges.sites import _columns, _rows, head_writes, per_head_projections
from atp_nnsight.models import get_adapter

N_HEADS, D_HEAD, D_MODEL = 4, 3, 10


def linear() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(N_HEADS * D_HEAD, D_MODEL, bias=True)


def conv1d() -> torch.nn.Module:  # GPT-2's output projection: weight stored [in, out]
    torch.manual_seed(0)
    module = Conv1D(D_MODEL, N_HEADS * D_HEAD)
    torch.nn.init.normal_(module.weight)
    torch.nn.init.normal_(module.bias)
    return module


def weight_in_out(module: torch.nn.Module) -> torch.Tensor:
    return module.weight if isinstance(module, Conv1D) else module.weight.T


# (batch, tokens): one call small enough for the masked copies, one for reading off W_O
@pytest.mark.parametrize("shape", [(1, 1), (3, 7)], ids=["masked", "identity"])
@pytest.mark.parametrize("make", [linear, conv1d], ids=["linear", "conv1d"])
def test_head_writes_are_each_heads_own_write_without_bias(make, shape):
    module = make()
    b, t = shape
    delta_z = torch.randn(b, t, N_HEADS * D_HEAD, generator=torch.Generator().manual_seed(1))
    got = head_writes(module, delta_z, N_HEADS)
    w = weight_in_out(module).detach().reshape(N_HEADS, D_HEAD, D_MODEL)
    z = delta_z.reshape(b, t, N_HEADS, D_HEAD)
    expected = torch.einsum("bthj,hjd->bhtd", z, w)
    assert got.shape == (b, N_HEADS, t, D_MODEL)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the heads' writes add up to the projection of the whole change (bias cancels)
    with torch.no_grad():
        whole = module(delta_z) - module(torch.zeros_like(delta_z))
    torch.testing.assert_close(got.sum(1), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1d"])
def test_projection_rows_are_the_weight_rows_without_bias(conv):
    torch.manual_seed(0)  # a q/k/v projection: D_MODEL features in, N_HEADS * D_HEAD out
    width = N_HEADS * D_HEAD
    module = Conv1D(width, D_MODEL) if conv else torch.nn.Linear(D_MODEL, width)
    torch.nn.init.normal_(module.weight)
    torch.nn.init.normal_(module.bias)
    columns = _columns(("proj", 1, 2 * D_HEAD), 2, D_HEAD, "cpu")  # units 0, 1: stride 2 heads
    assert columns.tolist() == [[1, 2, 3], [7, 8, 9]]
    rows = _rows(module, torch.zeros(5, D_MODEL), columns)
    weight = weight_in_out(module).T  # [out, in]
    torch.testing.assert_close(rows, weight[columns.flatten()].reshape(2, D_HEAD, D_MODEL))


@pytest.mark.parametrize("family", sorted(FAMILY_NORMS))
def test_per_head_rows_give_the_masked_projection_backward(family, monkeypatch):
    """The fast path (each head through its own rows) equals one masked projection backward
    per head, on every family with a head-local projection."""
    model = client(family)
    adapter = get_adapter(model)
    assert adapter.projections, f"{family} has no head-local projection"
    pairs = ref.word_pairs(7, [5])
    used = {}

    def choose(adapter, n_streams, n_rows, seq_len, every):
        used["projections"] = dict(adapter.projections) if every else {}
        return used["projections"]

    monkeypatch.setattr(attribute, "per_head_projections", lambda *a: choose(*a, every=True))
    fast = attribute_edges(model, pairs, "eap", progress=False).per_pair
    assert used["projections"] == adapter.projections
    monkeypatch.setattr(attribute, "per_head_projections", lambda *a: choose(*a, every=False))
    masked = attribute_edges(model, pairs, "eap", progress=False).per_pair
    np.testing.assert_allclose(fast, masked, rtol=1e-4, atol=1e-6)


def test_per_head_rows_are_read_only_when_cheaper():
    adapter = get_adapter(client("llama"))
    d_head = adapter.head_dim
    assert per_head_projections(adapter, 1, 1, d_head) == {}
    assert per_head_projections(adapter, 1, 1, d_head + 1) == adapter.projections
    assert per_head_projections(adapter, 2, 1, d_head // 2 + 1) == adapter.projections
