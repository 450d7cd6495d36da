"""Phi-3 and Phi-4-mini (``model_type == "phi3"``).

Quirks: Llama-style paths and pre-norm blocks, but

* one fused ``self_attn.qkv_proj`` (queries, then keys, then values along the output); ``q``,
  ``k``, ``v`` nodes are read at the attention call, after the split and rotary, so fusion
  does not matter;
* fused ``mlp.gate_up_proj`` (gate, then up); ``neuron`` is the ``down_proj`` input
  ``up * act(gate)``, one node per intermediate unit;
* partial rotary (``partial_rotary_factor``, e.g. 0.75 in Phi-4-mini) on the first head dims;
* ``sliding_window`` from the config (Phi-3-mini-4k: 2047) is passed to the call.
"""

from __future__ import annotations

from typing import Any

from atp_nnsight.models import llama
from atp_nnsight.models.adapter import Adapter


def make_adapter(config: Any) -> Adapter:
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = llama.head_dim_of(config)
    starts = {"q": 0, "k": n_heads * head_dim, "v": (n_heads + n_kv) * head_dim}
    projections = {kind: ("qkv_proj", start, head_dim) for kind, start in starts.items()}
    return llama.make_adapter(config, projections=projections)
