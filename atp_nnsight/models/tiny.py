"""Tiny random-weight models of every supported family, for tests (no downloads).

All models share one offline word-level tokenizer (:func:`tiny_tokenizer`): the vocabulary is
``w0 .. w{V-3}`` plus ``<unk>`` and ``<eos>``; words are split on whitespace, no BOS token is
added and padding uses ``<eos>``. So ``"w1 w5 w7"`` is exactly three tokens with ids 1, 5, 7.

Sizes: hidden 32, 4 query heads (head_dim 8), MLP width 64, vocab 100, 64 positions.

:data:`TINY_FAMILIES` (the five the long parity suites run on):

* ``gpt2`` — learned positions, fused ``c_attn`` (Conv1D), tied embeddings.
* ``gpt_neox`` — parallel residual, rotary on 25 % of the head dims.
* ``llama`` — grouped-query attention: 4 query heads, 2 KV heads.
* ``mistral`` — GQA (2 KV heads) and ``sliding_window=4``.
* ``qwen2`` — GQA (2 KV heads) with biases on q/k/v.

:data:`MORE_TINY_FAMILIES` (each exercises its family's quirks; GQA with 2 KV heads unless
said otherwise):

* ``gemma2`` — sandwich norms (``1 + weight`` RMSNorm), attention logit softcap 3 (strongly
  non-linear at these sizes), ``query_pre_attn_scalar=16`` (scale 1/4, not ``head_dim**-0.5``),
  sliding window 4 on even layers; transformers' default attention for it is eager.
* ``gemma3_text`` — q/k norms per head, sandwich norms, sliding window 4 on layer 0 and global
  attention on layer 1 (different rotary bases), ``query_pre_attn_scalar=16``, **1 KV head**.
* ``gemma3`` — the multimodal ``Gemma3ForConditionalGeneration`` with the ``gemma3_text``
  language model above and a one-layer SigLIP vision tower (text-only use).
* ``qwen3`` — q/k norms per head.
* ``olmo2`` — q/k norms over all heads at once, post-norms only (no pre-norms).
* ``olmo3`` — as ``olmo2`` plus sliding window 4 on layer 0.
* ``phi3`` — fused ``qkv_proj`` and ``gate_up_proj``, rotary on half of the head dims.
* ``gptj`` — parallel attention + MLP, interleaved rotary on 4 of the 8 head dims, 4 KV heads.
* ``mixtral`` — 4 experts (width 32), top-2 routing.
* ``qwen2_moe`` — 4 routed experts (width 32, top-2) plus a gated shared expert, q/k/v biases.
* ``olmoe`` — 4 experts (top-2), q/k norms over all heads.

Weights are deterministic given ``seed`` and are re-initialised with a deliberately large
scale (linear weights ``N(0, 0.3²)``, embeddings ``N(0, 1)``, biases ``N(0, 0.1²)``, norms at
1/0) so attention is clearly non-uniform and patching effects are far from zero; with the
transformers default (std 0.02) every method trivially "agrees" because nothing matters.
In :data:`MORE_TINY_FAMILIES` norm weights are random too (scale ``1 + N(0, 0.2²)``, so a
reference that skips or misplaces a norm disagrees), and expert and router weights (plain
parameters, not ``nn.Linear``) get the linear scale. The global torch RNG state is left
untouched. ``use_cache`` is off in the configs (no KV cache is built during analysis traces).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from nnsight.modeling.transformers import TransformersModel
from transformers import PreTrainedTokenizerFast

TINY_FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2")
"""The first five families :func:`tiny_model` can build (the long parity suites run on these)."""

MORE_TINY_FAMILIES = (
    "gemma2",
    "gemma3_text",
    "gemma3",
    "qwen3",
    "olmo2",
    "olmo3",
    "phi3",
    "gptj",
    "mixtral",
    "qwen2_moe",
    "olmoe",
)
"""Further families :func:`tiny_model` can build (``config.model_type`` of each)."""

ALL_TINY_FAMILIES = TINY_FAMILIES + MORE_TINY_FAMILIES

VOCAB_SIZE = 100
HIDDEN = 32
N_HEADS = 4
N_KV_HEADS = 2
HEAD_DIM = HIDDEN // N_HEADS
INTERMEDIATE = 64
MAX_POSITIONS = 64
SLIDING_WINDOW = 4
N_EXPERTS = 4
EXPERT_WIDTH = 32

WEIGHT_STD = 0.3
EMBEDDING_STD = 1.0
BIAS_STD = 0.1
NORM_STD = 0.2


def tiny_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Offline word-level tokenizer: ``w0 .. w{V-3}``, ``<unk>`` = V-2, ``<eos>`` = V-1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    if vocab_size < 3:
        raise ValueError(f"vocab_size must be at least 3, got {vocab_size}")
    vocab = {f"w{i}": i for i in range(vocab_size - 2)}
    vocab["<unk>"] = vocab_size - 2
    vocab["<eos>"] = vocab_size - 1
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )


def _alternating(n_layers: int) -> list[str]:
    """Sliding-window attention on even layers, global attention on odd ones."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]


