"""The layer-by-layer backward chain shared by the edge attribution bodies (runs in traces).

One forward of the source prompts keeps, per layer, the per-head outputs ``z`` and the MLP
write; the base forward turns them into every upstream node's write difference
``Δu = u(source) - u(base)`` (:func:`upstream_writes`), held per layer on that layer's device
as ``[B, H + 1, T, d]`` (heads, then the MLP; the embedding difference first). The backward
then walks down the layers (:func:`backward_chain`) with each *stream* (the full backward,
and with GradDrop one per dropped layer): the gradient at a layer's output is also the
gradient at each of its residual writes, so VJPs from the MLP write to the MLP input and from
the attention write to the attention call give the downstream inputs' gradients; each one's
own gradient at its residual copy follows from batched VJPs through the projections and the
norm (:func:`atp_nnsight.edges.sites.copy_grads`), and the gradient at the layer input is the
sum of the skip path and those copies, so no backward is run per downstream node and none
runs twice through a layer per stream.

Edge values of a layer are contracted on the writes' devices and only ``[B, downstream,
upstream]`` values reach the CPU. Plain dicts and torch only (shipped to NDIF).
"""

from __future__ import annotations

import torch
from torch.autograd.graph import get_gradient_edge

from atp_nnsight.edges.sites import (
    contract,
    copy_grads,
    cut_call,
    head_writes,
    iter_sites,
    shifted_call,
    vjp,
)
from atp_nnsight.methods.common import metric_values
from atp_nnsight.methods.qk_fix import layer_estimates

FULL = -1
"""Stream id of the undropped backward (dropped ones are named by their layer)."""


def collect_layer(model, chunk, layer, on_input=None, source=None):
    """Read ``layer``'s sites (forward order) into a dict; ``on_input(resid, layer_handle)``
    may replace layer 0's input (and must return the tensor the layer then reads).

    With ``source`` (the layer's writes in the source run, see :func:`source_pass`), the
    layer's ``Δu`` is stored as ``up``. Afterwards the residual writes ``attn_out`` and
    ``mlp_out`` are kept only as gradient edges (autograd saves neither; the backward needs
    only where they enter the graph), with their devices as ``attn_out_device`` /
    ``mlp_out_device``.
    """
    adapter, info = chunk["adapter"], chunk["graph"]
    last = layer == adapter.n_layers - 1
    sites = {}
    projections = chunk["projections"]
    for name, value, handle in iter_sites(model, adapter, info, layer, last, projections):
        if name == "resid" and on_input is not None:
            value = on_input(value, handle)
        if name == "mlp_copy" and info["shared_norm"]:
            value = sites["resid"]  # the layer input, as replaced by on_input
        if name == "proj":  # only where its output enters the graph is needed
            edge = get_gradient_edge(value[1])
            sites.setdefault("proj", {})[value[0]] = {"edge": edge, "module": handle}
            continue
        sites[name] = value
        if name in ("q_norm", "k_norm"):
            sites[name + "_module"] = handle
        if name == "call":
            sites["leaves"] = cut_call(handle, adapter.attention_call[1], value)
    sites["attn_norm"] = getattr(adapter.layer(model, layer), info["attn_norm"])
    if source is not None:
        sites["up"] = upstream_writes(model, chunk, layer, sites, source)
    for name in ("attn_out", "mlp_out"):
        write = sites.pop(name)
        sites[name] = get_gradient_edge(write)
        sites[name + "_device"] = write.device
    return sites


def source_pass(model, chunk, source_ids, clean_target, noise_target):
    """Forward of the source prompts: per layer the per-head outputs and the MLP write (and the
    embedding at layer 0), cloned on their devices; and the source metric on the CPU."""
    adapter = chunk["adapter"]
    kept = {}
    with model.trace(source_ids, **chunk["forward"]):
        for layer in range(adapter.n_layers):
            kinds = ("resid", "head", "mlp_out") if layer == 0 else ("head", "mlp_out")
            raws, _ = adapter.read_layer(model, layer, kinds)
            kept[layer] = {k: raws[k].detach().clone() for k in kinds}
        logits = model.output.logits
        source_metric = metric_values(chunk["metric"], logits, clean_target, noise_target)
        source_metric = source_metric.detach().cpu()
    return kept, source_metric


def upstream_writes(model, chunk, layer, sites, source):
    """``Δu`` of ``layer``'s heads and MLP, ``[B, H + 1, T, d]`` on the layer's device."""
    adapter = chunk["adapter"]
    out_proj = getattr(getattr(adapter.layer(model, layer), adapter.attn), adapter.out_proj)
    delta_z = source["head"] - sites["z"].detach()
    heads = head_writes(out_proj, delta_z, adapter.n_heads)
    mlp = (source["mlp_out"] - sites["mlp_out"].detach()).unsqueeze(1)
    return torch.cat([heads, mlp.to(heads.dtype)], dim=1)


