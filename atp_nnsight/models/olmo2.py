"""OLMo 2 and OLMo 3 (``model_type`` in olmo2, olmo3).

Quirks: Llama-style paths, plus

* **post-norms only**: a block is ``x + post_attention_layernorm(attn(x))`` then
  ``x + post_feedforward_layernorm(mlp(x))`` (no norm on the way in), so ``attn_out`` and
  ``mlp_out`` are read at the post-norms — what is added to the residual stream, and
  GradDrop's residual write;
* **q/k norms over all heads at once** (RMSNorm over ``n_heads * head_dim`` of the
  projection, before the split into heads and before rotary): a head's normalised query
  depends on every head's projection. ``q``/``k`` nodes, read at the attention call, are
  post-norm and post-rotary, so patching one head's query changes only that head;
* OLMo 3 adds sliding-window layers (3 of 4 in the released models, ``layer_types``), passed
  to the call as ``sliding_window`` and in the mask.
"""

from __future__ import annotations

from typing import Any

from atp_nnsight.models import llama
from atp_nnsight.models.adapter import Adapter, separate_projections


def make_adapter(config: Any) -> Adapter:
    return llama.make_adapter(
        config,
        attn_write="post_attention_layernorm",
        mlp_write="post_feedforward_layernorm",
        projections=separate_projections(llama.head_dim_of(config), "v"),  # q/k: all-head norms
    )
