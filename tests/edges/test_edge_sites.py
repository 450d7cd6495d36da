"""Per-layer pieces of the edge methods against direct formulas on the module's weights."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from atp_nnsight.edges.sites import head_writes

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
