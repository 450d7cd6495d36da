"""Per-layer pieces of the edge methods that run inside nnsight traces (locally or on NDIF).

Plain, source-backed torch code: no dataclasses, no imports beyond torch and functions of this
package, no parameter reads (modules are called instead: the output projection for per-head
writes, the input norms on shifted residual copies). Shapes: ``B`` rows, ``T`` positions, ``d``
the residual width; q/k/v as the attention call receives them, ``[B, heads, T, D]``.

* :func:`iter_sites` reads one layer's sites in forward order (the graph's ``info`` dict says
  which norms sit in front of the attention and the MLP).
* :func:`head_writes` turns a change of the per-head outputs ``Δz`` into each head's change of
  its residual write, ``W_O[:, h] Δz_h``, by calling the output projection on ``H`` masked
  copies, or on the identity to read off ``W_O`` when that is cheaper (the bias cancels).
* :func:`copy_grads` gives every attention input's *own* gradient at the residual copy it reads
  (before the norm), from the gradients at the attention call: per-head-masked gradients
  stacked on a leading axis and pushed back with batched VJPs (``is_grads_batched``) through
  the projections and then the norm, a few heads at a time.
* :func:`shifted_call` gives the exact q/k/v the attention call would receive if each of ``P``
  residual copies were shifted: the input norm is called on the shifted copies, and the
  affine map from the norm's output to the call (projections, head split, rotary) is applied
  with a Jacobian-vector product through the recorded graph, exact because that map is
  affine; query/key norms (Qwen3, OLMoE) are called as modules in between.
* :func:`contract` reduces upstream writes against downstream gradients to per-pair edge
  values on each write's own device and moves only those to the CPU.
"""

from __future__ import annotations

import torch

KINDS = ("q", "k", "v")


def iter_sites(model, adapter, info, layer, last, projections=None):
    """Yield ``(name, value, handle)`` for ``layer``'s sites in forward order (inside a trace).

    Names: ``resid`` (layer input, the attention's residual copy; handle: the layer),
    ``attn_in`` (attention input = the attention norm's output; handle: the attention module),
    ``proj`` (``(name, output)`` of each q/k/v projection in ``projections``, a subset of
    ``Adapter.projections``; handle: the projection), ``q_norm``/``k_norm`` (``(input,
    output)`` of the query/key norm, families with one),
    ``call`` (the attention call dict of ``Adapter.iter_layer``; handle: its source op),
    ``z`` (per-head outputs, the output projection's input), ``attn_out`` (the attention's
    residual write), ``mlp_copy`` (the MLP norm's
    input: the MLP's residual copy), ``mlp_in`` (the MLP input; handle: the MLP module),
    ``mlp_out`` (the MLP's residual write) and, for the ``last`` layer, ``out`` (its output).
    The model advances only when the next item is requested, so a consumer may replace a
    site (through its handle) before the forward moves on.
    """
    block = adapter.layer(model, layer)
    attn = getattr(block, adapter.attn)
    mlp = getattr(block, adapter.mlp)
    op = adapter.attention_source_op(model, layer)  # instrument before the attention runs
    kinds = ("resid", "head", "attn_out", "mlp_out")
    items = adapter.iter_layer(model, layer, kinds, attention=True)
    _, resid = next(items)
    yield "resid", resid, block
    yield "attn_in", attn.input, attn
    norms = dict(zip(("q", "k"), info["qk_norms"] or (), strict=False))
    read = set()
    for kind in KINDS:  # projections and query/key norms run in this order in every family
        spec = (projections or {}).get(kind)
        if spec is not None and spec[0] not in read:
            read.add(spec[0])
            proj = getattr(attn, spec[0])
            yield "proj", (spec[0], proj.output), proj
        if kind in norms:
            norm = getattr(attn, norms[kind])
            yield kind + "_norm", (norm.input, norm.output), norm
    _, call = next(items)
    yield "call", call, op
    _, z = next(items)
    yield "z", z, attn
    _, attn_out = next(items)
    yield "attn_out", attn_out, attn
    if info["shared_norm"]:
        mlp_copy = resid
    else:
        mlp_copy = getattr(block, info["mlp_norm"]).input
    yield "mlp_copy", mlp_copy, None
    yield "mlp_in", mlp.input, mlp
    _, write = next(items)
    yield "mlp_out", write, mlp
    if last:
        yield "out", block.output, block


