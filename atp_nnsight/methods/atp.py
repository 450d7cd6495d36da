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
  changes scores exactly ``|Î_AtP|``. With layer ℓ's write dropped, the gradient at
  ``resid_pre_ℓ`` is ``∂M/∂resid_post_ℓ`` (skip path only), whatever the block computes
  (sequential, parallel or sandwich-normed): that is where each dropped backward starts.
* ``atp*`` = QK fix + GradDrop (each dropped gradient feeds the QK fix).

How it runs (one forward of the source prompts, one of the base prompts, then a backward that
walks down the layers): the backward is a chain of vector-Jacobian products, one segment per
layer, from the layer's output to its sites and its input. Every backward ("stream": the
full one, and one per dropped layer) steps through a layer before the next layer is started,
so each layer's estimates are reduced as soon as its gradients exist, on that layer's
device; its source activations, attention recomputation and graph segment are then freed
(the last stream through a segment does not retain it). Only reduced ``[pairs, nodes]``
values leave a layer, moved to the CPU; gradients handed from one layer to the next are
moved to the device of the tensor they belong to. What is held beyond autograd's own graph:
the source activations of layers not yet reached, and one residual-sized gradient per live
stream (at most ``L``).

Ranking: ``mean_pairs |Î|`` (Eq. 5) or the GradDrop mean; ``mean_effect`` is the signed mean
(``None`` for GradDrop methods, whose per-pair scores are unsigned). Cost in forward-pass
equivalents per pair: ``2 + 2`` (AtP) and ``2 + 2L`` (GradDrop: L backwards, counted as the
paper does even though the dropped backwards here only run through the layers below ℓ).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from atp_nnsight.checks import check_finite_scores, check_int, check_metric_values
from atp_nnsight.methods.common import (
    common_length,
    forward_kwargs,
    metric_values,
    model_name,
    prepare_run,
    roles_of,
)
from atp_nnsight.methods.qk_fix import layer_estimates
from atp_nnsight.metrics import Metric
from atp_nnsight.models import get_adapter
from atp_nnsight.nodes import NodeLayout
from atp_nnsight.plan import atp_pairs_per_chunk, chunk_budget
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

FULL = -1
"""Stream id of the undropped backward (dropped ones are named by their layer)."""

OWN_DROP = -2
"""Estimates of a ``resid`` node with its own layer's write dropped (no backward needed)."""

HELD_BY_AUTOGRAD = ("resid", "q", "k", "v")
"""Sites autograd saves for the backward anyway (the layer input for its norm, q/k/v for the
attention): for these the base tensor is held and ``source - base`` formed when the gradient
arrives. Other sites (head and MLP activations, block outputs) are freed by autograd when
the weights are frozen, so their difference is formed during the forward instead."""


def _qk_kinds(chunk: dict, layer: int) -> tuple[str, ...]:
    """The q/k kinds of ``layer`` estimated with the QK fix."""
    if not chunk["qk"] or layer not in chunk["layers"]:
        return ()
    return tuple(k for k in ("q", "k") if k in chunk["kinds"])


def _source_reads(chunk: dict, layer: int) -> tuple[tuple[str, ...], bool]:
    """Linear kinds to clone from the source run at ``layer``, and whether its attention
    call is needed (source q/k for the QK fix)."""
    qk = _qk_kinds(chunk, layer)
    kinds = tuple(k for k in chunk["kinds"] if k not in qk) if layer in chunk["layers"] else ()
    return kinds, bool(qk)


def _base_reads(chunk: dict, layer: int) -> tuple[tuple[str, ...], bool]:
    """Kinds to read at ``layer`` in the base run (sites, the layer input where the backward
    chain passes, the head output for the QK fix), and whether the attention call is needed."""
    qk = _qk_kinds(chunk, layer)
    kinds = set(chunk["kinds"]) if layer in chunk["layers"] else set()
    kinds.add("resid")
    if qk:
        kinds.add("head")
    return tuple(sorted(kinds)), bool(qk)


def _capture_grad(tensor: torch.Tensor, store: dict, key: str) -> None:
    """Put the gradient reaching ``tensor`` into ``store[key]`` whenever a backward passes it.

    The hook lives on the graph, not on the tensor, so the tensor itself need not be held.
    """
    if not tensor.requires_grad:
        return

    def hook(grad: torch.Tensor) -> None:
        store[key] = grad

    tensor.register_hook(hook)


