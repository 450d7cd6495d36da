"""Model loading and architecture adapters (one module per family)."""

from __future__ import annotations

from typing import Any

from atp_nnsight.models import gemma2, gemma3, gpt2, gpt_neox, gptj, llama, moe, olmo2, phi3, qwen3
from atp_nnsight.models.adapter import Adapter, AttentionCallNotFound

FAMILIES = {
    "gpt2": gpt2.make_adapter,
    "gpt_neox": gpt_neox.make_adapter,
    "gptj": gptj.make_adapter,
    "llama": llama.make_adapter,
    "mistral": llama.make_adapter,
    "qwen2": llama.make_adapter,
    "qwen3": qwen3.make_adapter,
    "gemma2": gemma2.make_adapter,
    "gemma3_text": gemma3.make_adapter,
    "gemma3": gemma3.make_multimodal_adapter,
    "olmo2": olmo2.make_adapter,
    "olmo3": olmo2.make_adapter,
    "phi3": phi3.make_adapter,
    "mixtral": moe.make_adapter,
    "qwen2_moe": moe.make_adapter,
    "olmoe": moe.make_adapter,
}
"""``config.model_type`` → adapter factory."""

FAMILY_NAMES = (
    "GPT-2, GPT-NeoX/Pythia, GPT-J, Llama/Mistral/Qwen2/SmolLM2, Qwen3, Gemma 2, Gemma 3, "
    "OLMo 2/3, Phi-3, Mixtral, Qwen2-MoE, OLMoE"
)
"""The supported families in words, for messages."""


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no adapter."""


def adapter_for_config(config: Any) -> Adapter:
    """The adapter for a transformers config; raises for unsupported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}; supported model types: "
            f"{', '.join(sorted(FAMILIES))} ({FAMILY_NAMES})"
        )
    return FAMILIES[model_type](config)


def describe_model(module: Any) -> str:
    """Model class and library versions, for messages about version-dependent code paths."""
    import nnsight
    import transformers

    return (
        f"{type(module).__name__} (transformers {transformers.__version__}, "
        f"nnsight {nnsight.__version__})"
    )


def get_adapter(model: Any) -> Adapter:
    """The adapter of an nnsight-wrapped transformers model (cached on the wrapper)."""
    cached = getattr(model, "_atp_adapter", None)
    if cached is None:
        module = getattr(model, "_module", None)
        if module is None or not hasattr(module, "config"):
            raise TypeError(
                f"expected an nnsight-wrapped transformers model (from load_model or "
                f"nnsight.LanguageModel), got {type(model).__name__}"
            )
        cached = adapter_for_config(module.config)
        cached.where = describe_model(module)
        object.__setattr__(model, "_atp_adapter", cached)
    return cached


__all__ = [
    "Adapter",
    "AttentionCallNotFound",
    "FAMILIES",
    "UnsupportedArchitectureError",
    "adapter_for_config",
    "get_adapter",
]