def cut_call(op, first, call):
    """Feed the attention call detached copies of its q, k, v that require grad (returned as
    ``{kind: leaf}``): the forward is unchanged, but the graph of everything after the call
    starts at these leaves, so a backward to them never runs into the projections (whose
    graph ends at the call's original q, k, v, kept for the per-head VJPs)."""
    args, kwargs = op.inputs
    args = list(args)
    leaves = {}
    for i, kind in enumerate(KINDS):
        leaf = call[kind].detach().requires_grad_(True)
        args[first + i] = leaf
        leaves[kind] = leaf
    op.inputs = (tuple(args), kwargs)
    return leaves


def head_writes(out_proj, delta_z, n_heads):
    """Each head's change of its residual write: ``[B, H, T, d]`` for ``Δz`` ``[B, T, H*D]``.

    ``W_O[:, h] Δz_h`` for every head ``h``, from module calls only (the bias cancels): either
    the output projection applied to ``H`` masked copies of ``Δz`` (``H`` times its cost), or,
    when cheaper (``H*D + B*T < H*B*T``), applied to the identity to read off ``W_O`` and a
    per-head product. No gradient.
    """
    b, t, width = delta_z.shape
    d_head = width // n_heads
    with torch.no_grad():
        zero = out_proj(delta_z.new_zeros(1, width))
        if width + b * t < n_heads * b * t:
            eye = torch.eye(width, device=delta_z.device, dtype=delta_z.dtype)
            w = (out_proj(eye) - zero).reshape(n_heads, d_head, -1)  # [H, D, d]
            z = delta_z.reshape(b * t, n_heads, d_head).transpose(0, 1)  # [H, B*T, D]
            return torch.bmm(z, w.to(z.dtype)).reshape(n_heads, b, t, -1).transpose(0, 1)
        eye = torch.eye(n_heads, device=delta_z.device, dtype=delta_z.dtype)
        masked = delta_z.reshape(b, 1, t, n_heads, d_head) * eye.reshape(1, n_heads, 1, n_heads, 1)
        return out_proj(masked.reshape(b, n_heads, t, width)) - zero


GROUP = 16
"""Attention inputs of one kind whose own gradients are pushed back together (through the
projection and the norm): bounds :func:`copy_grads`' temporaries to a few
residual-stream-sized tensors per member, whatever the number of heads."""


def _per_unit(grad, units):
    """``[len(units), B, n, T, D]``: ``grad`` ``[B, n, T, D]``, all but unit ``units[i]``
    zeroed in entry ``i``."""
    eye = torch.eye(grad.shape[1], device=grad.device, dtype=grad.dtype)[list(units)]
    return grad.unsqueeze(0) * eye.reshape(len(units), 1, grad.shape[1], 1, 1)


def _columns(spec, n_units, d_head, device):
    """Output columns of a projection holding units ``0..n_units-1``: ``[n_units, d_head]``."""
    _, start, stride = spec
    units = torch.arange(n_units, device=device).unsqueeze(1) * stride
    return start + units + torch.arange(d_head, device=device)


def _rows(module, like, columns):
    """Rows ``columns`` (``[n, D]``) of the projection's weight as ``[n, D, d]``: VJPs of one
    call on a zero input with one-hot output gradients (the bias drops out; exact in any
    dtype), :data:`GROUP` units at a time."""
    x = like.new_zeros(1, like.shape[-1]).requires_grad_(True)
    with torch.enable_grad():
        y = module(x)
    parts = []
    for u0 in range(0, columns.shape[0], GROUP):
        cols = columns[u0 : u0 + GROUP].flatten()
        onehot = y.new_zeros(cols.numel(), 1, y.shape[-1])
        onehot[torch.arange(cols.numel(), device=cols.device), 0, cols] = 1
        (rows,) = torch.autograd.grad(
            y, x, grad_outputs=onehot, is_grads_batched=True, retain_graph=True
        )
        parts.append(rows.reshape(-1, columns.shape[1], x.shape[-1]))
    return torch.cat(parts)


