"""GPT-2 family (``model_type == "gpt2"``).

Quirks: sequential pre-LN blocks under ``transformer.h``; attention is ``attn`` with one fused
``c_attn`` (Conv1D) projection, so q, k and v are views of a single output; absolute learned
position embeddings (no rotary); out projection ``attn.c_proj``; MLP ``mlp.c_fc`` → GELU →
``mlp.c_proj``. Multi-head attention only (no GQA). ``scale_attn_by_inverse_layer_idx`` is
honoured because the softmax scale is read from the attention call itself. The forward has
two calls receiving q, k, v (``attention_interface`` and, with ``reorder_and_upcast_attn``,
``self._upcast_and_reordered_attn``). The latter (eager attention with
``reorder_and_upcast_attn``) is not supported for q/k/v nodes: its softmax scale is internal.
"""

from __future__ import annotations

from typing import Any

from atp_nnsight.models.adapter import Adapter


def make_adapter(config: Any) -> Adapter:
    return Adapter(
        family="gpt2",
        layers_path="transformer.h",
        attn="attn",
        out_proj="c_proj",
        mlp="mlp",
        down_proj="c_proj",
        n_layers=config.n_layer,
        n_heads=config.n_head,
        n_kv_heads=config.n_head,
        head_dim=config.n_embd // config.n_head,
        d_model=config.n_embd,
        d_mlp=config.n_inner or 4 * config.n_embd,
        attention_prefer="attention_interface",
        projections={  # c_attn: all queries, then keys, then values
            kind: ("c_attn", i * config.n_embd, config.n_embd // config.n_head)
            for i, kind in enumerate("qkv")
        },
    )
