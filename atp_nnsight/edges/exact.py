"""Exact edge patching (ground truth, and circuit evaluation by set patching).

Patching a set ``S`` of edges (noising: base = clean, source = noise; denoising swaps them):
in the base run, every downstream input ``v`` reads its own copy of the residual stream plus
``Σ_{u: (u -> v) ∈ S} (u(source) - u(run))``, where ``u(run)`` is ``u``'s value in this same
patched run; everything else is computed normally. So an edge in ``S`` carries ``u``'s source
value into ``v`` only, and a set of edges carries each of its upstream nodes' source values
along exactly those edges (EAP-IG's and MIB's circuit semantics: patching every edge *not* in
a circuit runs the circuit). For one edge ``u(run) = u(base)``: ``v`` receives
``u(source) - u(base)`` and nothing else changes. Effect: ``metric(patched) - metric(base)``.

How it is applied (inside the forward, per layer, no second model run): the norm in front of
``v`` is called on the shifted copy; for a head's q, k or v the shifted norm output is carried
to the attention call exactly through the projection, head split and rotary (a Jacobian-vector
product through the recorded graph of that affine map: the norm's output is made a leaf that
requires grad for that layer only, and the call receives detached tensors, so nothing else is
recorded; query/key norms are called as modules), and only that head's slice of the call's
q (k, v) is replaced; an MLP's input is replaced by its norm applied to the shifted copy; the
logits' copy is the last layer's output. Many rows (pair × set) share a forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from atp_nnsight.edges.graph import EdgeGraph
from atp_nnsight.edges.results import EdgeAttribution
from atp_nnsight.edges.sites import KINDS, head_writes, iter_sites, shifted_call
from atp_nnsight.methods.common import (
    forward_kwargs,
    metric_values,
    model_name,
    prepare_pairs,
    roles_of,
)
from atp_nnsight.methods.exact import gather_effects
from atp_nnsight.metrics import Metric, resolve_metric
from atp_nnsight.remote import Remote, run_chunks
from atp_nnsight.types import check_direction

MAX_ROWS_PER_FORWARD = 64
"""Cap on patched rows per forward."""

FORWARDS_PER_SESSION = 8
"""Patched forwards per session (chunk)."""

NODES_PER_FORWARD = 4
"""Distinct patched attention inputs that single-edge sets may share in one forward."""


# --------------------------------------------------------------------------------------------
# shipped: the session body
# --------------------------------------------------------------------------------------------
def _unpack(packed, n_edges):
    """Bool ``[sets, n_edges]`` from ``np.packbits`` rows (big-endian bit order)."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, :n_edges].bool()


def _mix(mask, ups, device):
    """``[N, R, T, d]`` on ``device``: ``Σ_u mask[r, n, u] · D_u[r]`` over the upstream blocks
    ``ups`` (each ``[R, U_i, T, d]`` or None when unused; ``mask`` ``[R, N, Σ U_i]``).

    Accumulated with batched matrix products on each block's device (one partial sum per
    device), then moved to ``device``; None when no used block has a patched edge."""
    partial, start, shape = {}, 0, None
    for block, width in ups:
        m = mask[:, :, start : start + width]
        start += width
        if block is None or not bool(m.any()):
            continue
        r, u, t, d = block.shape
        shape = (r, mask.shape[1], t, d)
        flat = block.reshape(r, u, t * d)
        m = m.to(block.device, block.dtype)
        acc = partial.get(block.device)
        if acc is None:
            partial[block.device] = torch.bmm(m, flat)
        else:
            acc.baddbmm_(m, flat)
    if not partial:
        return None
    total = sum(p.to(device) for p in partial.values())
    return total.reshape(shape).transpose(0, 1)


def _patch_attention(sites, op, first, mask, ups, layout):
    """Replace the call's q, k, v by their patched values (rows and heads with a patch)."""
    call = sites["call"]
    device = sites["attn_in"].device
    n_q, n_kv = layout
    counts = {"q": n_q, "k": n_kv, "v": n_kv}
    args, kwargs = op.inputs
    args = list(args)
    start = 0
    for i, kind in enumerate(KINDS):
        m = mask[:, start : start + counts[kind]]
        start += counts[kind]
        new = call[kind].detach().clone()
        active = m.any(2).any(0).nonzero().flatten().tolist()
        if active:
            shifts = _mix(m[:, active], ups, device)
            (delta,) = shifted_call(sites, shifts, (kind,))
            rows = m[:, active].any(2).to(new.device, delta.dtype)  # [R, A]
            for j, unit in enumerate(active):
                new[:, unit] += delta[j, :, unit] * rows[:, j, None, None]
        args[first + i] = new
    op.inputs = (tuple(args), kwargs)


