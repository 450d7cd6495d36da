"""``attribute_edges``: every edge's patching effect estimated by one of the edge methods.

``METHODS`` maps a method name to its session body and flags; every body has the signature
``body(model, chunk) -> {"est", ["gd"], "metric", "source_metric"}`` and runs in one nnsight
session per chunk of pairs (``remote=`` as for the node methods).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from atp_nnsight.edges import eap, eap_ig
from atp_nnsight.edges.graph import EdgeGraph
from atp_nnsight.edges.results import EdgeAttribution
from atp_nnsight.edges.sites import per_head_projections
from atp_nnsight.methods.atp import gather_estimates
from atp_nnsight.methods.common import forward_kwargs, model_name, prepare_pairs, roles_of
from atp_nnsight.metrics import Metric, resolve_metric
from atp_nnsight.remote import Remote, run_chunks
from atp_nnsight.types import check_direction

QK_BYTES = (2**22, 2**28)
"""Bounds (bytes) of the default budget of the edge QK fix's temporaries (per chunk of
upstream nodes): sixteen float32 residual-stream-sized tensors of the chunk of pairs, so the
fix never dominates the activations."""


def qk_budget(n_pairs: int, seq_len: int, d_model: int) -> int:
    """The default memory budget of the edge QK fix for a chunk of pairs (see ``QK_BYTES``)."""
    low, high = QK_BYTES
    return int(min(high, max(low, 16 * 4 * n_pairs * seq_len * d_model)))


METHODS: dict[str, dict[str, bool]] = {
    "eap": {"qk": False, "graddrop": False, "ig": False},
    "eap+qk": {"qk": True, "graddrop": False, "ig": False},
    "eap+gd": {"qk": False, "graddrop": True, "ig": False},
    "eap*": {"qk": True, "graddrop": True, "ig": False},
    "eap-ig": {"qk": False, "graddrop": False, "ig": True},
}
"""Edge method name → flags (QK fix, GradDrop, integrated gradients over the inputs)."""


def attribute_edges(
    model: Any,
    pairs: Any,
    method: str = "eap",
    *,
    ig_steps: int = 5,
    direction: str = "noising",
    metric: str | Metric = "logit-diff",
    pairs_per_chunk: int = 8,
    qk_chunk_bytes: int | None = None,
    prepend_bos: bool = False,
    remote: Remote = False,
    progress: bool = True,
    checkpoint_dir: Any = None,
) -> EdgeAttribution:
    """Estimate every edge's effect with ``method`` (eap, eap+qk, eap+gd, eap*, eap-ig).

    Edges are summed over positions (see :mod:`atp_nnsight.edges.graph` for the graph and
    :mod:`atp_nnsight.edges.eap` / :mod:`atp_nnsight.edges.eap_ig` for the estimates).
    Ranking: ``mean_pairs |Î|`` (``mean_pairs`` of the per-pair GradDrop score for eap+gd and
    eap*, whose ``mean_effect`` is None). ``ig_steps``: EAP-IG's number of gradient steps.
    ``pairs_per_chunk`` pairs (of one token length) share each session; lower it to reduce
    memory. ``qk_chunk_bytes`` bounds the QK fix's temporaries (default: :func:`qk_budget`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown edge method {method!r}; choose from {', '.join(METHODS)}")
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise ValueError(f"ig_steps must be a positive integer, got {ig_steps!r}")
    check_direction(direction)
    flags = METHODS[method]
    graph = EdgeGraph.of(model)
    if flags["graddrop"] and graph.n_layers < 2:
        raise ValueError("GradDrop needs a model with at least 2 layers")
    tok = prepare_pairs(model, pairs, prepend_bos)
    metric_name, metric_fn = resolve_metric(metric)
    groups = tok.chunks(pairs_per_chunk)
    chunks = [
        {
            "adapter": graph.adapter,
            "graph": graph.chunk_info(),
            "roles": roles_of(g, direction),
            "metric": metric_fn,
            "forward": forward_kwargs(metric_fn),
            "qk": flags["qk"],
            "graddrop": flags["graddrop"],
            "ig_steps": int(ig_steps),
            "qk_bytes": int(
                qk_chunk_bytes or qk_budget(len(g.indices), g.length, graph.adapter.d_model)
            ),
            "projections": per_head_projections(
                graph.adapter,
                (graph.n_layers + 1) // 2 if flags["graddrop"] else 1,  # streams per layer
                len(g.indices),
                g.length,
            ),
        }
        for g in groups
    ]
    body = eap_ig.eap_ig_body if flags["ig"] else eap.eap_body
    outs = run_chunks(
        model,
        chunks,
        body,
        remote=remote,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        desc=method,
    )
    n = len(tok)
    est, gd, base_metric, source_metric = gather_estimates(
        groups, outs, n, graph.n_edges, flags["graddrop"]
    )
    per_pair = gd if gd is not None else est
    if flags["ig"]:
        cost = eap_ig.cost_per_pair(ig_steps)
    else:
        cost = eap.cost_per_pair(graph.n_layers, flags["graddrop"])
    return EdgeAttribution(
        edges=graph.edge_table(),
        scores=np.abs(per_pair).mean(0),
        per_pair=per_pair,
        mean_effect=None if gd is not None else est.mean(0),
        method=method,
        direction=direction,
        metric=metric_name,
        model=model_name(model),
        cost=float(cost * n),
        pairs=[p.__dict__ for p in tok.pairs],
        metadata={
            "base_metric": base_metric.tolist(),
            "source_metric": source_metric.tolist(),
            "ig_steps": int(ig_steps) if flags["ig"] else None,
            **graph.describe(),
        },
    )
