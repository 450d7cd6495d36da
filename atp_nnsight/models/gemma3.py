"""Gemma 3: text-only (``gemma3_text``, e.g. gemma-3-1b) and multimodal checkpoints (``gemma3``,
4B and larger), the latter used through their language model.

Quirks: as Gemma 2 (sandwich norms, so ``attn_out``/``mlp_out`` are read at the post-norms;
``query_pre_attn_scalar ** -0.5`` scaling; ``1 + weight`` RMSNorm), but

* **q/k norms** per head (``q_norm``/``k_norm`` over ``head_dim``) before rotary: ``q``/``k``
  nodes, read at the attention call, are post-norm and post-rotary;
* no attention logit softcapping (sdpa is the default implementation);
* sliding-window and global layers alternate (5:1 in the released models, ``layer_types``),
  with a different rotary base on each kind; the window reaches the call as
  ``sliding_window`` and in the mask;
* 1 KV head in the small sizes (1B: 4 query heads share it), so a ``k``/``v`` node feeds every
  query head.

Multimodal checkpoints (``Gemma3ForConditionalGeneration``): the decoder layers are under
``model.language_model.layers`` and the sizes under ``config.text_config``. Prompts are text
only (no image tokens), so the vision tower never runs and every node is a language-model
node; images are not supported as inputs.
"""

from __future__ import annotations

from typing import Any

from atp_nnsight.models import llama
from atp_nnsight.models.adapter import Adapter
from atp_nnsight.models.gemma2 import SANDWICH_WRITES


def make_adapter(config: Any) -> Adapter:
    """Adapter of a ``gemma3_text`` model."""
    return llama.make_adapter(config, **SANDWICH_WRITES)


def make_multimodal_adapter(config: Any) -> Adapter:
    """Adapter of a multimodal ``gemma3`` model's language model."""
    return llama.make_adapter(
        config.text_config,
        family="gemma3",
        layers_path="model.language_model.layers",
        **SANDWICH_WRITES,
    )