def _patched_forward(model, chunk, batch, source, masks):
    """One patched forward of ``batch`` rows; returns the per-row metric (a tensor)."""
    adapter, info = chunk["adapter"], chunk["graph"]
    n_layers, n_q, n_kv = adapter.n_layers, adapter.n_heads, adapter.n_kv_heads
    base_ids, _, clean_target, noise_target = chunk["roles"]
    pair = batch["pair"]
    m = masks[batch["set"]]
    used = batch["used"]
    per_layer = n_q + 1
    with model.trace(base_ids[pair], **chunk["forward"]):
        ups = []  # (D block [R, U, T, d] or None, U): source minus run, per upstream block
        for layer in range(n_layers):
            attn_off, mlp_off = chunk["offsets"][layer]
            feed = 1 + layer * per_layer
            n_attn = n_q + 2 * n_kv
            m_attn = m[:, attn_off : attn_off + n_attn * feed].reshape(-1, n_attn, feed)
            feed_mlp = feed + (0 if info["parallel"] else n_q)
            m_mlp = m[:, mlp_off : mlp_off + feed_mlp].unsqueeze(1)
            patch_attn = bool(m_attn.any())
            sites = {}
            last = layer == n_layers - 1
            for name, value, handle in iter_sites(model, adapter, info, layer, last):
                sites[name] = value
                if name == "resid" and layer == 0:
                    src = source["emb"][pair.to(source["emb"].device)]
                    ups.append(((src - value).unsqueeze(1) if bool(used[0]) else None, 1))
                elif name == "attn_in" and patch_attn:
                    leaf = value.detach().requires_grad_(True)
                    handle.input = leaf
                    sites["attn_in"] = leaf
                elif name in ("q_norm", "k_norm"):
                    sites[name + "_module"] = handle
                elif name == "call" and patch_attn:
                    sites["attn_norm"] = getattr(adapter.layer(model, layer), info["attn_norm"])
                    first = adapter.attention_call[1]
                    _patch_attention(sites, handle, first, m_attn, ups, (n_q, n_kv))
                elif name == "z":
                    block = None
                    if bool(used[feed : feed + n_q].any()):
                        attn = getattr(adapter.layer(model, layer), adapter.attn)
                        out_proj = getattr(attn, adapter.out_proj)
                        src = source["z"][layer][pair.to(value.device)]
                        block = head_writes(out_proj, src - value.detach(), n_q)
                    heads = (block, n_q)
                elif name == "mlp_in" and bool(m_mlp.any()):
                    mix_ups = ups + ([heads] if not info["parallel"] else [])
                    shift = _mix(m_mlp, mix_ups, value.device)[0]
                    norm = getattr(adapter.layer(model, layer), info["mlp_norm"])
                    copy = sites["mlp_copy"].to(value.device)  # GPT-J: the layer input
                    with torch.no_grad():
                        moved = norm(copy + shift.to(copy.dtype))
                    rows = m_mlp.any(2).to(value.device)  # [R, 1]
                    handle.input = torch.where(rows[:, :, None], moved, value)
                elif name == "mlp_out":
                    block = None
                    if bool(used[feed + n_q]):
                        src = source["mlp_out"][layer][pair.to(value.device)]
                        block = (src - value.detach()).unsqueeze(1)
                    ups.append(heads)
                    ups.append((block, 1))
                elif name == "out":
                    m_log = m[:, chunk["logits_offset"] :].unsqueeze(1)
                    if bool(m_log.any()):
                        shift = _mix(m_log, ups, value.device)[0]
                        handle.output = value + shift.to(value.dtype)
        logits = model.output.logits
        value = metric_values(chunk["metric"], logits, clean_target[pair], noise_target[pair])
        value = value.detach()
    return value


def patch_body(model, chunk):
    """One session: base + source forward, then one patched forward per row batch.

    Returns CPU ``effects`` (one per row, batch order), ``base`` and ``source`` metrics.
    """
    adapter = chunk["adapter"]
    base_ids, source_ids, clean_target, noise_target = chunk["roles"]
    n = base_ids.shape[0]
    with model.trace(torch.cat([base_ids, source_ids]), **chunk["forward"]):
        source = {"z": {}, "mlp_out": {}}
        for layer in range(adapter.n_layers):
            kinds = ("resid", "head", "mlp_out") if layer == 0 else ("head", "mlp_out")
            raws, _ = adapter.read_layer(model, layer, kinds)
            if layer == 0:
                source["emb"] = raws["resid"][n:].detach().clone()
            source["z"][layer] = raws["head"][n:].detach().clone()
            source["mlp_out"][layer] = raws["mlp_out"][n:].detach().clone()
        logits = model.output.logits
        both = metric_values(
            chunk["metric"], logits, clean_target.repeat(2), noise_target.repeat(2)
        ).detach()
        base_metric, source_metric = both[:n], both[n:]
    masks = _unpack(chunk["masks"], chunk["n_edges"])
    effects = []
    for batch in chunk["batches"]:
        value = _patched_forward(model, chunk, batch, source, masks)
        effects.append((value - base_metric[batch["pair"].to(value.device)]).cpu())
    return {"effects": torch.cat(effects), "base": base_metric.cpu(), "source": source_metric.cpu()}


