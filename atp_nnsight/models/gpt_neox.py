"""GPT-NeoX family: Pythia (``model_type == "gpt_neox"``).

Quirks: layers under ``gpt_neox.layers``; with ``use_parallel_residual`` (Pythia) attention and
MLP both read the same residual stream and the layer writes ``attn_out + mlp_out`` at once;
fused ``attention.query_key_value`` projection; partial rotary embeddings (``rotary_pct``, 25%
of head dims in Pythia) applied before the attention call, so q/k read there are post-rotary;
out projection ``attention.dense``; MLP ``dense_h_to_4h`` → GELU → ``dense_4h_to_h``.
"""

from __future__ import annotations

from typing import Any

from atp_nnsight.models.adapter import Adapter


def make_adapter(config: Any) -> Adapter:
    head_dim = config.hidden_size // config.num_attention_heads
    return Adapter(
        family="gpt_neox",
        layers_path="gpt_neox.layers",
        attn="attention",
        out_proj="dense",
        mlp="mlp",
        down_proj="dense_4h_to_h",
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_attention_heads,
        head_dim=head_dim,
        d_model=config.hidden_size,
        d_mlp=config.intermediate_size,
        parallel_residual=bool(getattr(config, "use_parallel_residual", True)),
        projections={  # query_key_value: per head its query, key and value
            kind: ("query_key_value", i * head_dim, 3 * head_dim) for i, kind in enumerate("qkv")
        },
    )
