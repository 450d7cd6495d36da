"""Faithfulness of circuits (MIB's circuit-localisation metrics) by exact edge patching.

A circuit ``C`` runs with every edge *not* in ``C`` patched (set patching,
:mod:`atp_nnsight.edges.exact`: noising patches the noise values into the clean run), so
``M(C)`` is the metric of the clean run with only the circuit's edges carrying clean values.
``M(∅)`` patches every edge (it equals the noise run's metric) and ``M(full)`` patches none
(the clean run). With ``M`` averaged over pairs (MIB's convention)::

    f(C) = (M(C) - M(∅)) / (M(full) - M(∅))

The curve is ``f`` of the circuits chosen from a ranking at sizes of 0.1, 0.2, 0.5, 1, 2, 5,
10, 20 and 50 % of all edges (``int(fraction * n_edges)`` edges, then dangling edges removed,
:func:`atp_nnsight.edges.circuit.prune`), plus the full model at 100 % (f = 1). **CPR** is the
area under ``f`` and **CMD** the area between ``f`` and 1 (``|1 - f|``), both by the
trapezoidal rule over the edge fraction on a linear axis from 0.001 to 1 (as MIB's
``evaluate_area_under_curve``): higher CPR and lower CMD are better.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from atp_nnsight.edges.circuit import Circuit, prune
from atp_nnsight.edges.exact import run_edge_sets
from atp_nnsight.edges.graph import EdgeGraph
from atp_nnsight.edges.results import EdgeAttribution
from atp_nnsight.methods.common import prepare_pairs
from atp_nnsight.metrics import Metric, resolve_metric
from atp_nnsight.remote import Remote

SIZES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
"""Circuit sizes of the curve, as fractions of all edges (MIB's, without the full model)."""


@dataclass
class Faithfulness:
    """Faithfulness of circuits of one ranking (or of one circuit: ``sizes`` is None).

    ``requested``/``kept``: edges asked for and left after pruning, per circuit;
    ``faithfulness``: ``f`` per circuit; ``metric``: ``M(C)`` (mean over pairs) per circuit;
    ``metric_empty``/``metric_full``: ``M(∅)`` and ``M(full)``; ``cpr``/``cmd``: areas over the
    sizes plus the full model (None for a single circuit); ``per_pair``: ``[pairs, circuits]``
    metrics; ``cost``: forward passes.
    """

    sizes: list[float] | None
    requested: list[int]
    kept: list[int]
    faithfulness: list[float]
    metric: list[float]
    metric_empty: float
    metric_full: float
    cpr: float | None
    cmd: float | None
    per_pair: np.ndarray
    cost: float
    info: dict[str, Any] = field(default_factory=dict)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per circuit: ``size, requested, kept, metric, faithfulness``."""
        return pd.DataFrame(
            {
                "size": self.sizes if self.sizes is not None else [np.nan] * len(self.kept),
                "requested": self.requested,
                "kept": self.kept,
                "metric": self.metric,
                "faithfulness": self.faithfulness,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no per-pair values)."""
        return {
            "sizes": self.sizes,
            "requested": self.requested,
            "kept": self.kept,
            "faithfulness": self.faithfulness,
            "metric": self.metric,
            "metric_empty": self.metric_empty,
            "metric_full": self.metric_full,
            "cpr": self.cpr,
            "cmd": self.cmd,
            "cost": self.cost,
            "info": self.info,
        }


def areas(sizes: list[float], faithfulness: list[float]) -> tuple[float, float]:
    """``(CPR, CMD)``: trapezoidal areas under ``f`` and between ``f`` and 1 over ``sizes``
    (edge fractions, increasing), with the full model (size 1, f = 1) appended."""
    x = np.array([*sizes, 1.0], dtype=np.float64)
    f = np.array([*faithfulness, 1.0], dtype=np.float64)
    widths = np.diff(x)
    cpr = float((widths * (f[1:] + f[:-1]) / 2).sum())
    gap = np.abs(1.0 - f)
    cmd = float((widths * (gap[1:] + gap[:-1]) / 2).sum())
    return cpr, cmd


def evaluate_circuit(
    model: Any,
    pairs: Any,
    circuits: EdgeAttribution | Circuit,
    *,
    sizes: tuple[float, ...] = SIZES,
    selection: str = "topk",
    direction: str = "noising",
    metric: str | Metric = "logit-diff",
    batch_size: int | None = None,
    memory_gb: float = 2.0,
    prepend_bos: bool = False,
    remote: Remote = False,
    progress: bool = True,
    checkpoint_dir: Any = None,
) -> Faithfulness:
    """Faithfulness of one :class:`Circuit`, or the curve (with CPR and CMD) of the circuits
    ``prune(result, int(size * n_edges), selection)`` of a ranking at ``sizes``.

    Every circuit, the empty one and the full one are run with exact set patching in the same
    batched forwards (see the module docstring for the definitions).
    """
    graph = EdgeGraph.of(model)
    if isinstance(circuits, Circuit):
        chosen, requested, size_list = [circuits], [len(circuits)], None
    elif isinstance(circuits, EdgeAttribution):
        if any(not 0 < s < 1 for s in sizes) or list(sizes) != sorted(sizes):
            raise ValueError(f"sizes must be increasing fractions in (0, 1), got {sizes}")
        size_list = [float(s) for s in sizes]
        requested = [int(s * graph.n_edges) for s in size_list]
        chosen = [prune(circuits, k, selection) for k in requested]
    else:
        raise TypeError(
            f"circuits must be an EdgeAttribution or a Circuit, got {type(circuits).__name__}"
        )
    for c in chosen:
        if c.graph.n_edges != graph.n_edges:
            raise ValueError("the circuit belongs to another model's edge graph")
    masks = np.stack(
        [~c.mask() for c in chosen]
        + [np.ones(graph.n_edges, dtype=bool), np.zeros(graph.n_edges, dtype=bool)]
    )
    tok = prepare_pairs(model, pairs, prepend_bos)
    effects, base, _, cost = run_edge_sets(
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
    values = base[:, None] + effects  # [pairs, circuits + 2]
    mean = values.mean(0)
    empty, full = float(mean[-2]), float(mean[-1])
    if abs(full - empty) < 1e-9:
        raise ValueError(
            "M(full) equals M(empty): the clean and noise runs give the same metric, so "
            "faithfulness is undefined; use pairs on which the behaviour differs"
        )
    f = [(float(m) - empty) / (full - empty) for m in mean[:-2]]
    cpr, cmd = areas(size_list, f) if size_list is not None else (None, None)
    return Faithfulness(
        sizes=size_list,
        requested=requested,
        kept=[len(c) for c in chosen],
        faithfulness=f,
        metric=[float(m) for m in mean[:-2]],
        metric_empty=empty,
        metric_full=full,
        cpr=cpr,
        cmd=cmd,
        per_pair=values,
        cost=cost,
        info={
            "method": chosen[0].info.get("method"),
            "selection": selection,
            "direction": direction,
            "n_edges": graph.n_edges,
        },
    )
