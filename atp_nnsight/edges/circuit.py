"""Circuits: sets of edges chosen from an edge ranking, pruned of dangling parts, exported.

**Nodes of a circuit.** The upstream nodes (``input``, ``a{l}.h{h}``, ``m{l}``) and the logits.
An edge into a head's ``q`` input is received by that head; an edge into a KV head's ``k`` or
``v`` input is received by every query head of its group; an edge into ``m{l}``'s input by that
MLP; an edge into the logits by ``logits``.

**Selection** (:func:`prune`): ``topk`` keeps the ``k`` best-scoring edges; ``greedy`` (EAP-IG's
``apply_greedy``) starts from the logits and repeatedly adds the best-scoring edge received by
a node already in the circuit, so every chosen edge is connected to the logits.

**Dangling parts** are then removed until none is left: an edge whose upstream node receives
no circuit edge (and is not ``input``), or whose receivers send no circuit edge (and are not
the logits). Removing them does not change what the circuit computes under edge patching: a
node receiving only patched edges computes its source value, which is exactly what its
patched outgoing edges carry; a node sending no circuit edge is never read.
"""

from __future__ import annotations

import heapq
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atp_nnsight.edges.graph import EdgeGraph
from atp_nnsight.edges.results import EdgeAttribution, edge_names
from atp_nnsight.results import atomic_paths

SELECTIONS = ("topk", "greedy")


def edge_receivers(graph: EdgeGraph) -> np.ndarray:
    """Per edge, the node ids receiving it, ``[n_edges, group]`` padded with -1.

    Node ids: the upstream order (``input`` = 0, then per layer its heads and its MLP), and
    ``n_upstream`` for the logits."""
    down = graph.downstream_table()
    group = graph.n_heads // graph.n_kv_heads
    per_layer = graph.per_layer_upstream
    table = np.full((len(down), group), -1, dtype=np.int64)
    rows = zip(down["input"], down["layer"], down["index"], strict=True)
    for i, (kind, layer, index) in enumerate(rows):
        first = 1 + layer * per_layer
        if kind == "q":
            table[i, 0] = first + index
        elif kind in ("k", "v"):
            table[i] = first + index * group + np.arange(group)
        elif kind == "mlp":
            table[i, 0] = first + graph.n_heads
        else:
            table[i, 0] = graph.n_upstream
    _, down_idx = graph.edge_ends()
    return table[down_idx]


def _remove_dangling(graph: EdgeGraph, keep: np.ndarray) -> np.ndarray:
    """``keep`` without its dangling edges (module docstring), to a fixed point."""
    up_idx, _ = graph.edge_ends()
    receivers = edge_receivers(graph)
    n_nodes = graph.n_upstream + 1
    keep = keep.copy()
    while True:
        has_in = np.zeros(n_nodes + 1, dtype=bool)  # the last slot absorbs the -1 padding
        has_in[receivers[keep].ravel()] = True
        has_in[0] = True
        has_out = np.zeros(n_nodes + 1, dtype=bool)
        has_out[up_idx[keep]] = True
        has_out[graph.n_upstream] = True
        has_out[-1] = False
        alive = keep & has_in[up_idx] & has_out[receivers].any(1)
        if (alive == keep).all():
            return keep
        keep = alive


def _greedy(graph: EdgeGraph, scores: np.ndarray, k: int) -> np.ndarray:
    """EAP-IG's greedy selection (module docstring): a bool mask of ``k`` edges."""
    up_idx, _ = graph.edge_ends()
    receivers = edge_receivers(graph)
    into: dict[int, list[int]] = {}
    for edge, nodes in enumerate(receivers):
        for node in nodes[nodes >= 0]:
            into.setdefault(int(node), []).append(edge)
    chosen = np.zeros(len(scores), dtype=bool)
    in_circuit = {graph.n_upstream}
    heap = [(-float(scores[e]), e) for e in into.get(graph.n_upstream, [])]
    heapq.heapify(heap)
    count = 0
    while heap and count < k:
        _, edge = heapq.heappop(heap)
        if chosen[edge]:
            continue
        chosen[edge] = True
        count += 1
        node = int(up_idx[edge])
        if node not in in_circuit:
            in_circuit.add(node)
            for e in into.get(node, []):
                if not chosen[e]:
                    heapq.heappush(heap, (-float(scores[e]), e))
    return chosen