def _layer_state(chunk: dict, layer: int, raws: dict, call: dict | None, source: dict) -> dict:
    """What the backward needs of one layer of the base run, without holding what autograd
    does not: the layer input (the chain's boundary), the attention call for the QK fix, and
    per linear kind either ``held`` (source clone + base tensor, for sites autograd saves
    anyway) or ``delta`` (``source - base`` in float32, formed now, for sites it frees);
    gradients at sites arrive in ``grads`` through hooks."""
    adapter = chunk["adapter"]
    state = {"resid": raws["resid"], "call": call, "held": {}, "delta": {}, "grads": {}}
    kinds = chunk["kinds"] if layer in chunk["layers"] else ()
    qk = _qk_kinds(chunk, layer)
    for kind in kinds:
        if kind in qk:
            continue
        if kind in HELD_BY_AUTOGRAD:
            state["held"][kind] = (source[kind], raws[kind])
        else:
            base = adapter.units(kind, raws[kind]).detach()
            state["delta"][kind] = source[kind].float() - base.float()
        if kind != "resid":
            _capture_grad(raws[kind], state["grads"], kind)
    if qk:
        _capture_grad(raws["head"], state["grads"], "head")
        state["q_call"] = source.get("q_call")
        state["k_call"] = source.get("k_call")
    return state


def _linear_estimate(
    adapter: Any, kind: str, state: dict, grad_raw: torch.Tensor | None, per_position: bool
) -> torch.Tensor:
    """``(source - base) · grad`` per node: ``[n, positions, units]`` float32 (0 without
    gradient); the difference and the product are formed in float32."""
    if kind in state["held"]:
        source, base_raw = state["held"][kind]
        delta = source.float() - adapter.units(kind, base_raw).float()
    else:
        delta = state["delta"][kind]
    if grad_raw is None:
        n_pos = delta.shape[1] if per_position else 1
        return delta.new_zeros((delta.shape[0], n_pos, delta.shape[2]))
    est = (delta * adapter.units(kind, grad_raw).float()).sum(-1)
    return est if per_position else est.sum(1, keepdim=True)


def _layer_step(
    chunk: dict,
    layer: int,
    boundary: torch.Tensor,
    streams: dict[int, torch.Tensor | None],
    state: dict,
) -> dict[int, dict[str, torch.Tensor]]:
    """Step every stream through ``layer``: estimates per stream and kind, and (in
    ``state["below"]``) each stream's gradient at the layer input.

    ``boundary``: the tensor the streams' gradients belong to (the next layer's input, the
    last layer's output, or the metric). Each backward stops at the layer input; the hooks
    of the layer's sites fire on the way.
    """
    adapter = chunk["adapter"]
    per_position = chunk["per_position"]
    kinds = chunk["kinds"] if layer in chunk["layers"] else ()
    qk = _qk_kinds(chunk, layer)
    resid, grads = state["resid"], state["grads"]
    estimates, below, grads_z = {}, {}, []
    ids = list(streams)
    for i, sid in enumerate(ids):
        grad_out = streams[sid]
        if grad_out is not None:
            grad_out = grad_out.to(boundary.device)
        grads.clear()
        (g_resid,) = torch.autograd.grad(
            boundary,
            [resid],
            grad_outputs=grad_out,
            retain_graph=i < len(ids) - 1,
            allow_unused=True,
        )
        with torch.no_grad():  # estimates are reduced values: no graph through them
            est = {}
            for kind in kinds:
                if kind not in qk:
                    g = g_resid if kind == "resid" else grads.get(kind)
                    est[kind] = _linear_estimate(adapter, kind, state, g, per_position)
            if qk:
                grads_z.append(adapter.units("head", _or_zeros(grads.get("head"), resid, state)))
            estimates[sid] = est
            below[sid] = g_resid if g_resid is not None else torch.zeros_like(resid)
    grads.clear()
    with torch.no_grad():
        if qk:
            fixed = layer_estimates(
                state["call"],
                state["q_call"],
                state["k_call"],
                grads_z,
                per_position,
                chunk["qk_bytes"],
            )
            for sid, est in zip(ids, fixed, strict=True):
                estimates[sid].update(est)
        if chunk["graddrop"] and "resid" in kinds:
            # dropping this layer's own write leaves resid_pre with the gradient at resid_post
            g_post = streams[FULL].to(resid.device)
            own = _linear_estimate(adapter, "resid", state, g_post, per_position)
            estimates[OWN_DROP] = {"resid": own}
    state["below"] = below
    return estimates


def _or_zeros(grad: torch.Tensor | None, resid: torch.Tensor, state: dict) -> torch.Tensor:
    """The head-output gradient, or zeros of the attention output's shape without one."""
    if grad is not None:
        return grad
    q = state["call"]["q"]
    return q.new_zeros(resid.shape[:2] + (q.shape[1] * q.shape[-1],))


