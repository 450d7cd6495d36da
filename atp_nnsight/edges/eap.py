"""EAP with the AtP* fixes: ``eap``, ``eap+qk``, ``eap+gd``, ``eap*`` (one nnsight session per
chunk of pairs; runs remotely unchanged).

Per pair (noising: base = clean, source = noise; denoising swaps them), for edge ``u -> v``:

* **EAP** (Syed et al. 2023): ``Î(u -> v) = Δu · ∂M/∂x_v`` with ``Δu = u(source) - u(base)``
  and ``x_v`` *v's own copy* of the residual stream (the input of the norm in front of ``v``),
  the norm linearised: two forwards and one backward.
* **QK fix** (``eap+qk``): for edges into a query or key, ``u``'s change shifts that head's
  query (key) exactly through the norm, the projection and rotary, and the attention softmax
  is recomputed exactly (all positions at once; the key fix summed over the group's query
  heads); only what follows the attention probabilities is linearised:
  ``Î = Σ_{t,s} (A' - A)[t, s] · ∂M/∂A[t, s]``.
* **GradDrop** (``eap+gd``): per dropped layer ℓ, the gradient through layer ℓ's residual write
  is removed (the skip path carries it); per pair ``Σ_ℓ |Î_ℓ| / (L - 1)`` for edges into a
  block input (the own-layer term is zero, the layers below leave ``Î`` unchanged) and ``/ L``
  for edges into the logits, so an edge no drop changes scores exactly ``|Î|``.
* ``eap*`` = QK fix + GradDrop.
"""

from __future__ import annotations

from atp_nnsight.edges.chain import backward_chain, collect_layer, source_pass
from atp_nnsight.methods.common import metric_values


def _require_grad(resid, handle):
    """Start the graph at layer 0's input (NDIF loads frozen weights)."""
    if not resid.requires_grad:
        resid.requires_grad_(True)
    return resid


def base_pass(model, chunk, base_ids, source, on_input):
    """Read every layer of the base run and compute the upstream writes ``Δu`` on the way.

    Returns ``(layer sites, upstream writes)``; ``source`` (from ``source_pass``) is emptied.
    """
    layer_sites, ups = {}, []
    for layer in range(chunk["adapter"].n_layers):
        kept = source.pop(layer)
        sites = collect_layer(model, chunk, layer, on_input if layer == 0 else None, kept)
        if layer == 0:
            ups.append((kept["resid"] - sites["resid"].detach()).unsqueeze(1))
        ups.append(sites.pop("up"))
        layer_sites[layer] = sites
    return layer_sites, ups


def eap_body(model, chunk):
    """One session: source forward, base forward, backward chain. CPU tensors out: ``est``
    (and ``gd``) ``[n, edges]``, ``metric`` and ``source_metric`` ``[n]``."""
    base_ids, source_ids, clean_target, noise_target = chunk["roles"]
    source, source_metric = source_pass(model, chunk, source_ids, clean_target, noise_target)
    with model.trace(base_ids, **chunk["forward"]):
        layer_sites, ups = base_pass(model, chunk, base_ids, source, _require_grad)
        logits = model.output.logits
        metric = metric_values(chunk["metric"], logits, clean_target, noise_target)
        out = backward_chain(chunk, metric, layer_sites, ups)
        out["metric"] = metric.detach().cpu()
        out["source_metric"] = source_metric
        del layer_sites, ups
    return out


def cost_per_pair(n_layers: int, graddrop: bool) -> float:
    """Forward-pass equivalents per pair: 2 forwards + 1 backward (``L`` with GradDrop)."""
    return 2 + 2 * (n_layers if graddrop else 1)