def _expand_call(call, p):
    """The attention call dict with its batch repeated ``p`` times (row ``i * B + b``)."""
    mask = call["mask"]
    if mask is not None and mask.shape[0] > 1:
        mask = mask.repeat(p, *([1] * (mask.dim() - 1)))
    out = dict(call)
    out["q"] = call["q"].detach().repeat(p, 1, 1, 1)
    out["k"] = call["k"].detach().repeat(p, 1, 1, 1)
    out["v"] = call["v"].detach().repeat(p, 1, 1, 1)
    out["mask"] = mask
    return out


def _qk_fixed(chunk, sites, blocks, grads_z):
    """QK-fixed edge values into the layer's queries and keys, per stream: ``(q [B, H, U],
    k [B, Hkv, U])`` on the CPU, for the upstream writes ``blocks`` (each ``[B, U_i, T, d]``).

    Each upstream write shifts the attention's residual copy; the shifted q (k) is exact
    through the norm, projections and rotary (:func:`shifted_call`), and the softmax is
    recomputed exactly (``layer_estimates``: every query row, all positions at once, the
    key fix joint over positions and summed over the group's query heads).
    """
    call = sites["call"]
    b, n_q, t, d_head = call["q"].shape
    n_kv = call["k"].shape[1]
    width = sites["resid"].shape[-1]
    per_shift = b * t * (width * 3 + (n_q + n_kv) * d_head * 4 + n_q * t * 8) * 4
    step = max(1, chunk["qk_bytes"] // max(1, per_shift))
    n_streams = len(grads_z)
    q_parts = [[] for _ in range(n_streams)]
    k_parts = [[] for _ in range(n_streams)]
    for block in blocks:
        for u0 in range(0, block.shape[1], step):
            shifts = block[:, u0 : u0 + step].transpose(0, 1)  # [P, B, T, d]
            p = shifts.shape[0]
            dq, dk = shifted_call(sites, shifts, ("q", "k"))
            q_new = (call["q"].detach().unsqueeze(0) + dq).flatten(0, 1)
            k_new = (call["k"].detach().unsqueeze(0) + dk).flatten(0, 1)
            expanded = _expand_call(call, p)
            grads = [g.repeat(p, 1, 1, 1) for g in grads_z]
            fixed = layer_estimates(expanded, q_new, k_new, grads, False, chunk["qk_bytes"])
            for i, est in enumerate(fixed):
                q_parts[i].append(est["q"].reshape(p, b, n_q).permute(1, 2, 0).to("cpu"))
                k_parts[i].append(est["k"].reshape(p, b, n_kv).permute(1, 2, 0).to("cpu"))
    return [(torch.cat(q_parts[i], dim=2), torch.cat(k_parts[i], dim=2)) for i in range(n_streams)]


def layer_step(chunk, layer, sites, streams, ups, continue_below):
    """Step every stream through ``layer``: edge values ``{sid: {"attn": [B, N, U_a], "mlp":
    [B, 1, U_m]}}`` on the CPU and, if ``continue_below``, each stream's gradient at the layer
    input. ``streams``: each stream's gradient at the layer output, which is also the gradient
    at each of the layer's writes (output = input + attention write + MLP write). ``ups``:
    upstream writes (embedding, then one block per layer).

    Per stream, each part of the layer's graph is traversed once: MLP write → MLP input, MLP
    input → its residual copy, attention write → call (q, k, v, and z for the QK fix), then
    the batched per-head VJPs to the attention's copy; the last stream frees each part.
    """
    adapter, info = chunk["adapter"], chunk["graph"]
    qk = chunk["qk"]
    leaves = sites["leaves"]
    attn_inputs = [leaves["q"], leaves["k"], leaves["v"]] + ([sites["z"]] if qk else [])
    ids = list(streams)
    grads, mlp_grads = {}, {}
    for i, sid in enumerate(ids):
        release = i == len(ids) - 1
        g_out = streams[sid].to(sites["mlp_out_device"])  # also the gradient at each write
        # the MLP input's own gradient at its copy (a shared norm is needed again below)
        (g_mlp,) = vjp(
            sites["mlp_out"], [sites["mlp_copy"]], g_out, release and not info["shared_norm"]
        )
        if g_mlp is None:
            g_mlp = torch.zeros_like(sites["mlp_copy"])
        g_write = g_out.to(g_mlp.device)
        if not info["parallel"]:
            g_write = g_write + g_mlp
        grads[sid] = vjp(
            sites["attn_out"], attn_inputs, g_write.to(sites["attn_out_device"]), release
        )
        mlp_grads[sid] = g_mlp
    blocks_attn = ups[: 1 + layer]
    own_heads = None if info["parallel"] else ups[1 + layer][:, : adapter.n_heads]
    fixed = None
    if qk:
        grads_z = []
        for sid in ids:
            g = grads[sid][3]
            grads_z.append(
                adapter.units("head", g if g is not None else torch.zeros_like(sites["z"]))
            )
        fixed = _qk_fixed(chunk, sites, blocks_attn, grads_z)
    values, below = {}, {}
    n_q, n_kv = adapter.n_heads, adapter.n_kv_heads
    copy_device = sites["resid"].device  # where the attention copies' gradients arrive
    n_copies = sum(sites["call"][kind].shape[1] for kind in ("q", "k", "v"))
    for i, sid in enumerate(ids):
        g_mlp = mlp_grads.pop(sid)
        # the attention inputs' own gradients, then the MLP input's: one pass over the writes
        g_all = g_mlp.new_empty((n_copies + 1, *g_mlp.shape), device=copy_device)
        copy_grads(sites, grads.pop(sid)[:3], i == len(ids) - 1, g_all, chunk["projections"])
        g_all[-1] = g_mlp.to(copy_device)
        both = contract(blocks_attn, g_all).transpose(1, 2)
        attn, mlp = both[:, :-1], both[:, -1:]
        if own_heads is not None:  # sequential blocks: the MLP also reads this layer's heads
            mlp = torch.cat([mlp, contract([own_heads], g_mlp.unsqueeze(0)).transpose(1, 2)], 2)
        if fixed is not None:
            q_fix, k_fix = fixed[i]
            attn[:, :n_q] = q_fix
            attn[:, n_q : n_q + n_kv] = k_fix
        values[sid] = {"attn": attn, "mlp": mlp}
        if continue_below:
            resid = sites["resid"]
            g_copies = g_all[:-1].sum(0).to(resid.device)
            below[sid] = streams[sid].to(resid.device) + g_mlp.to(resid.device) + g_copies
    return values, below


def backward_chain(chunk, metric, layer_sites, ups):
    """Walk the layers top-down (see the module docstring): per-pair edge values.

    Returns ``{"est": [B, n_edges]}`` (signed; the undropped backward, QK-fixed where asked)
    and, with GradDrop, ``"gd"`` (``Σ_ℓ |Î_ℓ| / n_terms`` per edge, as for nodes: the drops
    below a downstream input leave it unchanged, its own layer's drop zeroes it, each drop
    above it is one stream; ``L - 1`` terms for block inputs, ``L`` for the logits). CPU.
    """
    adapter = chunk["adapter"]
    n_layers = adapter.n_layers
    graddrop = chunk["graddrop"]
    top = layer_sites[n_layers - 1]["out"]
    (g_top,) = torch.autograd.grad(metric.sum(), [top])
    logits = contract(ups, g_top.unsqueeze(0)).transpose(1, 2)
    pieces = {n_layers: logits}
    gd_pieces = {n_layers: logits.abs()}
    streams = {FULL: g_top}
    full_above = None
    for layer in reversed(range(n_layers)):
        if graddrop and full_above is not None:
            streams[layer + 1] = full_above
        sites = layer_sites.pop(layer)
        values, below = layer_step(chunk, layer, sites, streams, ups, layer > 0)
        pieces[layer] = values[FULL]
        if graddrop:
            gd_pieces[layer] = {
                part: (
                    values[FULL][part].abs() * layer
                    + sum(v[part].abs() for sid, v in values.items() if sid != FULL)
                )
                / (n_layers - 1)
                for part in ("attn", "mlp")
            }
            full_above = streams[FULL]
        streams = below
        del sites, values
    out = {"est": _flatten(pieces, n_layers)}
    if graddrop:
        out["gd"] = _flatten(gd_pieces, n_layers)
    return out


def _flatten(pieces, n_layers):
    """``[B, n_edges]`` in flat edge order from per-layer ``[B, downstream, upstream]`` parts."""
    parts = []
    for layer in range(n_layers):
        parts.append(pieces[layer]["attn"].flatten(1))
        parts.append(pieces[layer]["mlp"].flatten(1))
    parts.append(pieces[n_layers].flatten(1))
    return torch.cat(parts, dim=1)