def _decoder_kwargs(family: str, n_layers: int) -> tuple[type, dict[str, Any]]:
    """Config class and size arguments of a tiny ``family`` model (Llama-style configs)."""
    gqa = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=n_layers,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
    )
    gemma = dict(
        gqa,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=16,
        sliding_window=SLIDING_WINDOW,
        tie_word_embeddings=True,
    )
    experts = dict(gqa, num_experts_per_tok=2)
    by_family: dict[str, tuple[type, dict[str, Any]]] = {
        "llama": (transformers.LlamaConfig, gqa),
        "mistral": (transformers.MistralConfig, dict(gqa, sliding_window=SLIDING_WINDOW)),
        "qwen2": (transformers.Qwen2Config, gqa),
        "gemma2": (
            transformers.Gemma2Config,
            dict(gemma, attn_logit_softcapping=3.0, layer_types=_alternating(n_layers)),
        ),
        "gemma3_text": (
            transformers.Gemma3TextConfig,
            dict(gemma, num_key_value_heads=1, layer_types=_alternating(n_layers)),
        ),
        "qwen3": (transformers.Qwen3Config, dict(gqa, head_dim=HEAD_DIM)),
        "olmo2": (transformers.Olmo2Config, gqa),
        "olmo3": (
            transformers.Olmo3Config,
            dict(gqa, sliding_window=SLIDING_WINDOW, layer_types=_alternating(n_layers)),
        ),
        "phi3": (
            transformers.Phi3Config,
            dict(
                gqa,
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "partial_rotary_factor": 0.5,
                },
            ),
        ),
        "mixtral": (
            transformers.MixtralConfig,
            dict(experts, num_local_experts=N_EXPERTS, intermediate_size=EXPERT_WIDTH),
        ),
        "qwen2_moe": (
            transformers.Qwen2MoeConfig,
            dict(
                experts,
                num_experts=N_EXPERTS,
                moe_intermediate_size=EXPERT_WIDTH,
                shared_expert_intermediate_size=EXPERT_WIDTH,
            ),
        ),
        "olmoe": (
            transformers.OlmoeConfig,
            dict(experts, num_experts=N_EXPERTS, intermediate_size=EXPERT_WIDTH),
        ),
    }
    return by_family[family]


