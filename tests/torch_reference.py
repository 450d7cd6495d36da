"""An independent plain-PyTorch reference for exact patching, AtP and GradDrop (no nnsight).

Everything here runs the raw transformers model with torch hooks, one patch per forward pass:
slow, but simple enough to be obviously correct. Nothing from ``atp_nnsight`` is used except
for building the tiny models (via the tests). Site definitions (the spec the library must match):

=========  ====================================================  ===========================
kind       tensor                                                 viewed as [B, T, unit, feat]
=========  ====================================================  ===========================
resid L    hidden_states input of decoder layer L                 unit = 1
q/k/v L    query/key/value as passed to the attention function    heads (k, v: KV heads)
           ([B, heads, T, D], post-norm, post-rotary, before
           repeat_kv)
head L     input of the attention output projection               query heads × head_dim
attn_out   what the attention adds to the residual stream         unit = 1
           (after the post-norm, if the family has one)
neuron L   input of the MLP down projection                       neurons × 1
mlp_out    what the MLP adds to the residual stream               unit = 1
=========  ====================================================  ===========================

Two ways of instrumenting a model:

* **hooked** (``gpt2``, ``gpt_neox``, ``llama``, ``mistral``, ``qwen2``): module hooks, and q/k/v
  intercepted by registering a custom attention function (``ATTN_NAME``, which calls
  transformers' own sdpa implementation, with the sdpa mask function) and switching the model
  to it for the duration of each run;
* **written out** (every family in :data:`WRITTEN`): each decoder layer's forward is replaced
  for the duration of a run by a plain-PyTorch implementation written here from the family's
  definition — RMSNorm (including Gemma's ``1 + weight``) and LayerNorm, q/k norms per head or
  over all heads, rotary (half-split, partial, or GPT-J's interleaved), attention with the
  family's scale, logit softcap, causal and sliding-window mask (built here from the config),
  sandwich/post/pre/parallel blocks, gated/fused/plain/mixture-of-experts MLPs — reading only
  the layer's parameters and the rotary cos/sin the model passes to the layer. No transformers
  attention, norm or activation function is called. ``test_families.py`` checks that it
  reproduces the model's logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

ATTN_NAME = "atp_torch_reference"
EAGER_NAME = "atp_torch_reference_eager"

# A site callback: (kind, layer, raw tensor) -> replacement tensor or None (keep).
SiteFn = Callable[[str, int, torch.Tensor], "torch.Tensor | None"]

_ACTIVE: list[SiteFn] = []


def _reference_attention(module, query, key, value, attention_mask, *args, **kwargs):
    fn = _ACTIVE[-1] if _ACTIVE else None
    if fn is not None:
        layer = module.layer_idx
        query = _apply(fn, "q", layer, query)
        key = _apply(fn, "k", layer, key)
        value = _apply(fn, "v", layer, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def _reference_eager_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """Attention written out (probabilities materialised, reported as site ``pattern``
    ``[B, heads, T, T]``); uses the model's own additive mask and scaling."""
    fn = _ACTIVE[-1] if _ACTIVE else (lambda kind, layer, x: None)
    layer = module.layer_idx
    query = _apply(fn, "q", layer, query)
    key = _apply(fn, "k", layer, key)
    value = _apply(fn, "v", layer, value)
    assert attention_mask is not None and not kwargs.get("softcap")
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scores = scaling * (query @ key.transpose(-1, -2)) + attention_mask[..., : key.shape[-2]]
    probs = _apply(fn, "pattern", layer, torch.softmax(scores, dim=-1))
    return (probs @ value).transpose(1, 2).contiguous(), probs


