"""GPT-J (``model_type == "gptj"``; GPT-J-6B is hosted on NDIF).

Quirks: layers under ``transformer.h``; **parallel attention and MLP**: both read the same
``ln_1(x)`` and the block returns ``x + attn_out + mlp_out``; separate ``q_proj``/``k_proj``/
``v_proj`` without bias, multi-head attention (no GQA); **partial, interleaved rotary**
(``rotary_dim`` = 64 of 256 head dims in GPT-J-6B, rotating pairs of adjacent dims) applied
before the attention call, whose ``query, key, value`` arguments are therefore post-rotary;
eager attention computes the scores in float32; out projection ``attn.out_proj``; MLP
``fc_in`` → GELU → ``fc_out``.
"""

from __future__ import annotations

from typing import Any

from atp_nnsight.models.adapter import Adapter, separate_projections


def make_adapter(config: Any) -> Adapter:
    return Adapter(
        family="gptj",
        layers_path="transformer.h",
        attn="attn",
        out_proj="out_proj",
        mlp="mlp",
        down_proj="fc_out",
        n_layers=config.n_layer,
        n_heads=config.n_head,
        n_kv_heads=config.n_head,
        head_dim=config.n_embd // config.n_head,
        d_model=config.n_embd,
        d_mlp=config.n_inner or 4 * config.n_embd,
        parallel_residual=True,
        projections=separate_projections(config.n_embd // config.n_head),
    )
