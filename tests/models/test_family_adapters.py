"""Adapters of the families beyond the first five: sizes, module paths, loading from a saved
directory and on the meta device, refused node kinds, and an attention call that cannot be
found (never a silent fallback)."""

from __future__ import annotations

import pytest
import torch
import transformers
from nnsight.modeling.transformers import TransformersModel

from atp_nnsight.methods.atp import attribute
from atp_nnsight.methods.exact import patch
from atp_nnsight.models import (
    FAMILIES,
    AttentionCallNotFound,
    UnsupportedArchitectureError,
    adapter_for_config,
    get_adapter,
    loading,
)
from atp_nnsight.models.tiny import (
    ALL_TINY_FAMILIES,
    MORE_TINY_FAMILIES,
    tiny_config,
    tiny_hf_model,
    tiny_model,
    tiny_tokenizer,
)
from atp_nnsight.types import NODE_KINDS

PROMPT = "w1 w5 w7 w2 w9 w3"
PAIRS = [("w1 w5 w7 w2 w9", "w3 w8 w7 w4 w6", "w11", "w12")]

# family: (n_kv_heads, d_mlp, attn_write, refused kinds)
EXPECTED = {
    "gemma2": (2, 64, "post_attention_layernorm", set()),
    "gemma3_text": (1, 64, "post_attention_layernorm", set()),
    "gemma3": (1, 64, "post_attention_layernorm", set()),
    "qwen3": (2, 64, None, set()),
    "olmo2": (2, 64, "post_attention_layernorm", set()),
    "olmo3": (2, 64, "post_attention_layernorm", set()),
    "phi3": (2, 64, None, set()),
    "gptj": (4, 64, None, set()),
    "mixtral": (2, 2 * 32, None, {"neuron"}),
    "qwen2_moe": (2, 2 * 32 + 32, None, {"neuron"}),
    "olmoe": (2, 2 * 32, None, {"neuron"}),
}


def test_every_family_has_an_adapter_and_a_tiny_model():
    assert set(ALL_TINY_FAMILIES) == set(FAMILIES)
    assert set(EXPECTED) == set(MORE_TINY_FAMILIES)


@pytest.mark.parametrize("family", MORE_TINY_FAMILIES)
def test_adapter_sizes_and_paths(family):
    model = tiny_model(family, n_layers=3)
    adapter = get_adapter(model)
    n_kv, d_mlp, attn_write, refused = EXPECTED[family]
    assert adapter.family == family
    assert (adapter.n_layers, adapter.n_heads, adapter.head_dim, adapter.d_model) == (3, 4, 8, 32)
    assert (adapter.n_kv_heads, adapter.d_mlp, adapter.attn_write) == (n_kv, d_mlp, attn_write)
    assert adapter.mlp_write == (attn_write and "post_feedforward_layernorm")
    assert adapter.parallel_residual == (family == "gptj")
    assert set(adapter.unsupported) == refused
    assert len(adapter.layers(model)) == 3
    with model.trace(PROMPT, use_cache=False):
        logits = model.output.logits.save()
    plain = tiny_hf_model(family, n_layers=3)(torch.tensor([[1, 5, 7, 2, 9, 3]])).logits
    torch.testing.assert_close(logits, plain)


def test_gemma3_multimodal_is_used_through_its_language_model():
    model = tiny_model("gemma3")
    hf = model._module
    assert type(hf).__name__ == "Gemma3ForConditionalGeneration"
    assert not hasattr(hf.config, "vocab_size")  # as in released checkpoints: text_config's
    adapter = get_adapter(model)
    assert adapter.layers_path == "model.language_model.layers"
    assert adapter.layers(model)._module is hf.model.language_model.layers
    text_only = tiny_hf_model("gemma3_text")
    assert text_only.config.layer_types == hf.config.text_config.layer_types


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_moe_refusal_names_the_supported_kinds(family):
    adapter = adapter_for_config(tiny_config(family))
    supported = [k for k in NODE_KINDS if k != "neuron"]
    with pytest.raises(ValueError) as info:
        adapter.n_units("neuron")
    message = str(info.value)
    assert family in message and "expert" in message and "mlp_out" in message
    assert message.endswith(", ".join(supported))
    assert [adapter.n_units(k) for k in supported] == [1, 4, 2, 2, 4, 1, 1]


