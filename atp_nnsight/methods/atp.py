"""AtP and AtP*: attribution patching with the QK fix and GradDrop (Kramár et al. 2024).

Per pair (noising: base = clean, source = noise; denoising swaps them), for node ``n``:

* AtP (Eq. 4): ``Î(n) = (n(source) - n(base)) · ∂M/∂n |base``, summed over the node's features
  (and over positions for nodes summed over positions) — two forwards and one backward.
* QK fix (``atp+qk``): for ``q`` and ``k`` nodes the attention probabilities of the patched run
  are recomputed exactly from post-rotary q/k (no eager attention needed) and only what follows
  them is linearised: ``Î = Σ (A' - A) ⊙ ∂M/∂A`` with ``∂M/∂A[t,s] = v_s · ∂M/∂z_t``
  (see :mod:`atp_nnsight.methods.qk_fix`).
* GradDrop (``atp+gd``): for each layer ℓ the gradient through layer ℓ's residual write is
  dropped (the skip path still carries it), giving ``Î_ℓ``. Per pair the score is
  ``Σ_ℓ |Î_ℓ| / (L - 1)`` for nodes inside a block (their own-layer term is zero) and
  ``/ L`` for ``resid`` nodes (no term is structurally zero), so a node whose gradient no drop
  changes scores exactly ``|Î_AtP|``. One forward is shared by all drops: the dropped gradient
  is the vector-Jacobian product of ``∂M/∂resid_post_ℓ`` through ``resid_pre_ℓ`` into the layers
  below, which is what autograd computes from ``resid_pre_ℓ`` with that upstream gradient.
* ``atp*`` = QK fix + GradDrop (each dropped gradient feeds the QK fix).

Ranking: ``mean_pairs |Î|`` (Eq. 5) or the GradDrop mean; ``mean_effect`` is the signed mean
(``None`` for GradDrop methods, whose per-pair scores are unsigned). Cost in forward-pass
equivalents per pair: ``2 + 2`` (AtP) and ``2 + 2L`` (GradDrop: L backwards, counted as the
paper does even though the dropped backwards here only run through the layers below ℓ).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from atp_nnsight.methods import qk_fix
from atp_nnsight.methods.common import Roles, common_length, model_name, prepare_pairs
from atp_nnsight.metrics import Metric, resolve_metric
from atp_nnsight.models import Adapter, AttentionCall, get_adapter
from atp_nnsight.nodes import NodeLayout
from atp_nnsight.remote import Remote, run_chunks
from atp_nnsight.results import Attribution
from atp_nnsight.types import check_direction

METHODS: dict[str, tuple[bool, bool]] = {
    "atp": (False, False),
    "atp+qk": (True, False),
    "atp+gd": (False, True),
    "atp*": (True, True),
}
"""Method name → (QK fix, GradDrop)."""


@dataclass(frozen=True)
class AtpChunk:
    """Inputs of one session: pairs of one length and what to compute."""

    adapter: Adapter
    roles: Roles
    metric: Metric
    kinds: tuple[str, ...]
    layers: tuple[int, ...]
    per_position: bool
    qk: bool
    graddrop: bool


def _reads(chunk: AtpChunk, layer: int, for_base: bool) -> tuple[tuple[str, ...], bool]:
    """Kinds to read at ``layer`` and whether the attention call is needed."""
    kinds = set(chunk.kinds) if layer in chunk.layers else set()
    attention = chunk.qk and bool(kinds & {"q", "k"})
    if for_base and attention:
        kinds.add("head")  # ∂M/∂z for the QK fix
    if for_base and chunk.graddrop and layer > 0:
        kinds.add("resid")  # resid_pre_ℓ: where each dropped backward starts
    return tuple(sorted(kinds)), attention


def _qk_estimates(
    adapter: Adapter,
    call: AttentionCall,
    src: dict[str, torch.Tensor],
    grad_z: torch.Tensor,
    kinds: Sequence[str],
    per_position: bool,
) -> dict[str, torch.Tensor]:
    """QK-fixed estimates ``[n, positions, units]`` for the q/k kinds requested."""
    args = (call.scaling, call.mask, call.sliding_window, call.softcap)
    scores = qk_fix.attention_scores(call.q, call.k, *args)
    probs = torch.softmax(scores, dim=-1)
    g = qk_fix.attention_grad(call.v, grad_z, adapter.n_heads)
    out = {}
    if "q" in kinds:
        est = qk_fix.query_fix(call.q, src["q"], call.k, g, probs, *args)  # [n, Hq, T]
        out["q"] = est.transpose(1, 2) if per_position else est.sum(-1).unsqueeze(1)
    if "k" in kinds:
        if per_position:
            est = qk_fix.key_fix(call.q, call.k, src["k"], g, probs, scores, *args)
            out["k"] = est.transpose(1, 2)
        else:
            out["k"] = qk_fix.key_fix_joint(call.q, call.k, src["k"], g, probs, *args).unsqueeze(1)
    return out


def _linear_estimate(
    adapter: Adapter,
    kind: str,
    src_units: torch.Tensor,
    base_raw: torch.Tensor,
    grad_raw: torch.Tensor,
    per_position: bool,
) -> torch.Tensor:
    """``(source - base) · grad`` per node: ``[n, positions, units]`` (float32)."""
    delta = src_units.float() - adapter.units(kind, base_raw).float()
    est = (delta * adapter.units(kind, grad_raw).float()).sum(-1)
    return est if per_position else est.sum(1, keepdim=True)


def _atp_body(model: Any, chunk: AtpChunk) -> dict[str, torch.Tensor]:
    """One session: source forward, base forward + backward(s); returns per-pair node values."""
    adapter, roles = chunk.adapter, chunk.roles
    n_layers = adapter.n_layers
    walk = range(n_layers) if chunk.graddrop else chunk.layers
    with model.trace(roles.source, use_cache=False):
        src = {}
        for layer in chunk.layers:
            kinds, attention = _reads(chunk, layer, for_base=False)
            raws, call = adapter.read_layer(model, layer, kinds, attention=attention)
            for kind in kinds:
                src[(kind, layer)] = adapter.units(kind, raws[kind]).detach().clone()
            if attention:
                src[("q", layer)] = call.q.detach().clone()
                src[("k", layer)] = call.k.detach().clone()
    with model.trace(roles.base, use_cache=False):
        first = adapter.layer(model, 0).input
        if not first.requires_grad:
            first.requires_grad_(True)  # NDIF loads frozen weights: start the graph here
        base, calls = {}, {}
        for layer in walk:
            kinds, attention = _reads(chunk, layer, for_base=True)
            raws, call = adapter.read_layer(model, layer, kinds, attention=attention)
            base.update({(kind, layer): raw for kind, raw in raws.items()})
            if attention:
                calls[layer] = call
        if chunk.graddrop:
            base[("resid_post", n_layers - 1)] = adapter.layer(model, n_layers - 1).output
        logits = model.output.logits
        metric = chunk.metric(logits, roles.clean_target, roles.noise_target).float()
        keys = list(base)
        grads = dict(
            zip(
                keys,
                torch.autograd.grad(
                    metric.sum(),
                    [base[k] for k in keys],
                    retain_graph=chunk.graddrop,
                    allow_unused=True,
                ),
                strict=True,
            )
        )

        def estimates(grad: dict, layer: int, only: tuple[str, ...] = ()) -> dict:
            """Node estimates of ``layer`` given gradients at its sites."""
            kinds = [k for k in (only or chunk.kinds) if (k, layer) in base]
            out = {}
            if layer in calls and not only:
                qk_kinds = [k for k in kinds if k in ("q", "k")]
                gz = adapter.units("head", grad[("head", layer)])
                srcs = {k: src[(k, layer)] for k in qk_kinds}
                out.update(
                    _qk_estimates(adapter, calls[layer], srcs, gz, qk_kinds, chunk.per_position)
                )
            for kind in kinds:
                if kind not in out:
                    g = grad[(kind, layer)]
                    if g is None:
                        g = torch.zeros_like(base[(kind, layer)])
                    out[kind] = _linear_estimate(
                        adapter,
                        kind,
                        src[(kind, layer)],
                        base[(kind, layer)],
                        g,
                        chunk.per_position,
                    )
            return out

        full = {layer: estimates(grads, layer) for layer in chunk.layers}
        result = {"metric": metric.detach().cpu(), "est": _flatten(full, chunk)}
        if chunk.graddrop:
            result["gd"] = _graddrop(chunk, base, grads, full, estimates)
        result = {k: v.detach().cpu() for k, v in result.items()}
    return result


def _graddrop(chunk: AtpChunk, base: dict, grads: dict, full: dict, estimates: Any) -> torch.Tensor:
    """Per-pair GradDrop scores ``Σ_ℓ |Î_ℓ| / (#terms that can be non-zero)``."""
    n_layers = chunk.adapter.n_layers
    total = {layer: {k: v.abs() * 0 for k, v in ests.items()} for layer, ests in full.items()}
    for drop in range(n_layers):
        # ∂M/∂resid_post_drop is unchanged by dropping layer `drop`; with the drop it is also
        # the whole gradient at resid_pre_drop (skip path only).
        g_post = grads[("resid", drop + 1)] if drop < n_layers - 1 else grads[("resid_post", drop)]
        below = [key for key in base if key[1] < drop and key[0] != "resid_post"]
        below = [key for key in below if key[1] in chunk.layers]
        dropped = {}
        if below:
            inner = torch.autograd.grad(
                base[("resid", drop)],
                [base[k] for k in below],
                grad_outputs=g_post,
                retain_graph=True,
                allow_unused=True,
            )
            dropped = dict(zip(below, inner, strict=True))
        for layer in chunk.layers:
            if layer > drop:  # the node's gradient does not pass through layer `drop`
                terms = full[layer]
            elif layer < drop:
                terms = estimates(dropped, layer)
            elif "resid" in full[layer]:  # resid_pre_drop itself: gradient = g_post
                terms = {"resid": estimates({("resid", layer): g_post}, layer, ("resid",))["resid"]}
            else:  # a block node's own-layer term is zero
                terms = {}
            for k, v in terms.items():
                total[layer][k] += v.abs()
    n_terms = {k: (n_layers if k == "resid" else n_layers - 1) for k in chunk.kinds}
    scaled = {layer: {k: v / n_terms[k] for k, v in ests.items()} for layer, ests in total.items()}
    return _flatten(scaled, chunk)


def _flatten(per_layer: dict[int, dict[str, torch.Tensor]], chunk: AtpChunk) -> torch.Tensor:
    """``[n, nodes]`` in layout order (kind, layer, position, unit)."""
    parts = [per_layer[layer][kind].flatten(1) for kind in chunk.kinds for layer in chunk.layers]
    return torch.cat(parts, dim=1)


def attribute(
    model: Any,
    pairs: Any,
    nodes: str | Sequence[str] = "head",
    *,
    method: str = "atp*",
    layers: str | Sequence[int] | None = None,
    per_position: bool = False,
    direction: str = "noising",
    metric: str | Metric = "logit-diff",
    pairs_per_chunk: int = 16,
    prepend_bos: bool = False,
    remote: Remote = False,
    progress: bool = True,
    checkpoint_dir: Any = None,
) -> Attribution:
    """Estimate every node's patching effect with ``method`` (atp, atp+qk, atp+gd, atp*).

    ``pairs_per_chunk`` pairs (of one token length) share each forward/backward and each
    nnsight session; lower it to reduce memory.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    check_direction(direction)
    qk, graddrop = METHODS[method]
    adapter = get_adapter(model)
    if graddrop and adapter.n_layers < 2:
        raise ValueError("GradDrop needs a model with at least 2 layers")
    tok = prepare_pairs(model, pairs, prepend_bos)
    seq_len = common_length(tok) if per_position else None
    layout = NodeLayout.build(adapter, nodes, layers, seq_len)
    metric_name, metric_fn = resolve_metric(metric)
    groups = tok.chunks(pairs_per_chunk)
    chunks = [
        AtpChunk(
            adapter,
            Roles.of(g, direction),
            metric_fn,
            layout.kinds,
            layout.layers,
            per_position,
            qk,
            graddrop,
        )
        for g in groups
    ]
    outs = run_chunks(
        model,
        chunks,
        _atp_body,
        remote=remote,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        desc=method,
    )
    n = len(tok)
    est = np.zeros((n, layout.n_nodes), dtype=np.float32)
    gd = np.zeros_like(est) if graddrop else None
    base_metric = np.zeros(n, dtype=np.float32)
    for g, out in zip(groups, outs, strict=True):
        est[g.indices] = out["est"].numpy()
        base_metric[g.indices] = out["metric"].numpy()
        if gd is not None:
            gd[g.indices] = out["gd"].numpy()
    per_pair = gd if gd is not None else est
    cost_per_pair = 2 + 2 * (adapter.n_layers if graddrop else 1)
    return Attribution(
        nodes=layout.table(),
        scores=np.abs(per_pair).mean(0),
        per_pair=per_pair,
        mean_effect=None if graddrop else est.mean(0),
        method=method,
        direction=direction,
        metric=metric_name,
        model=model_name(model),
        cost=float(cost_per_pair * n),
        pairs=[p.__dict__ for p in tok.pairs],
        metadata={
            "base_metric": base_metric.tolist(),
            "per_position": per_position,
            "seq_len": seq_len,
            "layers": list(layout.layers),
            "kinds": list(layout.kinds),
        },
    )
