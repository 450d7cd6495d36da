"""Exactness on constructed models, and the identities that tie edges to nodes.

* EAP equals exact edge patching for edges into inputs after which everything is linear.
* The QK fix equals exact patching for single query/key edges when everything after the
  attention probabilities is linear (the norm in front of the query/key stays nonlinear: the
  shifted query is exact through it).
* The edges into ``v`` sum to the AtP estimate of ``v``'s own copy (read from the two runs by
  the reference); the edges crossing the residual stream at a layer input sum to the node
  engine's AtP of that ``resid`` node.
* Patching every edge reproduces the source (noise) run exactly.
"""

from __future__ import annotations

import edge_reference as er
import numpy as np
import pytest
import torch
import torch_reference as ref
from edge_support import SEED, assert_close, client, raw
from nnsight.modeling.transformers import TransformersModel

from atp_nnsight import attribute
from atp_nnsight.edges import EdgeGraph, attribute_edges
from atp_nnsight.edges.exact import patch_edge_sets, patch_edges
from atp_nnsight.models.tiny import tiny_hf_model, tiny_tokenizer

PAIRS = ref.word_pairs(11, [6, 6])

NAMES = {
    "gpt2": ("transformer.ln_f", "ln_1", "ln_2"),
    "llama": ("model.norm", "input_layernorm", "post_attention_layernorm"),
    "gpt_neox": ("gpt_neox.final_layer_norm", "input_layernorm", "post_attention_layernorm"),
}
"""Final norm, attention input norm, MLP input norm."""


class LinearMLP(torch.nn.Module):
    """An MLP without a nonlinearity."""

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(0.3 * torch.randn(width, width, generator=generator))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def linear_after_last_attention(family: str, keep_attention_norm: bool) -> TransformersModel:
    """Two layers; after the last layer's attention probabilities everything is linear: its
    MLP is linear, the MLP norm and the final norm are identities (and, unless kept, the
    attention's input norm too, so the last layer's v input is linear as well)."""
    hf = tiny_hf_model(family, n_layers=2, seed=SEED)
    final, attn_norm, mlp_norm = NAMES[family]
    parent, name = final.rsplit(".", 1)
    setattr(hf.get_submodule(parent), name, torch.nn.Identity())
    block = ref.decoder_layers(hf)[-1]
    setattr(block, mlp_norm, torch.nn.Identity())
    if not keep_attention_norm:
        setattr(block, attn_norm, torch.nn.Identity())
    block.mlp = LinearMLP(hf.config.get_text_config().hidden_size, SEED)
    return TransformersModel(hf, tokenizer=tiny_tokenizer(hf.config.vocab_size))


def _into_last_layer(result, inputs) -> np.ndarray:
    e = result.edges
    last = e["downstream_layer"] >= 1
    return np.flatnonzero((last & e["input"].isin(inputs)).to_numpy())


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_eap_equals_exact_when_downstream_linear(family):
    model = linear_after_last_attention(family, keep_attention_norm=False)
    eap = attribute_edges(model, PAIRS, "eap", progress=False)
    chosen = _into_last_layer(eap, ["v", "mlp", "logits"])
    exact = patch_edges(model, PAIRS, chosen, progress=False)
    assert_close(eap.per_pair[:, chosen], exact.per_pair, rel=1e-4)
    q = _into_last_layer(eap, ["q"])[:6]  # control: queries go through the softmax
    nonlinear = patch_edges(model, PAIRS, q, progress=False)
    assert np.abs(eap.per_pair[:, q] - nonlinear.per_pair).max() > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_qk_fix_equals_exact_for_single_query_key_edges(family):
    model = linear_after_last_attention(family, keep_attention_norm=True)
    fixed = attribute_edges(model, PAIRS, "eap+qk", progress=False)
    chosen = _into_last_layer(fixed, ["q", "k"])
    exact = patch_edges(model, PAIRS, chosen, progress=False)
    assert_close(fixed.per_pair[:, chosen], exact.per_pair, rel=1e-4)
    plain = attribute_edges(model, PAIRS, "eap", progress=False)
    assert np.abs(plain.per_pair[:, chosen] - exact.per_pair).max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gptj", "gpt_neox"])
def test_edges_into_an_input_sum_to_the_attribution_of_its_copy(family):
    result = attribute_edges(client(family), PAIRS[:1], "eap", progress=False)
    copies = er.copy_attribution(raw(family), PAIRS[0])
    e = result.edges
    sums = result.per_pair[0].copy()
    keys = list(zip(e.downstream, e.input, strict=True))
    totals = {}
    for key, value in zip(keys, sums, strict=True):
        totals[key] = totals.get(key, 0.0) + float(value)
    names = list(copies)
    assert_close(np.array([totals[k] for k in names]), np.array([copies[k] for k in names]))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_edges_across_a_layer_input_sum_to_node_atp_of_resid(family):
    model = client(family, n_layers=3)
    edges = attribute_edges(model, PAIRS, "eap", progress=False)
    nodes = attribute(model, PAIRS, "resid", method="atp", progress=False)
    e = edges.edges
    for layer in range(3):
        crossing = (e["upstream_layer"] < layer) & (e["downstream_layer"] >= layer)
        total = edges.per_pair[:, crossing.to_numpy()].sum(1)
        assert_close(total, nodes.per_pair[:, layer])


@pytest.mark.parametrize("family", ["llama", "gptj", "qwen3"])
def test_patching_every_edge_reproduces_the_source_run(family):
    model = client(family)
    n = EdgeGraph.of(model).n_edges
    effects, _ = patch_edge_sets(
        model, PAIRS, [np.ones(n, bool), np.zeros(n, bool)], progress=False
    )
    single = patch_edges(model, PAIRS, [0], progress=False)
    base = np.array(single.metadata["base_metric"])
    source = np.array(single.metadata["source_metric"])
    assert np.abs(source - base).min() > 1e-2
    np.testing.assert_allclose(base + effects[:, 0], source, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(effects[:, 1], 0.0)