def tiny_config(
    family: str, *, n_layers: int = 2, attn_implementation: str | None = None, **overrides: Any
) -> transformers.PretrainedConfig:
    """The transformers config of a tiny ``family`` model (``overrides`` win).

    ``attn_implementation=None`` leaves transformers' default for the family (sdpa, or eager
    for ``gemma2``, for which transformers refuses sdpa).
    """
    if family not in ALL_TINY_FAMILIES:
        raise ValueError(
            f"unknown tiny model family {family!r}; choose from {', '.join(ALL_TINY_FAMILIES)}"
        )
    eos = VOCAB_SIZE - 1
    common: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "use_cache": False,
    }
    if family == "gpt2":
        kwargs = dict(
            n_embd=HIDDEN,
            n_layer=n_layers,
            n_head=N_HEADS,
            n_inner=INTERMEDIATE,
            n_positions=MAX_POSITIONS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        cls = transformers.GPT2Config
    elif family == "gptj":
        kwargs = dict(
            n_embd=HIDDEN,
            n_layer=n_layers,
            n_head=N_HEADS,
            n_inner=INTERMEDIATE,
            n_positions=MAX_POSITIONS,
            rotary_dim=HEAD_DIM // 2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        cls = transformers.GPTJConfig
    elif family == "gpt_neox":
        kwargs = dict(
            hidden_size=HIDDEN,
            num_hidden_layers=n_layers,
            num_attention_heads=N_HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POSITIONS,
            use_parallel_residual=True,
            rotary_pct=0.25,
            attention_dropout=0.0,
            hidden_dropout=0.0,
        )
        cls = transformers.GPTNeoXConfig
    elif family == "gemma3":
        text = tiny_config("gemma3_text", n_layers=n_layers, attn_implementation=None)
        vision = dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        common = {}  # vocabulary and special tokens live in the text config, as in checkpoints
        kwargs = dict(
            text_config=text.to_dict(),
            vision_config=vision,
            mm_tokens_per_image=1,
            boi_token_index=VOCAB_SIZE - 5,
            eoi_token_index=VOCAB_SIZE - 4,
            image_token_index=VOCAB_SIZE - 3,
        )
        cls = transformers.Gemma3Config
    else:
        cls, kwargs = _decoder_kwargs(family, n_layers)
    kwargs = {**common, **kwargs, **overrides}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return cls(**kwargs)


def _reinitialise(model: torch.nn.Module, generator: torch.Generator, random_norms: bool) -> None:
    """Large-scale deterministic weights (see the module docstring).

    ``random_norms``: norm scales ``1 + N(0, NORM_STD²)`` (Gemma's norms scale by
    ``1 + weight``, so their weight is drawn around 0) instead of exactly 1; parameters held
    directly by other modules (MoE experts' 3-D weights, routers) are drawn like linear ones.
    """
    from transformers.pytorch_utils import Conv1D

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0.0, EMBEDDING_STD, generator=generator)
            elif isinstance(module, (torch.nn.Linear, Conv1D)):
                module.weight.normal_(0.0, WEIGHT_STD, generator=generator)
                if module.bias is not None:
                    module.bias.normal_(0.0, BIAS_STD, generator=generator)
            elif "norm" in type(module).__name__.lower():
                weight = getattr(module, "weight", None)
                bias = getattr(module, "bias", None)
                if isinstance(weight, torch.nn.Parameter):
                    centre = 0.0 if type(module).__name__.startswith("Gemma") else 1.0
                    if random_norms:
                        weight.normal_(centre, NORM_STD, generator=generator)
                    else:
                        weight.fill_(1.0)
                if isinstance(bias, torch.nn.Parameter):
                    bias.zero_()
            elif random_norms:
                for param in module.parameters(recurse=False):
                    param.normal_(0.0, WEIGHT_STD, generator=generator)


def tiny_hf_model(
    family: str,
    *,
    n_layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    **config_overrides: Any,
) -> transformers.PreTrainedModel:
    """The raw (unwrapped) HF causal LM of :func:`tiny_model`: same weights for the same seed.

    In eval mode with all parameters frozen (``requires_grad=False``).
    """
    config = tiny_config(
        family, n_layers=n_layers, attn_implementation=attn_implementation, **config_overrides
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    _reinitialise(model, generator, random_norms=family in MORE_TINY_FAMILIES)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    return model


def tiny_model(
    family: str,
    *,
    n_layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    **config_overrides: Any,
) -> TransformersModel:
    """A tiny random ``family`` model wrapped for nnsight, with the :func:`tiny_tokenizer`.

    ``family`` is one of :data:`ALL_TINY_FAMILIES`; ``config_overrides`` are passed to the
    transformers config (e.g. ``sliding_window=8``); ``attn_implementation=None`` keeps
    transformers' default for the family. Eval mode, parameters frozen.
    """
    hf = tiny_hf_model(
        family,
        n_layers=n_layers,
        seed=seed,
        dtype=dtype,
        attn_implementation=attn_implementation,
        **config_overrides,
    )
    vocab_size = hf.config.get_text_config().vocab_size
    return TransformersModel(hf, tokenizer=tiny_tokenizer(vocab_size))


__all__ = [
    "ALL_TINY_FAMILIES",
    "MORE_TINY_FAMILIES",
    "TINY_FAMILIES",
    "tiny_config",
    "tiny_hf_model",
    "tiny_model",
    "tiny_tokenizer",
]
