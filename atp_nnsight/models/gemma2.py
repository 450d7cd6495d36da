"""Gemma 2 (``model_type == "gemma2"``).

Quirks: Llama-style paths and grouped-query attention, plus

* **sandwich norms**: each block is ``x + post_attention_layernorm(attn(input_layernorm(x)))``
  then ``x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``, so ``attn_out``
  and ``mlp_out`` are read at the *post-norms* — what is added to the residual stream, which
  is also GradDrop's residual write — not at the attention/MLP outputs. Note the name clash:
  ``post_attention_layernorm`` is the post-norm here, the pre-MLP norm in Llama;
* **attention logit softcapping** (``attn_logit_softcapping``, 50 in the released models):
  scores are ``cap · tanh(scale · q·k / cap)``; the attention call receives ``softcap=`` and the
  QK fix recomputes the softmax with it. transformers refuses sdpa for Gemma 2 (sdpa cannot
  softcap), so its default is eager attention (flash/flex also work); asking for sdpa fails
  in transformers;
* the softmax scale is ``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5`` (read from
  the call's ``scaling``); sliding-window attention on alternate layers (``layer_types``),
  passed to the call as ``sliding_window`` and in the mask;
* RMSNorm scales by ``1 + weight``; embeddings are multiplied by ``sqrt(hidden_size)``; final
  logits are softcapped too (outside every node, so nothing to do).
"""

from __future__ import annotations

from typing import Any

from atp_nnsight.models import llama
from atp_nnsight.models.adapter import Adapter

SANDWICH_WRITES = {
    "attn_write": "post_attention_layernorm",
    "mlp_write": "post_feedforward_layernorm",
}
"""Residual writes of Gemma 2/3 blocks: the outputs of their post-norms."""


def make_adapter(config: Any) -> Adapter:
    return llama.make_adapter(config, **SANDWICH_WRITES)
