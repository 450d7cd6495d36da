"""Tiny random-weight models of every supported family, for tests (no downloads).

All models share one offline word-level tokenizer (:func:`tiny_tokenizer`): the vocabulary is
``w0 .. w{V-3}`` plus ``<unk>`` and ``<eos>``; words are split on whitespace, no BOS token is
added and padding uses ``<eos>``. So ``"w1 w5 w7"`` is exactly three tokens with ids 1, 5, 7.

Sizes: hidden 32, 4 query heads (head_dim 8), MLP width 64, vocab 100, 64 positions.

* ``gpt2`` — learned positions, fused ``c_attn`` (Conv1D), tied embeddings.
* ``gpt_neox`` — parallel residual, rotary on 25 % of the head dims.
* ``llama`` — grouped-query attention: 4 query heads, 2 KV heads.
* ``mistral`` — GQA (2 KV heads) and ``sliding_window=4``.
* ``qwen2`` — GQA (2 KV heads) with biases on q/k/v.

Weights are deterministic given ``seed`` and are re-initialised with a deliberately large
scale (linear weights ``N(0, 0.3²)``, embeddings ``N(0, 1)``, biases ``N(0, 0.1²)``, norms at
1/0) so attention is clearly non-uniform and patching effects are far from zero; with the
transformers default (std 0.02) every method trivially "agrees" because nothing matters.
The global torch RNG state is left untouched. ``use_cache`` is off in the configs (no KV cache
is built during analysis traces).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from nnsight.modeling.transformers import TransformersModel
from transformers import PreTrainedTokenizerFast

TINY_FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2")
"""Families :func:`tiny_model` can build (the ``model_type`` of the config)."""

VOCAB_SIZE = 100
HIDDEN = 32
N_HEADS = 4
N_KV_HEADS = 2
INTERMEDIATE = 64
MAX_POSITIONS = 64

WEIGHT_STD = 0.3
EMBEDDING_STD = 1.0
BIAS_STD = 0.1


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


def tiny_config(
    family: str, *, n_layers: int = 2, attn_implementation: str = "sdpa", **overrides: Any
) -> transformers.PretrainedConfig:
    """The transformers config of a tiny ``family`` model (``overrides`` win)."""
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
    elif family in ("llama", "mistral", "qwen2"):
        kwargs = dict(
            hidden_size=HIDDEN,
            num_hidden_layers=n_layers,
            num_attention_heads=N_HEADS,
            num_key_value_heads=N_KV_HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=False,
        )
        if family == "llama":
            cls = transformers.LlamaConfig
        elif family == "mistral":
            cls = transformers.MistralConfig
            kwargs["sliding_window"] = 4
        else:
            cls = transformers.Qwen2Config
    else:
        raise ValueError(
            f"unknown tiny model family {family!r}; choose from {', '.join(TINY_FAMILIES)}"
        )
    kwargs = {**common, **kwargs, "attn_implementation": attn_implementation, **overrides}
    return cls(**kwargs)


def _reinitialise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Large-scale deterministic weights (see the module docstring)."""
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
                    weight.fill_(1.0)
                if isinstance(bias, torch.nn.Parameter):
                    bias.zero_()


def tiny_hf_model(
    family: str,
    *,
    n_layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
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
    _reinitialise(model, generator)
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
    attn_implementation: str = "sdpa",
    **config_overrides: Any,
) -> TransformersModel:
    """A tiny random ``family`` model wrapped for nnsight, with the :func:`tiny_tokenizer`.

    ``family`` is one of :data:`TINY_FAMILIES`; ``config_overrides`` are passed to the
    transformers config (e.g. ``sliding_window=8``). Eval mode, parameters frozen.
    """
    hf = tiny_hf_model(
        family,
        n_layers=n_layers,
        seed=seed,
        dtype=dtype,
        attn_implementation=attn_implementation,
        **config_overrides,
    )
    return TransformersModel(hf, tokenizer=tiny_tokenizer(hf.config.vocab_size))


__all__ = [
    "TINY_FAMILIES",
    "tiny_config",
    "tiny_hf_model",
    "tiny_model",
    "tiny_tokenizer",
]