def _atp_body(model: Any, chunk: dict) -> dict[str, torch.Tensor]:
    """One session: source forward, base forward, then the layer-by-layer backward chain.

    Returns CPU tensors: ``metric`` and ``source_metric`` ``[n]``, ``est`` ``[n, nodes]``
    (AtP / AtP+QK estimates) and, with GradDrop, ``gd`` ``[n, nodes]``, in layout order.
    """
    adapter = chunk["adapter"]
    base_ids, source_ids, clean_target, noise_target = chunk["roles"]
    layers = chunk["layers"]
    n_layers = adapter.n_layers
    graddrop = chunk["graddrop"]
    lowest = min(layers)
    walk = range(lowest, n_layers) if graddrop else layers
    with model.trace(source_ids, **chunk["forward"]):
        source = {}
        for layer in layers:
            kinds, attention = _source_reads(chunk, layer)
            raws, call = adapter.read_layer(model, layer, kinds, attention=attention)
            saved = {k: adapter.units(k, raws[k]).detach().clone() for k in kinds}
            if attention:
                saved["q_call"] = call["q"].detach().clone() if "q" in chunk["kinds"] else None
                saved["k_call"] = call["k"].detach().clone() if "k" in chunk["kinds"] else None
            source[layer] = saved
        logits = model.output.logits
        source_metric = metric_values(chunk["metric"], logits, clean_target, noise_target)
        source_metric = source_metric.detach().cpu()
    with model.trace(base_ids, **chunk["forward"]):
        first = adapter.layer(model, 0).input
        if not first.requires_grad:
            first.requires_grad_(True)  # NDIF loads frozen weights: start the graph here
        states = {}
        for layer in walk:
            kinds, attention = _base_reads(chunk, layer)
            raws, call = adapter.read_layer(model, layer, kinds, attention)
            states[layer] = _layer_state(chunk, layer, raws, call, source.pop(layer, {}))
            del raws, call
        top = adapter.layer(model, n_layers - 1).output if graddrop else None
        logits = model.output.logits
        metric = metric_values(chunk["metric"], logits, clean_target, noise_target)
        del logits
        out = _backward_chain(chunk, metric, top, walk, states)
        out["metric"] = metric.detach().cpu()
        out["source_metric"] = source_metric
    return out


def _backward_chain(
    chunk: dict,
    metric: torch.Tensor,
    top: torch.Tensor | None,
    walk: Sequence[int],
    states: dict,
) -> dict[str, torch.Tensor]:
    """Walk the layers top-down, stepping every stream through each (see the module doc)."""
    graddrop = chunk["graddrop"]
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    per_layer_gd: dict[int, dict[str, torch.Tensor]] = {}
    if graddrop:
        (g_top,) = torch.autograd.grad(metric.sum(), [top])
        boundary, streams = top, {FULL: g_top}
    else:
        boundary, streams = metric.sum(), {FULL: None}
    full_above = None  # GradDrop: the full gradient at the output of the layer above
    for layer in reversed(list(walk)):
        if graddrop and full_above is not None:
            streams[layer + 1] = full_above  # drop layer+1: skip path only below it
        state = states.pop(layer)
        estimates = _layer_step(chunk, layer, boundary, streams, state)
        if layer in chunk["layers"]:
            per_layer[layer] = {k: v.detach().cpu() for k, v in estimates[FULL].items()}
            if graddrop:
                per_layer_gd[layer] = _graddrop_scores(chunk, layer, estimates)
        if graddrop:
            full_above = streams[FULL]
        boundary, streams = state["resid"], state["below"]
        del state, estimates
    out = {"est": _flatten(per_layer, chunk)}
    if graddrop:
        out["gd"] = _flatten(per_layer_gd, chunk)
    return out


def _graddrop_scores(chunk: dict, layer: int, estimates: dict) -> dict[str, torch.Tensor]:
    """Per-pair GradDrop scores of ``layer``'s nodes on the CPU: ``Σ_ℓ |Î_ℓ| / n_terms``.

    Drops below the node leave its gradient unchanged (``layer`` terms equal to the full
    estimate); each drop above it is one stream; a block node's own-layer term is zero.
    """
    n_layers = chunk["adapter"].n_layers
    out = {}
    for kind, value in estimates[FULL].items():
        total = value.abs() * layer
        for sid, est in estimates.items():
            if sid != FULL and kind in est:
                total = total + est[kind].abs()
        n_terms = n_layers if kind == "resid" else n_layers - 1
        out[kind] = (total / n_terms).detach().cpu()
    return out