AttentionInterface.register(ATTN_NAME, _reference_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
AttentionInterface.register(EAGER_NAME, _reference_eager_attention)
AttentionMaskInterface.register(EAGER_NAME, eager_mask)


def _apply(fn: SiteFn, kind: str, layer: int, x: torch.Tensor) -> torch.Tensor:
    out = fn(kind, layer, x)
    return x if out is None else out


# --------------------------------------------------------------------------------------------
# module paths (hard-coded per family: independent of the library's adapters)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Paths:
    layers: str
    attn: str
    out_proj: str
    mlp: str
    down_proj: str


PATHS = {
    "gpt2": Paths("transformer.h", "attn", "c_proj", "mlp", "c_proj"),
    "gpt_neox": Paths("gpt_neox.layers", "attention", "dense", "mlp", "dense_4h_to_h"),
    "llama": Paths("model.layers", "self_attn", "o_proj", "mlp", "down_proj"),
    "mistral": Paths("model.layers", "self_attn", "o_proj", "mlp", "down_proj"),
    "qwen2": Paths("model.layers", "self_attn", "o_proj", "mlp", "down_proj"),
}
"""Hooked families."""


@dataclass(frozen=True)
class Written:
    """How a written-out family computes a decoder layer.

    ``block``: ``pre`` (``x + attn(n1(x))``, then ``+ mlp(n2(·))``), ``sandwich`` (pre- and
    post-norms around both), ``post`` (post-norms only) or ``parallel`` (``x + attn(ln(x)) +
    mlp(ln(x))``); ``qk_norm``: None, ``head`` (RMSNorm over head_dim) or ``all`` (over all heads
    of the projection, before the split); ``rotary``: ``half`` (rotate-half on the first
    ``cos.shape[-1]`` dims) or ``interleaved`` (GPT-J: pairs of adjacent dims); ``mlp``:
    ``gated``, ``gate_up`` (fused), ``fc`` (GPT-J) or ``moe``; ``gemma``: RMSNorm scales by
    ``1 + weight`` and the softmax scale is ``query_pre_attn_scalar ** -0.5``; ``softcap``:
    attention logits are ``cap · tanh(logits / cap)`` with ``config.attn_logit_softcapping``.
    """

    layers: str
    block: str
    mlp: str
    qk_norm: str | None = None
    rotary: str = "half"
    gemma: bool = False
    softcap: bool = False


WRITTEN = {
    "gemma2": Written("model.layers", "sandwich", "gated", gemma=True, softcap=True),
    "gemma3_text": Written("model.layers", "sandwich", "gated", "head", gemma=True),
    "gemma3": Written("model.language_model.layers", "sandwich", "gated", "head", gemma=True),
    "qwen3": Written("model.layers", "pre", "gated", "head"),
    "olmo2": Written("model.layers", "post", "gated", "all"),
    "olmo3": Written("model.layers", "post", "gated", "all"),
    "phi3": Written("model.layers", "pre", "gate_up"),
    "gptj": Written("transformer.h", "parallel", "fc", rotary="interleaved"),
    "mixtral": Written("model.layers", "pre", "moe"),
    "qwen2_moe": Written("model.layers", "pre", "moe"),
    "olmoe": Written("model.layers", "pre", "moe", "all"),
}
"""Written-out families (``config.model_type`` → layer description)."""


def _get(module: torch.nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def decoder_layers(hf: torch.nn.Module) -> Any:
    family = hf.config.model_type
    return _get(hf, WRITTEN[family].layers if family in WRITTEN else PATHS[family].layers)


def n_layers(hf: torch.nn.Module) -> int:
    return len(decoder_layers(hf))


def sizes(hf: torch.nn.Module) -> dict[str, int]:
    """Units per kind for ``hf`` (read from the config); no ``neuron`` for MoE models."""
    c = hf.config.get_text_config()
    if c.model_type in ("gpt2", "gptj"):
        heads, kv, mlp = c.n_head, c.n_head, c.n_inner or 4 * c.n_embd
    else:
        heads = c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        mlp = c.intermediate_size
    out = {
        "resid": 1,
        "q": heads,
        "k": kv,
        "v": kv,
        "head": heads,
        "attn_out": 1,
        "neuron": mlp,
        "mlp_out": 1,
    }
    if hf.config.model_type in WRITTEN and WRITTEN[hf.config.model_type].mlp == "moe":
        del out["neuron"]
    return out


def units(hf: torch.nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    """A view of raw site tensor ``x`` as ``[B, T, unit, feature]``."""
    if kind in ("q", "k", "v"):
        return x.transpose(1, 2)
    if kind == "head":
        return x.unflatten(-1, (sizes(hf)["head"], -1))
    if kind == "neuron":
        return x.unsqueeze(-1)
    return x.unsqueeze(-2)


# --------------------------------------------------------------------------------------------
# written-out decoder layers
# --------------------------------------------------------------------------------------------
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _replaced(module: torch.nn.Module) -> bool:
    """A norm a test replaced by its own module (e.g. ``Identity``): called as it is."""
    return not type(module).__module__.startswith("transformers.")


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """RMSNorm over the last dim, in float32; Gemma scales by ``1 + weight``."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    scale = 1.0 + weight.float() if gemma else weight.float()
    return (normed * scale).to(x.dtype)


def _linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight, module.bias)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kind: str) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``[B, H, T, D]`` on its first rotary dims."""
    if kind == "half":  # cos, sin: [B, T, rot]; dims (i, i + rot/2) rotate together
        rot = cos.shape[-1]
        xr, rest = x[..., :rot], x[..., rot:]
        half = rot // 2
        rotated = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
        return torch.cat((xr * cos[:, None] + rotated * sin[:, None], rest), dim=-1)
    # interleaved (GPT-J): (sin, cos) are [B, T, rot/2]; dims (2i, 2i+1) rotate together
    rot = 2 * cos.shape[-1]
    xr, rest = x[..., :rot], x[..., rot:]
    c = cos.repeat_interleave(2, dim=-1)[:, None]
    s = sin.repeat_interleave(2, dim=-1)[:, None]
    rotated = torch.stack((-xr[..., 1::2], xr[..., ::2]), dim=-1).flatten(-2)
    return torch.cat((xr * c + rotated * s, rest), dim=-1)


def _window(config: Any, layer: int) -> int | None:
    """The sliding window of ``layer`` (None: global attention)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return config.sliding_window if types[layer] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


def _attention(block, config, spec: Written, layer: int, x, position_embeddings, fn: SiteFn):
    """The attention output of one written-out layer (before any post-norm)."""
    attn = block.attn if spec.block == "parallel" else block.self_attn
    b, t, _ = x.shape
    if spec.block == "parallel":
        n_heads, n_kv = config.n_head, config.n_head
    else:
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    d = attn.head_dim
    if hasattr(attn, "qkv_proj"):  # fused: queries, keys, values along the output
        q, k, v = _linear(attn.qkv_proj, x).split([n_heads * d, n_kv * d, n_kv * d], dim=-1)
    else:
        q, k, v = _linear(attn.q_proj, x), _linear(attn.k_proj, x), _linear(attn.v_proj, x)
    eps = getattr(config, "rms_norm_eps", None)
    if spec.qk_norm == "all":
        q, k = _rms(q, attn.q_norm.weight, eps, False), _rms(k, attn.k_norm.weight, eps, False)
    clip = getattr(config, "clip_qkv", None)
    if clip is not None:
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    q = q.view(b, t, n_heads, d).transpose(1, 2)
    k = k.view(b, t, n_kv, d).transpose(1, 2)
    v = v.view(b, t, n_kv, d).transpose(1, 2)
    if spec.qk_norm == "head":
        q = _rms(q, attn.q_norm.weight, eps, spec.gemma)
        k = _rms(k, attn.k_norm.weight, eps, spec.gemma)
    if spec.rotary == "half":
        cos, sin = position_embeddings
    else:
        sin, cos = position_embeddings
    q, k = _rotate(q, cos, sin, spec.rotary), _rotate(k, cos, sin, spec.rotary)
    q, k, v = _apply(fn, "q", layer, q), _apply(fn, "k", layer, k), _apply(fn, "v", layer, v)
    scale = config.query_pre_attn_scalar**-0.5 if spec.gemma else d**-0.5
    group = n_heads // n_kv
    scores = scale * (q.float() @ k.float().repeat_interleave(group, dim=1).transpose(-1, -2))
    if spec.softcap:
        cap = config.attn_logit_softcapping
        scores = cap * torch.tanh(scores / cap)
    pos = torch.arange(t)
    visible = pos[:, None] >= pos[None, :]
    window = _window(config, layer)
    if window is not None:
        visible &= pos[:, None] - pos[None, :] < window
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = _apply(fn, "pattern", layer, torch.softmax(scores, dim=-1).to(v.dtype))
    z = (probs @ v.repeat_interleave(group, dim=1)).transpose(1, 2).reshape(b, t, n_heads * d)
    z = _apply(fn, "head", layer, z)
    return _linear(attn.out_proj if spec.block == "parallel" else attn.o_proj, z)


def _gated(mlp, x: torch.Tensor, act) -> torch.Tensor:
    """The down-projection input ``act(gate(x)) * up(x)`` of a gated MLP."""
    return act(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x)


def _moe(mlp, config, x: torch.Tensor, act) -> torch.Tensor:
    """Top-k routed experts (dense: every expert on every token, weight 0 unless routed),
    plus Qwen2-MoE's sigmoid-gated shared expert."""
    flat = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(F.linear(flat, mlp.gate.weight).float(), dim=-1)
    top, chosen = probs.topk(config.num_experts_per_tok, dim=-1)
    if config.model_type == "mixtral" or config.norm_topk_prob:
        top = top / top.sum(-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter(1, chosen, top).to(x.dtype)  # [N, E]
    experts = mlp.experts
    width = experts.down_proj.shape[-1]
    out = torch.zeros_like(flat)
    for e in range(weights.shape[1]):
        gate_up = F.linear(flat, experts.gate_up_proj[e])
        h = act(gate_up[:, :width]) * gate_up[:, width:]
        out = out + weights[:, e : e + 1] * F.linear(h, experts.down_proj[e])
    if hasattr(mlp, "shared_expert"):
        gate = torch.sigmoid(F.linear(flat, mlp.shared_expert_gate.weight))
        shared = mlp.shared_expert
        out = out + gate * _linear(shared.down_proj, _gated(shared, flat, act))
    return out.reshape(x.shape)


def _mlp(block, config, spec: Written, layer: int, x, fn: SiteFn) -> torch.Tensor:
    """The MLP of one written-out layer (before any post-norm)."""
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    act = ACTIVATIONS[name or config.activation_function]
    mlp = block.mlp
    if spec.mlp == "moe":
        return _moe(mlp, config, x, act)
    if spec.mlp == "gated":
        return _linear(mlp.down_proj, _apply(fn, "neuron", layer, _gated(mlp, x, act)))
    if spec.mlp == "gate_up":
        gate, up = _linear(mlp.gate_up_proj, x).chunk(2, dim=-1)
        return _linear(mlp.down_proj, _apply(fn, "neuron", layer, up * act(gate)))
    h = _apply(fn, "neuron", layer, act(_linear(mlp.fc_in, x)))  # fc (GPT-J)
    return _linear(mlp.fc_out, h)


def _written_layer(hf: torch.nn.Module, block: torch.nn.Module, layer: int, fn: SiteFn):
    """A replacement ``forward`` for decoder layer ``layer`` (see :class:`Written`)."""
    config = hf.config.get_text_config()
    spec = WRITTEN[hf.config.model_type]
    eps = getattr(config, "rms_norm_eps", None)

    def norm(name: str, x: torch.Tensor) -> torch.Tensor:
        module = getattr(block, name)
        if _replaced(module):
            return module(x)
        if isinstance(module, torch.nn.LayerNorm):
            return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
        return _rms(x, module.weight, eps, spec.gemma)

    def forward(hidden_states, *args, position_embeddings=None, **kwargs):
        x = hidden_states
        if spec.block == "parallel":
            h = norm("ln_1", x)
            a = _attention(block, config, spec, layer, h, position_embeddings, fn)
            a = _apply(fn, "attn_out", layer, a)
            m = _apply(fn, "mlp_out", layer, _mlp(block, config, spec, layer, h, fn))
            return x + a + m
        attn_in = x if spec.block == "post" else norm("input_layernorm", x)
        a = _attention(block, config, spec, layer, attn_in, position_embeddings, fn)
        if spec.block in ("sandwich", "post"):
            a = norm("post_attention_layernorm", a)
        x = x + _apply(fn, "attn_out", layer, a)
        if spec.block == "pre":
            m = _mlp(block, config, spec, layer, norm("post_attention_layernorm", x), fn)
        elif spec.block == "sandwich":
            m = _mlp(block, config, spec, layer, norm("pre_feedforward_layernorm", x), fn)
        else:
            m = _mlp(block, config, spec, layer, x, fn)
        if spec.block in ("sandwich", "post"):
            m = norm("post_feedforward_layernorm", m)
        return x + _apply(fn, "mlp_out", layer, m)

    return forward


# --------------------------------------------------------------------------------------------
# one instrumented forward pass
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _instrumented(
    hf: torch.nn.Module, fn: SiteFn | None, drop_layer: int | None, grad: bool, eager: bool
) -> Iterator[None]:
    written = hf.config.model_type in WRITTEN
    handles = []
    fn = fn or (lambda kind, layer, x: None)

    def resid_hook(layer):
        def hook(module, args, kwargs):
            if args:
                new = _apply(fn, "resid", layer, args[0])
                return (new, *args[1:]), kwargs
            new = _apply(fn, "resid", layer, kwargs["hidden_states"])
            return args, {**kwargs, "hidden_states": new}

        return hook

    def input_hook(kind, layer):
        def hook(module, args):
            return (_apply(fn, kind, layer, args[0]), *args[1:])

        return hook

    def attn_out_hook(layer):
        def hook(module, args, output):
            return (_apply(fn, "attn_out", layer, output[0]), *output[1:])

        return hook

    def mlp_out_hook(layer):
        def hook(module, args, output):
            return _apply(fn, "mlp_out", layer, output)

        return hook

    def drop_hook(module, args, kwargs, output):
        inp = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        new = inp + (out - inp).detach()  # same value; gradient only through the skip
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def grad_hook(module, args, output):
        return output.detach().requires_grad_(True)

    blocks = list(decoder_layers(hf))
    own_forwards = [block.__dict__.get("forward") for block in blocks]  # e.g. nnsight's
    for layer, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(resid_hook(layer), with_kwargs=True))
        if layer == drop_layer:
            handles.append(block.register_forward_hook(drop_hook, with_kwargs=True))
        if written:
            block.forward = _written_layer(hf, block, layer, fn)
            continue
        paths = PATHS[hf.config.model_type]
        attn, mlp = getattr(block, paths.attn), getattr(block, paths.mlp)
        handles.append(
            getattr(attn, paths.out_proj).register_forward_pre_hook(input_hook("head", layer))
        )
        handles.append(attn.register_forward_hook(attn_out_hook(layer)))
        handles.append(
            getattr(mlp, paths.down_proj).register_forward_pre_hook(input_hook("neuron", layer))
        )
        handles.append(mlp.register_forward_hook(mlp_out_hook(layer)))
    if grad:
        handles.append(hf.get_input_embeddings().register_forward_hook(grad_hook))
    previous = hf.config._attn_implementation
    if not written:
        hf.set_attn_implementation(EAGER_NAME if eager else ATTN_NAME)
    _ACTIVE.append(fn)
    try:
        yield
    finally:
        _ACTIVE.pop()
        if not written:
            hf.set_attn_implementation(previous)
        for block, forward in zip(blocks, own_forwards, strict=True):
            if written and forward is None:
                del block.forward
            elif written:
                block.forward = forward
        for h in handles:
            h.remove()


def run(
    hf: torch.nn.Module,
    ids: torch.Tensor,
    fn: SiteFn | None = None,
    *,
    drop_layer: int | None = None,
    grad: bool = False,
    eager: bool = False,
) -> torch.Tensor:
    """Logits ``[1, T, vocab]`` of one prompt (1-D ids) with site callback ``fn``.

    ``eager=True`` runs the written-out attention, which also reports ``pattern`` sites
    (written-out families always do)."""
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx, _instrumented(hf, fn, drop_layer, grad, eager):
        return hf(input_ids=ids[None], use_cache=False).logits


def metric_logit_diff(logits: torch.Tensor, ct: int, nt: int) -> torch.Tensor:
    """``logit[ct] - logit[nt]`` at the last position (float32 scalar)."""
    last = logits[0, -1].float()
    return last[ct] - last[nt]


def _roles(clean_ids, noise_ids, direction):
    if direction == "noising":
        return clean_ids, noise_ids
    if direction == "denoising":
        return noise_ids, clean_ids
    raise ValueError(direction)


def cache_sites(hf: torch.nn.Module, ids: torch.Tensor, sites: set) -> dict:
    """Detached clones of the raw tensors at ``sites`` ({(kind, layer)}) for prompt ``ids``."""
    cache = {}

    def record(kind, layer, x):
        if (kind, layer) in sites:
            cache[(kind, layer)] = x.detach().clone()

    run(hf, ids, record)
    return cache


# --------------------------------------------------------------------------------------------
# exact patching
# --------------------------------------------------------------------------------------------
def exact_effects(
    hf: torch.nn.Module,
    clean_ids: torch.Tensor,
    noise_ids: torch.Tensor,
    ct: int,
    nt: int,
    node_sets: Sequence[Sequence[Any]],
    direction: str = "noising",
) -> list[float]:
    """``metric(base with each set patched from source) - metric(base)``, one forward per set.

    Nodes are anything with ``kind, layer, index, position`` (position ``None`` = all).
    """
    base_ids, source_ids = _roles(clean_ids, noise_ids, direction)
    sites = {(n.kind, n.layer) for s in node_sets for n in s}
    source = cache_sites(hf, source_ids, sites)
    m_base = metric_logit_diff(run(hf, base_ids), ct, nt)
    out = []
    for node_set in node_sets:

        def write(kind, layer, x, node_set=node_set):
            here = [n for n in node_set if (n.kind, n.layer) == (kind, layer)]
            if not here:
                return None
            x = x.clone()
            view, src = units(hf, kind, x), units(hf, kind, source[(kind, layer)])
            for n in here:
                pos = slice(None) if n.position is None else n.position
                view[0, pos, n.index] = src[0, pos, n.index]
            return x

        m_patched = metric_logit_diff(run(hf, base_ids, write), ct, nt)
        out.append(float(m_patched) - float(m_base))
    return out


def exact_effect(hf, clean_ids, noise_ids, ct, nt, node_set, direction="noising") -> float:
    """The exact effect of patching ``node_set`` as a whole on one pair."""
    return exact_effects(hf, clean_ids, noise_ids, ct, nt, [node_set], direction)[0]


# --------------------------------------------------------------------------------------------
# AtP and GradDrop
# --------------------------------------------------------------------------------------------
def atp_estimate(
    hf: torch.nn.Module,
    clean_ids: torch.Tensor,
    noise_ids: torch.Tensor,
    ct: int,
    nt: int,
    nodes: Sequence[Any],
    direction: str = "noising",
    drop_layer: int | None = None,
) -> torch.Tensor:
    """Per node ``(source - base) · ∂M/∂site |base`` summed over features (and positions if the
    node's position is ``None``): float64 ``[len(nodes)]``. ``drop_layer`` removes the gradient
    through that layer's residual write."""
    base_ids, source_ids = _roles(clean_ids, noise_ids, direction)
    sites = {(n.kind, n.layer) for n in nodes}
    source = cache_sites(hf, source_ids, sites)
    base = {}

    def record(kind, layer, x):
        if (kind, layer) in sites:
            base[(kind, layer)] = x

    logits = run(hf, base_ids, record, drop_layer=drop_layer, grad=True)
    m = metric_logit_diff(logits, ct, nt)
    keys = list(base)
    grads = torch.autograd.grad(m, [base[k] for k in keys], allow_unused=True)
    per_site = {}  # (kind, layer) -> [T, units] float64
    for key, g in zip(keys, grads, strict=True):
        kind = key[0]
        b = base[key].detach()
        g = torch.zeros_like(b) if g is None else g
        delta = units(hf, kind, source[key]).double() - units(hf, kind, b).double()
        per_site[key] = (delta * units(hf, kind, g).double()).sum(-1)[0]
    out = []
    for n in nodes:
        col = per_site[(n.kind, n.layer)][:, n.index]
        out.append(col.sum() if n.position is None else col[n.position])
    return torch.stack(out)


def graddrop_terms(hf, clean_ids, noise_ids, ct, nt, nodes, direction="noising") -> torch.Tensor:
    """``Î_ℓ`` for every layer ℓ: ``[L, len(nodes)]`` (one forward + backward per layer)."""
    return torch.stack(
        [
            atp_estimate(hf, clean_ids, noise_ids, ct, nt, nodes, direction, drop_layer=layer)
            for layer in range(n_layers(hf))
        ]
    )


def graddrop_score(terms: torch.Tensor, nodes: Sequence[Any]) -> torch.Tensor:
    """``Σ_ℓ |Î_ℓ| / (L - 1)`` per node, ``/ L`` for ``resid`` nodes."""
    n = terms.shape[0]
    denom = torch.tensor(
        [n if node.kind == "resid" else n - 1 for node in nodes], dtype=terms.dtype
    )
    return terms.abs().sum(0) / denom


def qk_fix_estimates(
    hf: torch.nn.Module,
    clean_ids: torch.Tensor,
    noise_ids: torch.Tensor,
    ct: int,
    nt: int,
    nodes: Sequence[Any],
    direction: str = "noising",
    drop_layers: Sequence[int | None] = (None,),
) -> torch.Tensor:
    """QK-fixed estimates of ``q``/``k`` nodes: ``Σ (A' - A) ⊙ ∂M/∂A`` at the node's layer,
    where ``A'`` is the attention pattern of a base run with the node patched from the source
    (one forward per node) and ``∂M/∂A`` the gradient on the base run, once per entry of
    ``drop_layers`` (``None``: no GradDrop). Returns float64 ``[len(drop_layers), len(nodes)]``.
    """
    assert all(n.kind in ("q", "k") for n in nodes)
    base_ids, source_ids = _roles(clean_ids, noise_ids, direction)
    layers = {n.layer for n in nodes}
    source = cache_sites(hf, source_ids, {(k, layer) for k in ("q", "k") for layer in layers})
    base, grads = {}, []
    for drop in drop_layers:
        patterns = {}

        def record(kind, layer, x, patterns=patterns):
            if kind == "pattern" and layer in layers:
                patterns[layer] = x

        logits = run(hf, base_ids, record, drop_layer=drop, grad=True, eager=True)
        keys = sorted(patterns)
        g = torch.autograd.grad(
            metric_logit_diff(logits, ct, nt), [patterns[k] for k in keys], allow_unused=True
        )
        grads.append(
            {
                k: torch.zeros_like(patterns[k], dtype=torch.float64) if gk is None else gk.double()
                for k, gk in zip(keys, g, strict=True)
            }
        )
        if drop is None or not base:
            base = {k: v.detach().double() for k, v in patterns.items()}
    out = torch.zeros(len(drop_layers), len(nodes), dtype=torch.float64)
    for j, n in enumerate(nodes):
        patched = {}

        def write(kind, layer, x, n=n, patched=patched):
            if kind == "pattern" and layer == n.layer:
                patched["A"] = x.double()
            if (kind, layer) != (n.kind, n.layer):
                return None
            x = x.clone()
            pos = slice(None) if n.position is None else n.position
            units(hf, kind, x)[0, pos, n.index] = units(hf, kind, source[(kind, layer)])[
                0, pos, n.index
            ]
            return x

        run(hf, base_ids, write, eager=True)
        for d, g in enumerate(grads):
            out[d, j] = ((patched["A"] - base[n.layer]) * g[n.layer]).sum()
    return out


# --------------------------------------------------------------------------------------------
# prompt pairs for the tiny word-level tokenizer ("wN" is token id N)
# --------------------------------------------------------------------------------------------
def word_pairs(seed: int, lengths: Sequence[int], n_words: int = 90) -> list[tuple[str, ...]]:
    """Random ``(clean, noise, clean_target, noise_target)`` pairs of words ``w0..w{n-1}``;
    the prompts of a pair differ and the two targets differ."""
    import random

    rng = random.Random(seed)
    out = []
    for length in lengths:
        clean = [rng.randrange(n_words) for _ in range(length)]
        noise = [rng.randrange(n_words) for _ in range(length)]
        while noise == clean:
            noise = [rng.randrange(n_words) for _ in range(length)]
        ct, nt = rng.sample(range(n_words), 2)
        words = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
        out.append((words(clean), words(noise), f"w{ct}", f"w{nt}"))
    return out


def pair_ids(pair: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(clean_ids, noise_ids, clean_target, noise_target)`` of a word pair (no tokenizer)."""
    clean, noise, ct, nt = pair
    ids = lambda text: torch.tensor([int(w[1:]) for w in text.split()])  # noqa: E731
    return ids(clean), ids(noise), int(ct[1:]), int(nt[1:])
