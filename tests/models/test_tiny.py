"""Tiny random-weight models: every family runs through nnsight with the expected shapes."""

from __future__ import annotations

import math

import nnsight
import pytest
import torch
from nnsight.modeling.transformers import TransformersModel

from atp_nnsight.models import get_adapter
from atp_nnsight.models.tiny import (
    TINY_FAMILIES,
    tiny_hf_model,
    tiny_model,
    tiny_tokenizer,
)

GQA = {"llama", "mistral", "qwen2"}
PROMPT = "w1 w5 w7 w2 w9 w3"
IDS = [1, 5, 7, 2, 9, 3]


def test_tokenizer_is_word_level_without_bos():
    tok = tiny_tokenizer()
    assert tok("w1 w5 w7").input_ids == [1, 5, 7]
    assert tok("w1 nonsense").input_ids == [1, 98]  # <unk>
    assert tok.eos_token_id == 99 and tok.pad_token_id == 99
    assert len(tok) == 100
    assert tok.decode([1, 5]) == "w1 w5"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_forward_through_nnsight_matches_plain_torch(family):
    model = tiny_model(family)
    assert isinstance(model, TransformersModel)
    with model.trace(PROMPT, use_cache=False):
        logits = model.output.logits.save()
    assert logits.shape == (1, len(IDS), 100)
    reference = tiny_hf_model(family)(torch.tensor([IDS])).logits
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_adapter_sizes(family):
    model = tiny_model(family, n_layers=3)
    adapter = get_adapter(model)
    assert adapter.family == family
    assert adapter.n_layers == 3
    assert (adapter.n_heads, adapter.head_dim, adapter.d_model, adapter.d_mlp) == (4, 8, 32, 64)
    assert adapter.n_kv_heads == (2 if family in GQA else 4)
    assert len(adapter.layers(model)) == 3


@pytest.mark.parametrize("family", sorted(GQA))
def test_grouped_query_attention_has_two_kv_heads(family):
    model = tiny_model(family)
    hf = model._module
    assert hf.config.num_attention_heads == 4 and hf.config.num_key_value_heads == 2
    attn = hf.model.layers[0].self_attn
    assert attn.q_proj.out_features == 4 * 8
    assert attn.k_proj.out_features == attn.v_proj.out_features == 2 * 8
    adapter = get_adapter(model)
    with model.trace(PROMPT, use_cache=False):
        raw, call = adapter.read_layer(model, 1, ("q", "k", "v"), attention=True)
        shapes = nnsight.save({k: tuple(t.shape) for k, t in raw.items()})
    assert shapes == {"q": (1, 4, 6, 8), "k": (1, 2, 6, 8), "v": (1, 2, 6, 8)}


def test_family_specific_settings():
    neox = tiny_hf_model("gpt_neox").config
    assert neox.use_parallel_residual is True
    assert neox.rope_parameters["partial_rotary_factor"] == 0.25
    assert tiny_hf_model("mistral").config.sliding_window == 4
    qwen = tiny_hf_model("qwen2")
    bias = qwen.model.layers[0].self_attn.q_proj.bias
    assert bias is not None and bias.abs().max() > 0.01
    gpt2 = tiny_hf_model("gpt2")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # tied
    for family in TINY_FAMILIES:
        config = tiny_hf_model(family).config
        assert config.vocab_size == 100
        assert getattr(config, "max_position_embeddings", getattr(config, "n_positions", 0)) >= 64


def test_sliding_window_is_active():
    """Mistral (window 4, 2 layers) cannot see token 0 from position 10; Llama can."""
    ids = torch.arange(1, 12).unsqueeze(0)
    changed = ids.clone()
    changed[0, 0] = 50
    for family, sees_first in (("mistral", False), ("llama", True)):
        hf = tiny_hf_model(family)
        diff = (hf(ids).logits[0, -1] - hf(changed).logits[0, -1]).abs().max()
        assert (diff > 1e-4) == sees_first, (family, diff)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_attention_is_far_from_uniform(family):
    hf = tiny_hf_model(family, attn_implementation="eager")
    out = hf(torch.tensor([IDS * 2]), output_attentions=True)
    for probs in out.attentions:
        p = probs[0, :, 6:, :]  # later queries, [heads, query, key]
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        n_visible = torch.arange(7, 13).float()
        if family == "mistral":
            n_visible = n_visible.clamp(max=4)
        uniform = n_visible.log().mean()
        assert entropy < 0.8 * uniform, (family, float(entropy), float(uniform))
    # and the next-token distribution is neither flat nor one-hot
    top = out.logits.softmax(-1).max(-1).values.mean()
    assert 1.5 / 100 < top < 0.9


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_deterministic_by_seed(family):
    a = tiny_hf_model(family, seed=3).state_dict()
    b = tiny_model(family, seed=3)._module.state_dict()
    c = tiny_hf_model(family, seed=4).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("llama", seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_eval_and_frozen(family):
    model = tiny_model(family)
    hf = model._module
    assert not hf.training
    assert not any(p.requires_grad for p in hf.parameters())


def test_options():
    model = tiny_model("llama", n_layers=1, dtype=torch.bfloat16, attn_implementation="eager")
    hf = model._module
    assert hf.config.num_hidden_layers == 1
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    assert model.attn_implementation == "eager"
    assert tiny_model("mistral", sliding_window=8)._module.config.sliding_window == 8
    std = hf.model.layers[0].mlp.up_proj.weight.float().std()
    assert 0.2 < std < 0.4  # re-initialised at a large scale, not the 0.02 default
    assert math.isclose(float(hf.model.norm.weight.float().mean()), 1.0)


def test_unknown_family():
    with pytest.raises(ValueError, match="gpt_neox"):
        tiny_model("bert")