def _flatten(per_layer: dict[int, dict[str, torch.Tensor]], chunk: dict) -> torch.Tensor:
    """``[n, nodes]`` in layout order (kind, layer, position, unit), on the CPU."""
    parts = [
        per_layer[layer][kind].flatten(1) for kind in chunk["kinds"] for layer in chunk["layers"]
    ]
    return torch.cat(parts, dim=1)


def gather_estimates(
    groups: Sequence[Any], outs: Sequence[dict], n_pairs: int, n_units: int, graddrop: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Sessions' outputs put in pair order: estimates ``[pairs, units]``, GradDrop scores
    (same shape; None without ``graddrop``), base and source metric ``[pairs]``.

    ``outs[i]`` holds ``est``, ``metric``, ``source_metric`` (and ``gd``) of ``groups[i]``.
    """
    est = np.zeros((n_pairs, n_units), dtype=np.float32)
    gd = np.zeros_like(est) if graddrop else None
    base_metric = np.zeros(n_pairs, dtype=np.float32)
    source_metric = np.zeros(n_pairs, dtype=np.float32)
    for g, out in zip(groups, outs, strict=True):
        est[g.indices] = out["est"].numpy()
        base_metric[g.indices] = out["metric"].numpy()
        source_metric[g.indices] = out["source_metric"].numpy()
        if gd is not None:
            gd[g.indices] = out["gd"].numpy()
    return est, gd, base_metric, source_metric


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
    pairs_per_chunk: int | None = None,
    max_memory: int | float | None = None,
    qk_chunk_bytes: int | None = None,
    prepend_bos: bool = False,
    remote: Remote = False,
    api_key: str | None = None,
    progress: bool = True,
    checkpoint_dir: Any = None,
    allow_nonfinite: bool = False,
) -> Attribution:
    """Estimate every node's patching effect with ``method`` (atp, atp+qk, atp+gd, atp*).

    Pairs (of one token length) share each forward/backward and each nnsight session in
    chunks of ``pairs_per_chunk``; by default the chunk is the largest whose predicted peak
    activation memory (:func:`atp_nnsight.plan.atp_memory`) fits ``max_memory`` bytes
    (default: 80 % of the free memory of the model's device; on NDIF its per-job cap).
    ``qk_chunk_bytes`` bounds the QK fix's attention temporaries per layer (computed in
    chunks of heads × query rows; default: four attention-output-sized float32 tensors of
    the chunk, at least 1 MiB). Non-finite scores raise unless ``allow_nonfinite``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    check_direction(direction)
    qk, graddrop = METHODS[method]
    tok, metric_name, metric_fn = prepare_run(model, pairs, metric, prepend_bos)
    adapter = get_adapter(model)
    if graddrop and adapter.n_layers < 2:
        raise ValueError("GradDrop needs a model with at least 2 layers")
    seq_len = common_length(tok) if per_position else None
    layout = NodeLayout.build(adapter, nodes, layers, seq_len)
    if pairs_per_chunk is None:
        pairs_per_chunk = atp_pairs_per_chunk(
            model,
            layout,
            method=method,
            n_pairs=len(tok),
            seq_len=max(tok.lengths),
            budget=chunk_budget(model, remote, max_memory),
            qk_chunk_bytes=qk_chunk_bytes,
        )
    groups = tok.chunks(check_int(pairs_per_chunk, "pairs_per_chunk"))
    chunks = [
        {
            "adapter": adapter,
            "roles": roles_of(g, direction),
            "metric": metric_fn,
            "forward": forward_kwargs(metric_fn),
            "kinds": layout.kinds,
            "layers": layout.layers,
            "per_position": per_position,
            "qk": qk,
            "graddrop": graddrop,
            "qk_bytes": None if qk_chunk_bytes is None else int(qk_chunk_bytes),
        }
        for g in groups
    ]
    outs = run_chunks(
        model,
        chunks,
        _atp_body,
        remote=remote,
        api_key=api_key,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        desc=method,
    )
    n = len(tok)
    est, gd, base_metric, source_metric = gather_estimates(
        groups, outs, n, layout.n_nodes, graddrop
    )
    check_metric_values(base_metric, source_metric, tok.pairs, direction=direction)
    per_pair = gd if gd is not None else est
    cost_per_pair = 2 + 2 * (adapter.n_layers if graddrop else 1)
    result = Attribution(
        nodes=layout,
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
            "source_metric": source_metric.tolist(),
            "per_position": per_position,
            "seq_len": seq_len,
            "layers": list(layout.layers),
            "kinds": list(layout.kinds),
            "pairs_per_chunk": pairs_per_chunk,
        },
    )
    check_finite_scores(result, allow_nonfinite)
    return result
