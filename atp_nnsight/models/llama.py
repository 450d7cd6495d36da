"""Llama family: Llama, Mistral, Qwen2, SmolLM2 (``model_type`` in llama, mistral, qwen2).

Quirks: layers under ``model.layers``; separate ``q_proj``/``k_proj``/``v_proj`` (Qwen2 adds a
bias on them); grouped-query attention — k and v have ``num_key_value_heads`` heads and reach
the attention call *before* ``repeat_kv``, so ``k``/``v`` nodes are per KV head, and query head
``h`` reads KV head ``h // (n_heads // n_kv_heads)``; rotary embeddings on all head dims,
applied before the attention call; Mistral (and Qwen2 with ``use_sliding_window``) pass a
sliding-window mask/``sliding_window`` to the call; out projection ``self_attn.o_proj`` whose
input width is ``n_heads * head_dim`` (not always ``hidden_size``); gated MLP
``act(gate_proj(x)) * up_proj(x)`` → ``down_proj``.

Most later families share these module paths; their modules build on :func:`make_adapter`.
"""

from __future__ import annotations

from typing import Any

from atp_nnsight.models.adapter import Adapter, separate_projections


def head_dim_of(config: Any) -> int:
    """The per-head width: ``config.head_dim`` when set, else ``hidden_size / heads``."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def make_adapter(config: Any, **overrides: Any) -> Adapter:
    """The adapter of a Llama-style model; ``overrides`` replace :class:`Adapter` arguments."""
    n_heads = config.num_attention_heads
    head_dim = head_dim_of(config)
    arguments: dict[str, Any] = dict(
        family=config.model_type,
        layers_path="model.layers",
        attn="self_attn",
        out_proj="o_proj",
        mlp="mlp",
        down_proj="down_proj",
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        d_model=config.hidden_size,
        d_mlp=config.intermediate_size,
        projections=separate_projections(head_dim),
    )
    return Adapter(**{**arguments, **overrides})
