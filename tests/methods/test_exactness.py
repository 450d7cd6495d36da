"""Tier 1: exactness on constructed models where the first-order estimates must be exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nnsight.modeling.transformers import TransformersModel

from atp_nnsight import PromptPair, attribute, patch
from atp_nnsight.models.tiny import tiny_hf_model, tiny_tokenizer


class Zero(torch.nn.Module):
    """An MLP that writes nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def _pairs(n: int, length: int, seed: int = 0) -> list[PromptPair]:
    rng = np.random.default_rng(seed)

    def words() -> str:
        return " ".join(f"w{i}" for i in rng.integers(0, 90, length))

    return [
        PromptPair(words(), words(), f" w{rng.integers(90)}", f" w{rng.integers(90)}")
        for _ in range(n)
    ]


def _wrap(hf: torch.nn.Module) -> TransformersModel:
    return TransformersModel(hf, tokenizer=tiny_tokenizer(hf.config.vocab_size))


def linear_after_last_attention(family: str) -> TransformersModel:
    """Last layer's MLP writes zero and the final norm is the identity: everything after the
    last layer's attention probabilities is linear."""
    hf = tiny_hf_model(family, n_layers=3, seed=1)
    if family == "gpt2":
        hf.transformer.ln_f = torch.nn.Identity()
        hf.transformer.h[-1].mlp = Zero()
    else:
        hf.model.norm = torch.nn.Identity()
        hf.model.layers[-1].mlp = Zero()
    return _wrap(hf)


def linear_after_last_mlp(family: str) -> TransformersModel:
    """Final norm is the identity: the last MLP's neurons reach the metric linearly."""
    hf = tiny_hf_model(family, n_layers=3, seed=2)
    if family == "gpt_neox":
        hf.gpt_neox.final_layer_norm = torch.nn.Identity()
    else:
        hf.model.norm = torch.nn.Identity()
    return _wrap(hf)


def direct_path_only(family: str) -> TransformersModel:
    """Layers after 0 read nothing from the residual stream (q/k/v and MLP input weights
    zeroed), so layer-0 nodes reach the metric only directly."""
    hf = tiny_hf_model(family, n_layers=3, seed=3)
    for block in hf.model.layers[1:]:
        for proj in (block.self_attn.v_proj, block.mlp.up_proj):
            proj.weight.zero_()
            if proj.bias is not None:
                proj.bias.zero_()
    return _wrap(hf)