class Circuit:
    """Edges of one model's edge graph with their scores (see the module docstring).

    ``edges``: flat edge indices (sorted); ``scores``: the ranking score of each; ``graph``:
    the edge graph (shape only is needed); ``info``: how it was chosen (method, selection,
    requested size).
    """

    def __init__(
        self, graph: EdgeGraph, edges: np.ndarray, scores: np.ndarray, info: dict | None = None
    ) -> None:
        order = np.argsort(edges, kind="stable")
        self.graph = graph
        self.edges = np.asarray(edges, dtype=np.int64)[order]
        self.scores = np.asarray(scores, dtype=np.float64)[order]
        self.info = dict(info or {})

    def __len__(self) -> int:
        return len(self.edges)

    def __repr__(self) -> str:
        return f"Circuit({len(self)} edges, {len(self.nodes())} nodes, {self.info})"

    def mask(self) -> np.ndarray:
        """Bool over all edges of the graph: True for the circuit's edges."""
        out = np.zeros(self.graph.n_edges, dtype=bool)
        out[self.edges] = True
        return out

    def table(self) -> pd.DataFrame:
        """One row per circuit edge: the edge table plus ``name``, ``receivers`` and ``score``."""
        table = self.graph.edge_table().iloc[self.edges].reset_index(drop=True)
        table.insert(0, "name", edge_names(table))
        names = self.node_names()
        receivers = edge_receivers(self.graph)[self.edges]
        table["receivers"] = [[names[r] for r in row if r >= 0] for row in receivers]
        table["score"] = self.scores
        return table

    def node_names(self) -> list[str]:
        """Every node name of the graph by node id (upstream order, then the logits)."""
        return [*self.graph.upstream_table()["name"], "logits"]

    def nodes(self) -> list[str]:
        """Names of the nodes the circuit's edges connect, in graph order."""
        up_idx, _ = self.graph.edge_ends()
        ids = set(up_idx[self.edges].tolist())
        ids |= {int(r) for r in edge_receivers(self.graph)[self.edges].ravel() if r >= 0}
        names = self.node_names()
        return [names[i] for i in sorted(ids)]

    def to_dict(self) -> dict[str, Any]:
        """``{"graph", "info", "nodes", "edges"}``; each edge with its upstream node, the
        downstream input and kind, receivers, flat index and score."""
        up = self.graph.upstream_table().set_index("name")
        nodes = []
        for name in self.nodes():
            if name == "logits":
                nodes.append({"name": name, "kind": "logits", "layer": self.graph.n_layers})
            else:
                row = up.loc[name]
                nodes.append(
                    {
                        "name": name,
                        "kind": str(row["kind"]),
                        "layer": int(row["layer"]),
                        "index": int(row["index"]),
                    }
                )
        edges = [
            {
                "name": str(r["name"]),
                "edge": int(r["edge"]),
                "upstream": str(r["upstream"]),
                "downstream": str(r["downstream"]),
                "input": str(r["input"]),
                "receivers": list(r["receivers"]),
                "score": float(r["score"]),
            }
            for _, r in self.table().iterrows()
        ]
        return {"graph": self.graph.describe(), "info": self.info, "nodes": nodes, "edges": edges}

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON (atomically)."""
        path = Path(path)
        with atomic_paths(path) as (tmp,):
            tmp.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> Circuit:
        data = json.loads(Path(path).read_text())
        graph = EdgeGraph.from_metadata(data["graph"])
        edges = np.array([e["edge"] for e in data["edges"]], dtype=np.int64)
        scores = np.array([e["score"] for e in data["edges"]], dtype=np.float64)
        return cls(graph, edges, scores, data.get("info"))


def prune(result: EdgeAttribution, k: int, selection: str = "topk") -> Circuit:
    """The circuit of ``k`` edges chosen from ``result``'s ranking by ``selection`` (topk or
    greedy), with dangling edges removed (so it may hold fewer than ``k``)."""
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; choose from {', '.join(SELECTIONS)}")
    graph = EdgeGraph.from_metadata(result.metadata)
    if len(result) != graph.n_edges or not (result.edges["edge"] == np.arange(len(result))).all():
        raise ValueError(
            "prune needs a ranking of every edge of the graph (a result of attribute_edges, "
            "or patch_edges over all edges)"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= len(result):
        raise ValueError(f"k must be an edge count in 0-{len(result)}, got {k!r}")
    if selection == "topk":
        keep = np.zeros(len(result), dtype=bool)
        keep[result.ranking()[: int(k)]] = True
    else:
        keep = _greedy(graph, result.scores, int(k))
    keep = _remove_dangling(graph, keep)
    edges = np.flatnonzero(keep)
    info = {"method": result.method, "selection": selection, "requested": int(k)}
    return Circuit(graph, edges, result.scores[edges], info)
