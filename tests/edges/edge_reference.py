"""An independent plain-PyTorch reference of EAP and EAP-IG (no nnsight, no atp_nnsight).

Every decoder layer's ``forward`` of a raw transformers model is replaced, for one run, by a
layer written here in which **every downstream input has its own copy of the residual
stream**: the q input of each query head, the k and v inputs of each KV head, the MLP input
and (after the last layer) the logits each read ``x + ε_v`` with a zero tensor ``ε_v`` that
requires grad, and each reads it through its own call of the norm and the projection, keeping
only its head's slice. One backward then gives every ``∂M/∂x_v`` (the gradient at v's own
copy) at once. Each attention head's write is computed from the output projection's weight
slice (``W_O[:, h] z_h``), each MLP's write is its output, and the embedding write is the
layer-0 input. Edges, per pair, summed over positions and features::

    EAP(u -> v)    = Δu · ∂M/∂x_v                      Δu = u(noise) - u(clean)
    EAP-IG(u -> v) = Δu · (1/m) Σ_{k=1..m} ∂M/∂x_v at layer-0 input
                     noise_emb + (k/m)(clean_emb - noise_emb)

An edge exists when u's write comes before v's read: MLP inputs read their own layer's heads
in sequential blocks, not in parallel ones (GPT-NeoX, GPT-J). q/k/v come from
``torch_reference``'s written-out attention (or the GPT-2 / GPT-NeoX functions here); the
attention softmax, GQA grouping and sliding windows are written here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch_reference as ref  # noqa: E402

PRE_GATED = ref.Written("model.layers", "pre", "gated")
SPECS = {
    "llama": PRE_GATED,
    "mistral": PRE_GATED,
    "qwen2": PRE_GATED,
    **{k: v for k, v in ref.WRITTEN.items() if v.block in ("pre", "parallel")},
}
"""Families whose q/k/v come from ``torch_reference._attention`` (plus gpt2 and gpt_neox)."""

PARALLEL = ("gpt_neox", "gptj")
NORMS = {"gpt2": ("ln_1", "ln_2"), "gptj": ("ln_1", "ln_1")}
"""Attention / MLP input norms (default: input_layernorm, post_attention_layernorm)."""


def _sizes(config: Any) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim)."""
    if config.model_type in ("gpt2", "gptj"):
        return config.n_head, config.n_head, config.n_embd // config.n_head
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv, getattr(config, "head_dim", None) or config.hidden_size // heads


def _qkv(block, config, layer: int, n: torch.Tensor, pe) -> tuple[torch.Tensor, ...]:
    """Post-rotary q, k, v ``[B, heads, T, D]`` computed from the normed input ``n``."""
    family = config.model_type
    n_q, n_kv, d = _sizes(config)
    b, t, _ = n.shape
    if family == "gpt2":
        attn = block.attn
        qkv = n @ attn.c_attn.weight + attn.c_attn.bias  # Conv1D: x W + b
        q, k, v = qkv.split(n_q * d, dim=-1)
        return tuple(x.view(b, t, n_q, d).transpose(1, 2) for x in (q, k, v))
    if family == "gpt_neox":
        qkv = F.linear(
            n, block.attention.query_key_value.weight, block.attention.query_key_value.bias
        )
        qkv = qkv.view(b, t, n_q, 3 * d).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        cos, sin = pe
        return ref._rotate(q, cos, sin, "half"), ref._rotate(k, cos, sin, "half"), v
    captured = {}

    def capture(kind, _layer, x):
        captured[kind] = x

    ref._attention(block, config, SPECS[family], layer, n, pe, capture)
    return captured["q"], captured["k"], captured["v"]