def _assert_equal_on(result, truth, mask) -> None:
    np.testing.assert_allclose(
        result.per_pair[:, mask], truth.per_pair[:, mask], atol=2e-5, rtol=1e-4
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("per_position", [False, True])
def test_atp_equals_exact_when_downstream_is_linear(family, per_position):
    model = linear_after_last_attention(family)
    pairs = _pairs(3, 6)
    kinds = "v,head,attn_out"
    est = attribute(
        model, pairs, kinds, method="atp", layers=[2], per_position=per_position, progress=False
    )
    truth = patch(model, pairs, kinds, layers=[2], per_position=per_position, progress=False)
    assert np.abs(truth.per_pair).max() > 1e-2  # the effects are not trivially zero
    _assert_equal_on(est, truth, slice(None))


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_atp_equals_exact_for_last_mlp(family):
    model = linear_after_last_mlp(family)
    pairs = _pairs(2, 5, seed=4)
    est = attribute(model, pairs, "neuron,mlp_out", method="atp", layers=[2], progress=False)
    truth = patch(model, pairs, "neuron,mlp_out", layers=[2], progress=False)
    assert np.abs(truth.per_pair).max() > 1e-2
    _assert_equal_on(est, truth, slice(None))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("per_position", [False, True])
def test_qk_fix_equals_exact_query_and_key_patches(family, per_position):
    """After the attention probabilities everything is linear, so the QK fix is exact — for
    single keys (the O(T²) closed form), single queries, and all positions at once."""
    model = linear_after_last_attention(family)
    pairs = _pairs(3, 7, seed=5)
    est = attribute(
        model, pairs, "q,k", method="atp+qk", layers=[2], per_position=per_position, progress=False
    )
    plain = attribute(
        model, pairs, "q,k", method="atp", layers=[2], per_position=per_position, progress=False
    )
    truth = patch(model, pairs, "q,k", layers=[2], per_position=per_position, progress=False)
    assert np.abs(truth.per_pair).max() > 1e-2
    _assert_equal_on(est, truth, slice(None))
    # and plain AtP, linear through the softmax, is not exact here
    assert np.abs(plain.per_pair - truth.per_pair).max() > 1e-3


def test_graddrop_equals_abs_atp_for_direct_path_nodes():
    model = direct_path_only("llama")
    pairs = _pairs(3, 6, seed=6)
    kinds = "q,k,v,head,neuron,attn_out,mlp_out"
    atp = attribute(model, pairs, kinds, method="atp", layers=[0], progress=False)
    gd = attribute(model, pairs, kinds, method="atp+gd", layers=[0], progress=False)
    assert np.abs(atp.per_pair).max() > 1e-3
    np.testing.assert_allclose(gd.per_pair, np.abs(atp.per_pair), atol=1e-6, rtol=1e-5)


def test_graddrop_differs_from_atp_with_indirect_paths():
    """Guard against a GradDrop that silently equals |AtP|."""
    model = _wrap(tiny_hf_model("llama", n_layers=3, seed=3))
    pairs = _pairs(3, 6, seed=6)
    atp = attribute(model, pairs, "head,neuron", method="atp", layers=[0], progress=False)
    gd = attribute(model, pairs, "head,neuron", method="atp+gd", layers=[0], progress=False)
    assert np.abs(gd.per_pair - np.abs(atp.per_pair)).max() > 1e-3
    assert gd.mean_effect is None and atp.mean_effect is not None


def bf16_cancellation_model() -> TransformersModel:
    """A bf16 model whose metric is linear in the embedding of the last token, built so that the
    AtP estimate of ``resid`` at layer 0 is exactly 1 but is 0 if formed in bf16.

    Layer 0 writes nothing (zero output projections) and the final norm is the identity, so
    ``M = h[0] - h[1]`` at the last position (``W_U[w7] = e0``, ``W_U[w8] = e1``) and the
    gradient there is ``(1, -1, 0, ...)``. The last clean token embeds as ``(-1, 0, ...)`` and
    the last noise token as ``(256, 256, ...)``, so ``delta = (257, 256, 0, ...)`` and
    ``delta · grad = 257 - 256 = 1``. bf16 has 8 significant bits: ``257`` rounds to ``256``
    (in the difference or in the product), and the estimate collapses to 0.
    """
    hf = tiny_hf_model("llama", n_layers=1, seed=9)
    block = hf.model.layers[0]
    block.self_attn.o_proj.weight.zero_()
    block.mlp.down_proj.weight.zero_()
    hf.model.norm = torch.nn.Identity()
    embed, unembed = hf.model.embed_tokens.weight, hf.lm_head.weight
    embed[3] = 0.0
    embed[3, 0] = -1.0  # last clean token, w3
    embed[6] = 0.0
    embed[6, :2] = 256.0  # last noise token, w6
    unembed[7] = 0.0
    unembed[7, 0] = 1.0  # clean target, w7
    unembed[8] = 0.0
    unembed[8, 1] = 1.0  # noise target, w8
    return _wrap(hf.to(torch.bfloat16))


@pytest.mark.parametrize("per_position", [False, True])
def test_bf16_model_estimates_are_formed_in_float32(per_position):
    """The case loses its whole answer (1 -> 0) if differences, products or sums are formed in
    bf16; the float32 estimate is exact, and equals exact patching (the model is linear)."""
    model = bf16_cancellation_model()
    pairs = [PromptPair("w1 w2 w3", "w4 w5 w6", " w7", " w8")]
    kwargs = dict(layers=[0], per_position=per_position, progress=False)
    est = attribute(model, pairs, "resid", method="atp", **kwargs)
    truth = patch(model, pairs, "resid", **kwargs)
    assert est.per_pair.dtype == np.float32
    expected = np.zeros((1, len(est)), dtype=np.float32)
    expected[0, -1] = 1.0  # the node summed over positions, or the last position
    np.testing.assert_array_equal(est.per_pair, expected)
    np.testing.assert_array_equal(truth.per_pair, expected)