# --------------------------------------------------------------------------------------------
# client side
# --------------------------------------------------------------------------------------------
def _as_masks(sets: Any, n_edges: int) -> np.ndarray:
    """Bool ``[sets, n_edges]`` from a sequence of edge-index collections or bool masks."""
    if isinstance(sets, np.ndarray) and sets.dtype == bool and sets.ndim == 2:
        if sets.shape[1] != n_edges:
            raise ValueError(f"set masks must have {n_edges} columns, got {sets.shape[1]}")
        return sets
    if len(sets) == 0:
        raise ValueError("no edge sets given")
    out = np.zeros((len(sets), n_edges), dtype=bool)
    for i, s in enumerate(sets):
        a = np.asarray(s)
        if a.dtype == bool:
            if a.shape != (n_edges,):
                raise ValueError(f"set {i}: a mask must have {n_edges} entries, got {a.shape}")
            out[i] = a
            continue
        a = a.astype(np.int64).reshape(-1)
        if len(a) and not 0 <= a.min() <= a.max() < n_edges:
            raise ValueError(f"set {i}: edge index out of range 0-{n_edges - 1}")
        out[i, a] = True
    return out


def _set_batches(
    masks: np.ndarray, down_idx: np.ndarray, attention_input: np.ndarray, sets_per_batch: int
) -> list[np.ndarray]:
    """Consecutive sets grouped into forwards of at most ``sets_per_batch`` sets, also cut
    where the union of patched attention inputs would exceed :data:`NODES_PER_FORWARD` (or the
    set's own count): each patched q/k/v input costs its projection over every row."""
    batches, current, union = [], [], set()
    for i, mask in enumerate(masks):
        nodes = {int(d) for d in np.unique(down_idx[mask]) if attention_input[d]}
        merged = union | nodes
        full = len(current) >= sets_per_batch or len(merged) > max(NODES_PER_FORWARD, len(nodes))
        if current and full:
            batches.append(np.array(current))
            current, merged = [], nodes
        current.append(i)
        union = merged
    if current:
        batches.append(np.array(current))
    return batches


