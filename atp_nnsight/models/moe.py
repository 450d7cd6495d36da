"""Mixture-of-experts models: Mixtral, Qwen1.5/2-MoE, OLMoE (``model_type`` in mixtral,
qwen2_moe, olmoe).

Attention is Llama-style (GQA; Qwen2-MoE adds q/k/v biases; OLMoE has q/k norms over all
heads and optional ``clip_qkv``), so ``resid``, ``q``, ``k``, ``v``, ``head`` and ``attn_out``
nodes work as for Llama, and ``mlp_out`` is the sparse MoE block's output (every routed
expert, weighted by the router, plus Qwen2-MoE's gated shared expert).

**``neuron`` nodes are refused.** In transformers 5 the experts of a layer are one module with
3-D weights (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) whose forward loops over the
experts that received tokens, gathering those tokens first (or runs a grouped matmul, by
``experts_implementation``). An expert's down-projection input therefore exists only as a
``[tokens routed to e, I]`` intermediate inside that loop, with no module boundary to read
or patch, and which tokens it covers differs between the clean and the noise run.
``d_mlp`` is the routed experts' active width per token (``top_k * I``, plus the shared
expert's width), used only to size batches.
"""

from __future__ import annotations

from typing import Any

from atp_nnsight.models import llama
from atp_nnsight.models.adapter import Adapter, separate_projections

EXPERT_NEURONS = (
    "expert neurons live inside the fused experts module, for the routed tokens only; use "
    "mlp_out for the whole MoE block"
)


def make_adapter(config: Any) -> Adapter:
    width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    active = config.num_experts_per_tok * width
    active += getattr(config, "shared_expert_intermediate_size", 0) or 0
    extra = {}
    if config.model_type == "olmoe":  # q/k norms over all heads
        extra["projections"] = separate_projections(llama.head_dim_of(config), "v")
    return llama.make_adapter(config, d_mlp=active, unsupported={"neuron": EXPERT_NEURONS}, **extra)
