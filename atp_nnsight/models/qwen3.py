"""Qwen3 (``model_type == "qwen3"``).

Quirks: Llama-style paths, grouped-query attention and pre-norm blocks, plus **q/k norms**
per head (RMSNorm over ``head_dim``, before rotary); ``q``/``k`` nodes, read at the attention
call, are post-norm and post-rotary. ``head_dim`` is set explicitly in the config (128 in the
released models, so ``n_heads * head_dim`` need not equal ``hidden_size``). Optional
sliding-window layers (``layer_types``) reach the call as ``sliding_window``.
"""

from __future__ import annotations

from typing import Any

from atp_nnsight.models import llama
from atp_nnsight.models.adapter import Adapter


def make_adapter(config: Any) -> Adapter:
    return llama.make_adapter(config)
