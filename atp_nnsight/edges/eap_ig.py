"""EAP-IG with integrated gradients over the inputs (Hanna et al. 2024; "EAP-IG-inputs", the
variant the EAP-IG README recommends): ``eap-ig``.

Per pair and edge ``u -> v``: ``Î(u -> v) = Δu · (1/m) Σ_{k=1..m} ∂M/∂x_v |_{α_k}`` with
``α_k = k/m``, ``Δu = u(source) - u(base)`` from the two real runs, and the gradient taken on
the base prompt with the residual stream entering layer 0 (token plus position embeddings)
replaced by ``source_emb + α (base_emb - source_emb)``: ``α = 1`` is the base run itself (a
right Riemann sum, as EAP-IG does). Cost per pair: ``1 + m`` forwards and ``m`` backwards.
"""

from __future__ import annotations

from atp_nnsight.edges.chain import backward_chain, collect_layer, source_pass
from atp_nnsight.edges.eap import _require_grad, base_pass
from atp_nnsight.methods.common import metric_values


def _interpolate(delta, alpha):
    """``on_input`` replacing layer 0's input by ``base + (1 - α) Δemb`` (a fresh leaf)."""

    def replace(resid, handle):
        moved = resid.detach() + (1.0 - alpha) * delta.to(resid.device, resid.dtype)
        moved.requires_grad_(True)
        handle.input = moved
        return moved

    return replace


def eap_ig_body(model, chunk):
    """One session: source forward, then ``m`` base forwards + backwards along the path (the
    first at ``α = 1`` also computes ``Δu``). CPU tensors out as ``eap_body``."""
    base_ids, source_ids, clean_target, noise_target = chunk["roles"]
    n_steps = chunk["ig_steps"]
    n_layers = chunk["adapter"].n_layers
    source, source_metric = source_pass(model, chunk, source_ids, clean_target, noise_target)
    total, ups, base_metric = None, None, None
    for k in range(n_steps, 0, -1):
        with model.trace(base_ids, **chunk["forward"]):
            if ups is None:
                layer_sites, ups = base_pass(model, chunk, base_ids, source, _require_grad)
            else:
                shift = _interpolate(ups[0].squeeze(1), k / n_steps)
                layer_sites = {
                    layer: collect_layer(model, chunk, layer, shift if layer == 0 else None)
                    for layer in range(n_layers)
                }
            logits = model.output.logits
            metric = metric_values(chunk["metric"], logits, clean_target, noise_target)
            est = backward_chain(chunk, metric, layer_sites, ups)["est"]
            if base_metric is None:
                base_metric = metric.detach().cpu()
            total = est if total is None else total + est
            del layer_sites, logits, metric  # not held through the next step's forward
    return {"est": total / n_steps, "metric": base_metric, "source_metric": source_metric}


def cost_per_pair(n_steps: int) -> float:
    """Forward-pass equivalents per pair: ``1 + m`` forwards and ``m`` backwards."""
    return 1 + 3 * n_steps