def _rows_per_forward(graph: EdgeGraph, d_model: int, seq_len: int, vocab: int, gb: float) -> int:
    """Patched rows per forward keeping activations and patch temporaries under ``gb``."""
    adapter = graph.adapter
    width = d_model
    per_row = (
        4
        * seq_len
        * (
            vocab
            + 8 * width
            + 2 * adapter.d_mlp
            + 4 * adapter.n_heads * seq_len
            + graph.n_upstream * width  # held source-minus-run writes
            + 3 * graph.attention_inputs * width  # shifted copies and their projections
        )
    )
    return max(1, min(MAX_ROWS_PER_FORWARD, int(gb * 2**30 // per_row)))


@contextmanager
def _frozen_parameters(model: Any):
    """Parameters not requiring grad for the block (patched forwards record a graph only from
    the leaves they create); restores the flags afterwards. NDIF's weights are frozen."""
    params = [p for p in model._module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def run_edge_sets(
    model: Any,
    tok: Any,
    masks: np.ndarray,
    *,
    direction: str,
    metric: Metric,
    batch_size: int | None,
    memory_gb: float,
    remote: Remote,
    progress: bool,
    checkpoint_dir: Any = None,
    pairs_per_chunk: int = 8,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Effects ``[pairs, sets]`` of patching each edge set, base and source metric ``[pairs]``,
    and the cost in forward passes (one per patched row, two per pair and session)."""
    check_direction(direction)
    graph = EdgeGraph.of(model)
    up_idx, down_idx = graph.edge_ends()
    attention_input = graph.downstream_table()["input"].isin(["q", "k", "v"]).to_numpy()
    vocab = model._module.config.get_text_config().vocab_size
    d_model = graph.adapter.d_model
    chunks, owners = [], []
    for group in tok.chunks(pairs_per_chunk):
        rows = batch_size or _rows_per_forward(graph, d_model, group.length, vocab, memory_gb)
        n = len(group.indices)
        batches = _set_batches(masks, down_idx, attention_input, max(1, rows // n))
        for first in range(0, len(batches), FORWARDS_PER_SESSION):
            these = batches[first : first + FORWARDS_PER_SESSION]
            set_ids = np.concatenate(these)
            local = masks[set_ids]
            out, start = [], 0
            for sets in these:
                here = np.arange(start, start + len(sets))
                start += len(sets)
                used = np.zeros(graph.n_upstream, dtype=bool)
                used[up_idx[local[here].any(0)]] = True
                out.append(
                    {
                        "pair": torch.from_numpy(np.tile(np.arange(n), len(sets))),
                        "set": torch.from_numpy(np.repeat(here, n)),
                        "used": torch.from_numpy(used),
                    }
                )
            chunks.append(
                {
                    "adapter": graph.adapter,
                    "graph": graph.chunk_info(),
                    "roles": roles_of(group, direction),
                    "metric": metric,
                    "forward": forward_kwargs(metric),
                    "offsets": tuple(graph.layer_offsets()),
                    "logits_offset": graph.logits_offset,
                    "n_edges": graph.n_edges,
                    "masks": torch.from_numpy(np.packbits(local, axis=1)),
                    "batches": tuple(out),
                }
            )
            owners.append((group.indices, set_ids))
    with _frozen_parameters(model):
        outs = run_chunks(
            model,
            chunks,
            patch_body,
            remote=remote,
            checkpoint_dir=checkpoint_dir,
            progress=progress,
            desc="edge patching",
        )
    return gather_effects(owners, outs, len(tok), masks.shape[0])


def patch_edge_sets(
    model: Any,
    pairs: Any,
    sets: Sequence[Any] | np.ndarray,
    *,
    direction: str = "noising",
    metric: str | Metric = "logit-diff",
    batch_size: int | None = None,
    memory_gb: float = 2.0,
    prepend_bos: bool = False,
    remote: Remote = False,
    progress: bool = True,
    checkpoint_dir: Any = None,
) -> tuple[np.ndarray, float]:
    """Effects ``[pairs, sets]`` of patching each set of edges at once, and the cost.

    ``sets``: edge-index collections (flat indices of :class:`EdgeGraph`, the ``edge`` column
    of an edge table) or bool masks over all edges (an ``[sets, n_edges]`` array works too).
    """
    tok = prepare_pairs(model, pairs, prepend_bos)
    masks = _as_masks(sets, EdgeGraph.of(model).n_edges)
    effects, _, _, cost = run_edge_sets(
        model,
        tok,
        masks,
        direction=direction,
        metric=resolve_metric(metric)[1],
        batch_size=batch_size,
        memory_gb=memory_gb,
        remote=remote,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
    )
    return effects, cost


def patch_edges(
    model: Any,
    pairs: Any,
    edges: Sequence[int] | np.ndarray | None = None,
    *,
    direction: str = "noising",
    metric: str | Metric = "logit-diff",
    batch_size: int | None = None,
    memory_gb: float = 2.0,
    prepend_bos: bool = False,
    remote: Remote = False,
    progress: bool = True,
    checkpoint_dir: Any = None,
) -> EdgeAttribution:
    """Exact patching of each edge in ``edges`` (flat indices; all edges if None), one at a
    time: per-pair signed effects, their mean and ``score = |mean|``. The result's edge table
    holds just these edges (its ``edge`` column gives their flat indices)."""
    graph = EdgeGraph.of(model)
    chosen = np.arange(graph.n_edges) if edges is None else np.asarray(edges, dtype=np.int64)
    if chosen.ndim != 1 or len(chosen) == 0:
        raise ValueError("edges must be a non-empty list of flat edge indices")
    tok = prepare_pairs(model, pairs, prepend_bos)
    metric_name, metric_fn = resolve_metric(metric)
    order = np.argsort(chosen, kind="stable")  # neighbours share downstream inputs in a batch
    masks = _as_masks([[e] for e in chosen[order]], graph.n_edges)
    sorted_effects, base, source, cost = run_edge_sets(
        model,
        tok,
        masks,
        direction=direction,
        metric=metric_fn,
        batch_size=batch_size,
        memory_gb=memory_gb,
        remote=remote,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
    )
    effects = np.empty_like(sorted_effects)
    effects[:, order] = sorted_effects
    mean = effects.mean(0)
    return EdgeAttribution(
        edges=graph.edge_table().iloc[chosen].reset_index(drop=True),
        scores=np.abs(mean),
        per_pair=effects,
        mean_effect=mean,
        method="exact",
        direction=direction,
        metric=metric_name,
        model=model_name(model),
        cost=cost,
        pairs=[p.__dict__ for p in tok.pairs],
        metadata={
            "base_metric": base.tolist(),
            "source_metric": source.tolist(),
            **graph.describe(),
        },
    )