def test_unsupported_architecture_lists_the_families():
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(UnsupportedArchitectureError) as info:
        adapter_for_config(config)
    for family in ("gemma2", "gemma3_text", "qwen3", "olmo3", "phi3", "gptj", "mixtral"):
        assert family in str(info.value)


# ---- loading --------------------------------------------------------------------------------


def _save(family: str, folder) -> torch.nn.Module:
    hf = tiny_hf_model(family, seed=4)
    hf.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return hf


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "gptj", "qwen2_moe"])
def test_load_saved_model(tmp_path, family):
    """A saved checkpoint of the family loads with its default attention (eager for Gemma 2,
    which transformers refuses to run with sdpa) and gives the saved model's logits."""
    saved = _save(family, tmp_path)
    model = loading.load_model(str(tmp_path))
    assert model._module.config._attn_implementation == ("eager" if family == "gemma2" else "sdpa")
    assert get_adapter(model).family == family
    with model.trace("w1 w2 w3", use_cache=False):
        logits = model.output.logits.save()
    torch.testing.assert_close(logits, saved(torch.tensor([[1, 2, 3]])).logits)
    if family == "gemma2":
        with pytest.raises(ValueError, match="scaled_dot_product_attention"):
            loading.load_model(str(tmp_path), attn_implementation="sdpa")


@pytest.mark.parametrize("family", ["gemma3", "olmo3", "mixtral"])
def test_meta_build_for_remote_use(tmp_path, family):
    _save(family, tmp_path)
    model = loading._build_meta(str(tmp_path))
    assert {p.device.type for p in model._module.parameters()} == {"meta"}
    adapter = get_adapter(model)
    assert adapter.family == family and adapter.n_layers == 2


# ---- an attention call that cannot be found ---------------------------------------------------


class HandWrittenAttention(torch.nn.Module):
    """Attention computed inline: no call receives query, key and value states."""

    def __init__(self, attn: torch.nn.Module) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        self.o_proj = attn.o_proj

    def forward(self, hidden_states, **kwargs):
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, -1, 8).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, t, -1, 8).transpose(1, 2).repeat_interleave(2, 1)
        v = self.v_proj(hidden_states).view(b, t, -1, 8).transpose(1, 2).repeat_interleave(2, 1)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        scores = (q @ k.transpose(-1, -2) * 8**-0.5).masked_fill(~causal, float("-inf"))
        z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(z), None


class TwoCallAttention(HandWrittenAttention):
    """Attention through a helper called twice with q, k, v: ambiguous."""

    def attend(self, query, key, value):
        t = query.shape[2]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        scores = (query @ key.transpose(-1, -2) * 8**-0.5).masked_fill(~causal, float("-inf"))
        return scores.softmax(-1) @ value

    def forward(self, hidden_states, **kwargs):
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, -1, 8).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, t, -1, 8).transpose(1, 2).repeat_interleave(2, 1)
        v = self.v_proj(hidden_states).view(b, t, -1, 8).transpose(1, 2).repeat_interleave(2, 1)
        z = (self.attend(q, k, v) + self.attend(q, k, v)) / 2
        return self.o_proj(z.transpose(1, 2).reshape(b, t, -1)), None


@pytest.mark.parametrize(
    ("attention", "found"),
    [(HandWrittenAttention, "found no call"), (TwoCallAttention, "found several calls")],
)
def test_attention_call_not_found_is_an_error_naming_the_model(attention, found):
    hf = tiny_hf_model("llama")
    for block in hf.model.layers:
        block.self_attn = attention(block.self_attn)
    model = TransformersModel(hf, tokenizer=tiny_tokenizer())
    heads = attribute(model, PAIRS, "head", method="atp", progress=False)  # needs no call
    assert abs(heads.per_pair).max() > 1e-3
    for run in (
        lambda: attribute(model, PAIRS, "k", method="atp", progress=False),
        lambda: attribute(model, PAIRS, "q,head", method="atp+qk", progress=False),
        lambda: patch(model, PAIRS, "v", progress=False),
    ):
        with pytest.raises(Exception) as info:
            run()
        error = info.value
        while not isinstance(error, AttentionCallNotFound) and error.__cause__ is not None:
            error = error.__cause__
        assert isinstance(error, AttentionCallNotFound), info.value
        message = str(error)
        assert "LlamaForCausalLM" in message and attention.__name__ in message
        assert found in message and "query, key and value" in message