def _projected(sites, grads, specs):
    """Per kind of ``specs`` (kinds with a head-local projection, see
    ``Adapter.projections``): the gradient at its projection's output, one VJP for all
    kinds, as ``[B, T, n_units, D]``, and the units' weight rows ``[n_units, D, d]`` (read
    once per layer, kept in ``sites["rows"]`` for the other streams)."""
    call, projs = sites["call"], sites["proj"]
    kinds = [kind for kind in KINDS if kind in specs]
    names = list(dict.fromkeys(specs[kind][0] for kind in kinds))
    outputs = [call[kind] for kind in kinds]
    grad_outputs = []
    for kind in kinds:
        grad = grads[KINDS.index(kind)]
        grad_outputs.append(grad if grad is not None else torch.zeros_like(call[kind]))
    at_proj = torch.autograd.grad(
        outputs, [projs[name]["edge"] for name in names], grad_outputs, retain_graph=True
    )
    at_proj = dict(zip(names, at_proj, strict=True))
    rows = sites.setdefault("rows", {})
    out = {}
    for kind in kinds:
        name = specs[kind][0]
        n_units, d_head = call[kind].shape[1], call[kind].shape[3]
        g = at_proj[name]
        columns = _columns(specs[kind], n_units, d_head, g.device)
        if kind not in rows:
            rows[kind] = _rows(projs[name]["module"], sites["attn_in"], columns)
        out[kind] = g[..., columns.flatten()].unflatten(-1, (n_units, d_head))
    return out


def per_head_projections(adapter, n_streams, n_rows, seq_len):
    """The part of ``adapter.projections`` :func:`copy_grads` should push each head through
    its own weight rows: all of it when reading the rows (``head_dim`` VJPs per unit, once
    per layer) costs less than one masked projection backward per unit and stream
    (``n_streams * n_rows * seq_len`` token rows each; ``n_streams``: backward streams per
    layer, on average), else nothing."""
    if adapter.head_dim < n_streams * n_rows * seq_len:
        return dict(adapter.projections)
    return {}


def copy_grads(sites, grads, release, out, specs):
    """Own gradients of every attention input at its residual copy, written into ``out[:N]``
    (``out`` ``[≥ N, B, T, d]``, on the layer input's device).

    ``grads``: gradients at the call's q, k, v (``[B, heads, T, D]``, None for no gradient).
    Order: q per query head, k per KV head, v per KV head; :data:`GROUP` inputs of a kind
    at a time, each batch with one VJP to the residual copy.
    ``specs``: the chunk's :func:`per_head_projections` (read by :func:`iter_sites`); a kind
    there is pushed through its units' own weight rows (one product per unit), the others
    through the whole projection with all but one unit's gradient masked (one projection
    backward per unit). ``release``: the last use of this layer's graph (buffers freed).
    """
    call, attn_in, resid = sites["call"], sites["attn_in"], sites["resid"]
    projected = _projected(sites, grads, specs) if specs else {}
    batches = []
    for i, kind in enumerate(KINDS):
        n_units = call[kind].shape[1]
        batches += [(i, lo, min(lo + GROUP, n_units)) for lo in range(0, n_units, GROUP)]
    row = 0
    for j, (i, lo, hi) in enumerate(batches):
        retain = not (release and j == len(batches) - 1)
        kind = KINDS[i]
        if kind in projected:
            g = projected[kind][:, :, lo:hi].flatten(0, 1).transpose(0, 1)  # [n, B*T, D]
            g = torch.bmm(g, sites["rows"][kind][lo:hi]).unflatten(1, attn_in.shape[:2])
            start = attn_in  # the gradients at the attention input, one per unit
        else:
            grad = grads[i] if grads[i] is not None else torch.zeros_like(call[kind])
            g = _per_unit(grad, range(lo, hi))
            start = call[kind]
        (g,) = torch.autograd.grad(
            start, resid, grad_outputs=g, is_grads_batched=True, retain_graph=retain
        )
        out[row : row + hi - lo] = g.to(out.device)
        row += hi - lo