def _out_weight(block, config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection as ``W [d, H*D]`` (``out = z Wᵀ + b``) and its bias."""
    family = config.model_type
    if family == "gpt2":
        return block.attn.c_proj.weight.T, block.attn.c_proj.bias
    module = {"gpt_neox": "attention.dense", "gptj": "attn.out_proj"}.get(
        family, "self_attn.o_proj"
    )
    proj = block
    for part in module.split("."):
        proj = getattr(proj, part)
    return proj.weight, proj.bias


def _mlp(block, config, layer: int, x: torch.Tensor) -> torch.Tensor:
    family = config.model_type
    if family == "gpt2":
        mlp = block.mlp
        h = F.gelu(x @ mlp.c_fc.weight + mlp.c_fc.bias, approximate="tanh")
        return h @ mlp.c_proj.weight + mlp.c_proj.bias
    if family == "gpt_neox":
        mlp = block.mlp
        h = F.gelu(F.linear(x, mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias))
        return F.linear(h, mlp.dense_4h_to_h.weight, mlp.dense_4h_to_h.bias)
    return ref._mlp(block, config, SPECS[family], layer, x, lambda *a: None)


def attention_probs(config, layer: int, q, k) -> torch.Tensor:
    """Causal (sliding-window) softmax probabilities with GQA: ``[B, H, T, T]``."""
    n_q, n_kv, d = _sizes(config)
    group = n_q // n_kv
    t = q.shape[2]
    scores = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) * d**-0.5
    pos = torch.arange(t)
    visible = pos[:, None] >= pos[None, :]
    window = ref._window(config, layer)
    if window is not None:
        visible &= pos[:, None] - pos[None, :] < window
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)


def _split_layer(hf, block, layer: int, eps: dict, record: dict, on_input, drop: bool):
    """A decoder layer forward with one residual copy per downstream input (module doc);
    ``drop``: no gradient through the layer's residual write (GradDrop)."""
    config = hf.config.get_text_config()
    family = config.model_type
    n_q, n_kv, d_head = _sizes(config)
    attn_norm, mlp_norm = NORMS.get(family, ("input_layernorm", "post_attention_layernorm"))
    last = layer == ref.n_layers(hf) - 1
    w_out, b_out = _out_weight(block, config)

    def forward(hidden_states, *args, position_embeddings=None, **kwargs):
        x = hidden_states
        if layer == 0:
            x = on_input(x)
            record["input"] = x
        record[("resid", layer)] = x
        record[("pe", layer)] = position_embeddings

        def projected(kind: str, unit: int) -> torch.Tensor:
            copy = x + eps[(kind, layer, unit)]
            q, k, v = _qkv(
                block, config, layer, getattr(block, attn_norm)(copy), position_embeddings
            )
            return {"q": q, "k": k, "v": v}[kind][:, unit]

        q = torch.stack([projected("q", h) for h in range(n_q)], dim=1)
        k = torch.stack([projected("k", g) for g in range(n_kv)], dim=1)
        v = torch.stack([projected("v", g) for g in range(n_kv)], dim=1)
        record[("qkv", layer)] = (q, k, v)
        probs = attention_probs(config, layer, q, k)
        record[("probs", layer)] = probs
        z = probs @ v.repeat_interleave(n_q // n_kv, 1)
        z = z.transpose(1, 2).reshape(x.shape[0], x.shape[1], n_q * d_head)
        attn_out = 0.0 if b_out is None else b_out
        for h in range(n_q):
            sl = slice(h * d_head, (h + 1) * d_head)
            write = z[..., sl] @ w_out[:, sl].T
            record[("head", layer, h)] = write
            attn_out = attn_out + write
        mid = x if family in PARALLEL else x + attn_out
        record[("mlp_copy", layer)] = mid
        m = _mlp(block, config, layer, getattr(block, mlp_norm)(mid + eps[("mlp", layer, 0)]))
        record[("mlp", layer)] = m
        write = attn_out + m
        out = x + (write.detach() if drop else write)
        if last:
            record["final"] = out
            out = out + eps["logits"]
        return out

    return forward


def run(
    hf, ids: torch.Tensor, eps: dict, on_input=lambda x: x, drop_layer: int | None = None
) -> tuple[torch.Tensor, dict]:
    """Logits ``[1, T, vocab]`` of one prompt with the split-copy layers, and the record of
    writes (``input``, ``("head", l, h)``, ``("mlp", l)``), copies, q/k/v and probabilities."""
    record: dict = {}
    blocks = list(ref.decoder_layers(hf))
    for layer, block in enumerate(blocks):
        block.forward = _split_layer(hf, block, layer, eps, record, on_input, layer == drop_layer)
    try:
        logits = hf(input_ids=ids[None], use_cache=False).logits
    finally:
        for block in blocks:
            del block.forward
    return logits, record


def graph(hf) -> tuple[list[str], list[tuple[str, str]]]:
    """Upstream node names and downstream inputs ``(name, kind)``, each in forward order."""
    config = hf.config.get_text_config()
    n_q, n_kv, _ = _sizes(config)
    up, down = ["input"], []
    for layer in range(ref.n_layers(hf)):
        down += [(f"a{layer}.h{h}", "q") for h in range(n_q)]
        down += [(f"a{layer}.kv{g}", kind) for kind in ("k", "v") for g in range(n_kv)]
        down.append((f"m{layer}", "mlp"))
        up += [f"a{layer}.h{h}" for h in range(n_q)] + [f"m{layer}"]
    down.append(("logits", "logits"))
    return up, down


def _layer_of(name: str) -> int:
    return -1 if name == "input" else int(name[1:].split(".")[0])


def edge_exists(hf, up: str, down: str, kind: str) -> bool:
    """Whether ``up`` writes before ``down``'s ``kind`` input reads (module docstring)."""
    if kind == "logits":
        return True
    lu, lv = _layer_of(up), _layer_of(down)
    if kind == "mlp" and hf.config.model_type not in PARALLEL and up.startswith("a"):
        return lu <= lv
    return lu < lv


def _zero_eps(hf, t: int) -> dict:
    config = hf.config.get_text_config()
    n_q, n_kv, _ = _sizes(config)
    width = config.hidden_size if hasattr(config, "hidden_size") else config.n_embd
    eps = {}
    for layer in range(ref.n_layers(hf)):
        for kind, n in (("q", n_q), ("k", n_kv), ("v", n_kv), ("mlp", 1)):
            for unit in range(n):
                eps[(kind, layer, unit)] = torch.zeros(1, t, width, requires_grad=True)
    eps["logits"] = torch.zeros(1, t, width, requires_grad=True)
    return eps


def _eps_key(down: str, kind: str):
    if kind == "logits":
        return "logits"
    layer = _layer_of(down)
    unit = 0 if kind == "mlp" else int(down.split(".")[1][2 if kind in ("k", "v") else 1 :])
    return (kind, layer, unit)


def _write_key(name: str):
    if name == "input":
        return "input"
    layer = _layer_of(name)
    return ("mlp", layer) if name.startswith("m") else ("head", layer, int(name.split(".h")[1]))


def copy_gradients(
    hf, ids, ct: int, nt: int, on_input=lambda x: x, drop_layer: int | None = None
) -> tuple[dict, dict]:
    """``{eps key: ∂M/∂x_v}`` ``[1, T, d]`` (M = logit difference), and ``{("probs", l):
    ∂M/∂A}`` for every layer's attention probabilities; plus the run's record."""
    eps = _zero_eps(hf, len(ids))
    with torch.enable_grad():
        logits, record = run(hf, ids, eps, on_input, drop_layer)
        m = ref.metric_logit_diff(logits, ct, nt)
        keys = list(eps) + [k for k in record if k[0] == "probs"]
        tensors = [eps[k] if k in eps else record[k] for k in keys]
        grads = torch.autograd.grad(m, tensors, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads, strict=True)]
    return dict(zip(keys, grads, strict=True)), record


def edge_values(
    hf, pair, steps: int | None = None, drop_layer: int | None = None, qk: bool = False
) -> dict[tuple[str, str, str], float]:
    """EAP (``steps=None``) or EAP-IG with ``steps`` steps, noising, logit difference:
    ``{(upstream, downstream, input kind): value}`` for one pair (see the module docstring).
    ``drop_layer``: GradDrop's term for that layer; ``qk``: edges into queries and keys get
    the QK fix (:func:`qk_value`)."""
    clean, noise, ct, nt = ref.pair_ids(pair)
    with torch.no_grad():
        _, rec_noise = run(hf, noise, _zero_eps(hf, len(noise)))
        _, rec_clean = run(hf, clean, _zero_eps(hf, len(clean)))
    if steps is None:
        grads, _ = copy_gradients(hf, clean, ct, nt, drop_layer=drop_layer)
    else:
        total = None
        emb_noise, emb_clean = rec_noise["input"].detach(), rec_clean["input"].detach()
        for k in range(1, steps + 1):
            alpha = k / steps
            path = emb_noise + alpha * (emb_clean - emb_noise)
            g, _ = copy_gradients(hf, clean, ct, nt, on_input=lambda x, path=path: path)
            total = g if total is None else {key: total[key] + g[key] for key in total}
        grads = {key: value / steps for key, value in total.items()}
    up, down = graph(hf)
    out = {}
    for u in up:
        delta = (rec_noise[_write_key(u)] - rec_clean[_write_key(u)]).detach().double()
        for name, kind in down:
            if not edge_exists(hf, u, name, kind):
                continue
            if qk and kind in ("q", "k"):
                out[(u, name, kind)] = qk_value(hf, rec_clean, grads, delta, name, kind)
                continue
            grad = grads[_eps_key(name, kind)].double()
            out[(u, name, kind)] = float((delta * grad).sum())
    return out


def qk_value(hf, record: dict, grads: dict, delta: torch.Tensor, name: str, kind: str) -> float:
    """QK-fixed value of an edge into a query (key): the head's q (the KV head's k) recomputed
    from its copy shifted by ``delta`` (norm and projection included), the softmax recomputed
    with only that changed, ``Σ_{t,s} (A' - A) ∂M/∂A`` over the affected query heads."""
    config = hf.config.get_text_config()
    n_q, n_kv, _ = _sizes(config)
    layer, unit = _layer_of(name), _eps_key(name, kind)[2]
    block = list(ref.decoder_layers(hf))[layer]
    attn_norm = NORMS.get(config.model_type, ("input_layernorm",))[0]
    q, k, v = (t.detach() for t in record[("qkv", layer)])
    x = record[("resid", layer)].detach()
    pe = record[("pe", layer)]
    with torch.no_grad():
        q2, k2, _ = _qkv(block, config, layer, getattr(block, attn_norm)(x + delta.float()), pe)
        if kind == "q":
            heads = [unit]
            q = q.clone()
            q[:, unit] = q2[:, unit]
        else:
            group = n_q // n_kv
            heads = list(range(unit * group, (unit + 1) * group))
            k = k.clone()
            k[:, unit] = k2[:, unit]
        new = attention_probs(config, layer, q, k).double()
    old = record[("probs", layer)].detach().double()
    g = grads[("probs", layer)].double()
    return float(((new - old) * g)[:, heads].sum())


def copy_attribution(hf, pair) -> dict[tuple[str, str], float]:
    """Node-level AtP of every downstream input's own copy: ``Δx_v · ∂M/∂x_v`` with
    ``Δx_v = x_v(noise) - x_v(clean)`` read directly from the two runs (the layer input for
    q/k/v, the MLP norm's input for the MLP, the last layer's output for the logits)."""
    clean, noise, ct, nt = ref.pair_ids(pair)
    with torch.no_grad():
        _, rec_noise = run(hf, noise, _zero_eps(hf, len(noise)))
    grads, rec_clean = copy_gradients(hf, clean, ct, nt)

    def copy_of(rec, name, kind):
        if kind == "logits":
            return rec["final"]
        layer = _layer_of(name)
        return rec[("mlp_copy", layer)] if kind == "mlp" else rec[("resid", layer)]

    _, down = graph(hf)
    out = {}
    for name, kind in down:
        delta = (copy_of(rec_noise, name, kind) - copy_of(rec_clean, name, kind)).detach()
        out[(name, kind)] = float((delta.double() * grads[_eps_key(name, kind)].double()).sum())
    return out


def graddrop_values(hf, pair, qk: bool = False) -> dict[tuple[str, str, str], float]:
    """GradDrop scores: ``Σ_ℓ |value with layer ℓ's write gradient dropped| / (L - 1)`` for
    edges into a block input, ``/ L`` for edges into the logits (one backward per layer)."""
    n = ref.n_layers(hf)
    terms = [edge_values(hf, pair, drop_layer=layer, qk=qk) for layer in range(n)]
    return {
        key: sum(abs(t[key]) for t in terms) / (n if key[2] == "logits" else n - 1)
        for key in terms[0]
    }


def patched_effects(hf, pair, edges: list[tuple[str, str, str]]) -> list[float]:
    """Exact effect of patching each edge ``(upstream, downstream, kind)`` alone: the clean run
    with ``Δu`` added to the downstream input's own copy only, minus the clean run's metric."""
    clean, noise, ct, nt = ref.pair_ids(pair)
    out = []
    with torch.no_grad():
        _, rec_noise = run(hf, noise, _zero_eps(hf, len(noise)))
        logits, rec_clean = run(hf, clean, _zero_eps(hf, len(clean)))
        base = ref.metric_logit_diff(logits, ct, nt)
        for up, name, kind in edges:
            eps = _zero_eps(hf, len(clean))
            eps[_eps_key(name, kind)] = rec_noise[_write_key(up)] - rec_clean[_write_key(up)]
            out.append(float(ref.metric_logit_diff(run(hf, clean, eps)[0], ct, nt) - base))
    return out
