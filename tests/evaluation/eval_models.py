"""Constructed models and pairs for the evaluation tests (imported by name: eval_models)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from nnsight.modeling.transformers import TransformersModel

from atp_nnsight import PromptPair
from atp_nnsight.models.tiny import tiny_hf_model, tiny_tokenizer


def wrap(hf: torch.nn.Module) -> TransformersModel:
    return TransformersModel(hf, tokenizer=tiny_tokenizer(hf.config.vocab_size))


def random_pairs(n: int, length: int, seed: int = 0) -> list[PromptPair]:
    rng = np.random.default_rng(seed)

    def words() -> str:
        return " ".join(f"w{i}" for i in rng.integers(0, 90, length))

    return [
        PromptPair(words(), words(), f" w{rng.integers(90)}", f" w{rng.integers(90)}")
        for _ in range(n)
    ]


def linear_after_last_mlp() -> TransformersModel:
    """Final norm is the identity, so the last layer's neurons reach the logits linearly:
    AtP (and AtP*) of those neurons equals exact patching, and patching any set of them is
    additive (tests/methods/test_exactness.py checks the single-node equality)."""
    hf = tiny_hf_model("llama", n_layers=3, seed=2)
    hf.model.norm = torch.nn.Identity()
    return wrap(hf)


@dataclass
class Planted:
    """A model where layer-0 neuron ``j`` acts only through a saturated layer-1 neuron ``m``."""

    model: TransformersModel
    pairs: list[PromptPair]
    j: int  # node index of the planted neuron (layer 0 → node j of "neuron" × layers 0-1)
    m: int  # the layer-1 gate neuron (node 64 + m)


def planted_false_negative(n_pairs: int = 4) -> Planted:
    """Two-layer llama with a private channel: layer-0 neuron ``j`` writes only residual
    dimension 0, which only layer-1 neuron ``m`` reads, through ``silu(200 · x0)``.

    Layer-0 attention writes nothing, so ``j``'s activation at the last position depends on
    the last token only; clean prompts end in tokens where ``a_j < 0`` and noise prompts in
    tokens where ``a_j > 0``, scaled so that ``x0`` goes from ≤ -1 to ≥ +1. On the clean run
    ``m``'s gate sits deep in SiLU's flat negative tail (gradient ~1e-10), so AtP — and
    GradDrop, whose dropped paths are zero here too (dimension 0 has no unembedding and no
    other reader) — estimate ~0 for ``j``; the real patch opens the gate.
    """
    hf = tiny_hf_model("llama", n_layers=2, seed=0)
    l0, l1 = hf.model.layers
    d_mlp = hf.config.intermediate_size
    with torch.no_grad():
        l0.self_attn.o_proj.weight.zero_()
        emb = hf.model.embed_tokens.weight
        emb[:, 0] = 0
        h = l0.post_attention_layernorm(emb[:90])
        act = F.silu(l0.mlp.gate_proj(h)) * l0.mlp.up_proj(h)  # [tokens, d_mlp]
        sorted_act = act.sort(dim=0).values
        strength = torch.minimum(-sorted_act[n_pairs - 1], sorted_act[-n_pairs])
        j = int(strength.argmax())
        neg = act[:, j].argsort()[:n_pairs].tolist()
        pos = act[:, j].argsort(descending=True)[:n_pairs].tolist()
        scale = 1.0 / float(strength[j])
        down0 = l0.mlp.down_proj.weight  # [d_model, d_mlp]
        down0[0, :] = 0
        down0[:, j] = 0
        down0[0, j] = scale
        for proj in (l1.self_attn.q_proj, l1.self_attn.k_proj, l1.self_attn.v_proj):
            proj.weight[:, 0] = 0
        m = 7
        for proj in (l1.mlp.gate_proj, l1.mlp.up_proj):
            proj.weight[:, 0] = 0
            proj.weight[m] = 0
        l1.mlp.gate_proj.weight[m, 0] = 200.0
        l1.mlp.up_proj.weight[m, 0] = 10.0
        hf.lm_head.weight[:, 0] = 0
    assert d_mlp == 64
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(n_pairs):
        prefix = " ".join(f"w{t}" for t in rng.integers(0, 90, 5))
        pairs.append(PromptPair(f"{prefix} w{neg[i]}", f"{prefix} w{pos[i]}", " w90", " w91"))
    return Planted(wrap(hf), pairs, j, m)