def vjp(outputs, inputs, grad, release):
    """``torch.autograd.grad`` of one output (None gradients for unused inputs); ``grad=None``
    (nothing flows in) gives None for every input without a backward."""
    if grad is None:
        return [None] * len(inputs)
    return torch.autograd.grad(
        outputs, inputs, grad_outputs=grad, retain_graph=not release, allow_unused=True
    )


def _jvp(outputs, inputs, tangents):
    """``J t`` for each tangent ``t`` of ``tangents`` ``[P, *inputs.shape]`` (``[P,
    *outputs.shape]``), ``J = d outputs / d inputs`` through the recorded graph (a VJP of a
    VJP)."""
    dummy = torch.zeros_like(outputs, requires_grad=True)
    (vjp,) = torch.autograd.grad(outputs, inputs, grad_outputs=dummy, create_graph=True)
    (out,) = torch.autograd.grad(vjp, dummy, grad_outputs=tangents, is_grads_batched=True)
    return out


def shifted_call(sites, shifts, kinds):
    """Exact change of the call's inputs ``kinds`` (of q, k, v) when the attention's residual
    copy moves by each of ``shifts`` ``[P, B, T, d]``: one ``[P, B, heads, T, D]`` per kind.

    ``sites["attn_norm"]`` is the attention's input norm module. The map from the norm's output
    to the call is affine in every supported family except through query/key norms, so it is
    applied as a Jacobian-vector product; query/key norms are called as modules in between.
    """
    resid, attn_in, call = sites["resid"], sites["attn_in"], sites["call"]
    p = shifts.shape[0]
    here = attn_in.device  # the norm's device (the layer input may still be on the one before)
    with torch.no_grad():
        moved = resid.detach().to(here).unsqueeze(0) + shifts.to(here, resid.dtype)
        shifted = sites["attn_norm"](moved.flatten(0, 1))
        delta_in = shifted.unflatten(0, (p, -1)) - attn_in.detach().unsqueeze(0)
    out = []
    for kind in kinds:
        norm = sites.get(kind + "_norm")
        if norm is None:
            out.append(_jvp(call[kind], attn_in, delta_in).to(call[kind].device))
            continue
        norm_in, norm_out = norm
        delta_pre = _jvp(norm_in, attn_in, delta_in).to(norm_in.device)
        with torch.no_grad():
            pre = norm_in.detach().unsqueeze(0) + delta_pre
            post = sites[kind + "_norm_module"](pre.flatten(0, 1)).unflatten(0, (p, -1))
        tangent = post.to(norm_out.device) - norm_out.detach().unsqueeze(0)
        out.append(_jvp(call[kind], norm_out, tangent).to(call[kind].device))
    return tuple(out)


def contract(blocks, grads):
    """Per-pair edge values ``[B, U, N]`` on the CPU: ``Σ_{t,d} write[b,u,t,d] · grad[n,b,t,d]``
    for the upstream writes ``blocks`` (each ``[B, U_i, T, d]``, on its own device, concatenated
    along ``U``) and downstream gradients ``grads`` ``[N, B, T, d]``.

    Each block is reduced on its own device with one batched matrix product in float32
    (autocast off; ``grads`` laid out as ``[B, T*d, N]`` once per device); only the reduced
    values move to the CPU.
    """
    out, laid_out = [], {}
    b, n = grads.shape[1], grads.shape[0]
    for block in blocks:
        g = laid_out.get(block.device)
        if g is None:
            g = grads.to(block.device).float().permute(1, 2, 3, 0).reshape(b, -1, n)
            laid_out[block.device] = g
        w = block.float().reshape(b, block.shape[1], -1)
        with torch.autocast(block.device.type, enabled=False):  # NDIF runs under autocast
            out.append(torch.bmm(w, g).to("cpu"))
    return torch.cat(out, dim=1)
