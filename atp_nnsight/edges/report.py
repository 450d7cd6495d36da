"""Figures and a self-contained HTML report for circuits (plotly, with its JavaScript inlined).

* :func:`circuit_figure`: the circuit as a graph, layers top to bottom (the embeddings at the
  top, the logits at the bottom), heads side by side in their layer's row, each MLP below its
  layer's heads (beside them in parallel blocks), and one line per edge and receiving node,
  its width proportional to the edge's score and its colour naming the input it feeds (q, k,
  v, MLP, logits). Hovering an edge's midpoint shows its name and score.
* :func:`faithfulness_figure`: faithfulness against circuit size (fraction of all edges, log
  axis) for one or more rankings, CPR and CMD in the legend.
* :func:`write_circuit_report`: one HTML file with both figures, a summary and the circuit's
  edges; nothing is loaded from the network.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

from atp_nnsight.edges.circuit import Circuit, edge_receivers
from atp_nnsight.edges.evaluate import Faithfulness
from atp_nnsight.edges.results import EdgeAttribution
from atp_nnsight.results import atomic_paths

INPUT_COLORS = {
    "q": "#1f77b4",
    "k": "#2ca02c",
    "v": "#ff7f0e",
    "mlp": "#9467bd",
    "logits": "#444444",
}
"""Edge colour by the downstream input it feeds."""

WIDTH_BINS = 6
MAX_WIDTH = 8.0


def _positions(circuit: Circuit) -> dict[int, tuple[float, float]]:
    """``node id → (x, y)``: y grows downwards with depth (the y axis is reversed)."""
    g = circuit.graph
    middle = (g.n_heads - 1) / 2
    pos = {0: (middle, -1.0), g.n_upstream: (middle, float(g.n_layers))}
    for layer in range(g.n_layers):
        first = 1 + layer * g.per_layer_upstream
        for h in range(g.n_heads):
            pos[first + h] = (float(h), float(layer))
        if g.parallel:
            pos[first + g.n_heads] = (g.n_heads + 0.5, float(layer))
        else:
            pos[first + g.n_heads] = (middle, layer + 0.5)
    return pos


def circuit_figure(circuit: Circuit, title: str = "Circuit") -> go.Figure:
    """The circuit as a graph (see the module docstring)."""
    g = circuit.graph
    pos = _positions(circuit)
    names = circuit.node_names()
    up_idx, _ = g.edge_ends()
    receivers = edge_receivers(g)[circuit.edges]
    inputs = g.edge_table()["input"].to_numpy()[circuit.edges]
    scores = circuit.scores
    top = float(scores.max()) if len(scores) and scores.max() > 0 else 1.0
    bins = np.minimum((scores / top * WIDTH_BINS).astype(int), WIDTH_BINS - 1)
    fig = go.Figure()
    shown_kinds: set[str] = set()
    for kind, color in INPUT_COLORS.items():
        for b in range(WIDTH_BINS):
            pick = np.flatnonzero((inputs == kind) & (bins == b))
            if not len(pick):
                continue
            xs: list[float | None] = []
            ys: list[float | None] = []
            for i in pick:
                x0, y0 = pos[int(up_idx[circuit.edges[i]])]
                for r in receivers[i][receivers[i] >= 0]:
                    x1, y1 = pos[int(r)]
                    xs += [x0, x1, None]
                    ys += [y0, y1, None]
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines",
                    line=dict(color=color, width=1 + MAX_WIDTH * (b + 1) / WIDTH_BINS),
                    opacity=0.6,
                    hoverinfo="skip",
                    name=kind,
                    legendgroup=kind,
                    showlegend=kind not in shown_kinds,
                )
            )
            shown_kinds.add(kind)
    mid_x, mid_y, labels = [], [], []
    table = circuit.table()
    for i, row in enumerate(table.itertuples()):
        x0, y0 = pos[int(up_idx[circuit.edges[i]])]
        first = int(receivers[i][0])
        x1, y1 = pos[first]
        mid_x.append((x0 + x1) / 2)
        mid_y.append((y0 + y1) / 2)
        labels.append(f"{html.escape(row.name)}<br>score {row.score:.4g}")
    fig.add_trace(
        go.Scatter(
            x=mid_x,
            y=mid_y,
            mode="markers",
            marker=dict(size=6, opacity=0),
            hovertemplate="%{text}<extra></extra>",
            text=labels,
            showlegend=False,
        )
    )
    node_ids = sorted(
        {int(up_idx[e]) for e in circuit.edges} | {int(r) for r in receivers.ravel() if r >= 0}
    )
    fig.add_trace(
        go.Scatter(
            x=[pos[n][0] for n in node_ids],
            y=[pos[n][1] for n in node_ids],
            mode="markers+text",
            text=[names[n] for n in node_ids],
            textposition="top center",
            marker=dict(size=11, color="#ffffff", line=dict(color="#333333", width=1.5)),
            hovertemplate="%{text}<extra></extra>",
            showlegend=False,
        )
    )
    fig.update_yaxes(
        autorange="reversed",
        title="layer",
        tickvals=list(range(-1, g.n_layers + 1)),
        ticktext=["emb", *[str(i) for i in range(g.n_layers)], "logits"],
        zeroline=False,
    )
    fig.update_xaxes(title="head", zeroline=False, showgrid=False)
    fig.update_layout(
        title=f"{html.escape(title)} ({len(circuit)} edges; width ∝ score)",
        height=max(420, 60 * (g.n_layers + 2)),
        template="plotly_white",
        legend_title="input",
    )
    return fig


def faithfulness_figure(curves: Mapping[str, Faithfulness]) -> go.Figure:
    """Faithfulness against circuit size for each named curve (CPR and CMD in the legend)."""
    fig = go.Figure()
    for name, curve in curves.items():
        if curve.sizes is None:
            raise ValueError(f"{name!r} is a single circuit, not a curve over sizes")
        fig.add_trace(
            go.Scatter(
                x=[100 * s for s in curve.sizes],
                y=curve.faithfulness,
                mode="lines+markers",
                name=f"{html.escape(name)} (CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f})",
                customdata=np.array([curve.kept, curve.requested]).T,
                hovertemplate="%{x:.3g} % of edges: f = %{y:.3f}<br>"
                "%{customdata[0]} edges after pruning (%{customdata[1]} chosen)<extra></extra>",
            )
        )
    fig.add_hline(y=1.0, line_dash="dot", line_color="#888888")
    fig.add_hline(y=0.0, line_dash="dot", line_color="#888888")
    fig.update_xaxes(type="log", title="circuit size (% of edges)")
    fig.update_yaxes(title="faithfulness f(C)")
    fig.update_layout(title="Faithfulness", height=420, template="plotly_white")
    return fig


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r.values()) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;max-width:1100px}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}
p.note{color:#555;font-size:13px}
"""


def write_circuit_report(
    path: str | Path,
    circuit: Circuit,
    *,
    result: EdgeAttribution | None = None,
    curves: Mapping[str, Faithfulness] | None = None,
    title: str = "Circuit report",
    settings: Mapping[str, Any] | None = None,
    top: int = 50,
) -> Path:
    """One self-contained HTML file: summary, faithfulness curves, the circuit graph and its
    ``top`` best edges (written atomically)."""
    path = Path(path)
    figures = []
    if curves:
        figures.append(faithfulness_figure(curves))
    figures.append(circuit_figure(circuit, title="Circuit"))
    parts = [
        fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False)
        for i, fig in enumerate(figures)
    ]
    summary = {"edges in the circuit": len(circuit), "nodes": len(circuit.nodes())}
    summary |= circuit.info
    if result is not None:
        summary |= {
            "method": result.method,
            "model": result.model,
            "pairs": result.per_pair.shape[0],
            "direction": result.direction,
            "metric": result.metric,
            "edges in the graph": len(result),
            "cost (forward passes)": result.cost,
        }
    summary |= dict(settings or {})  # one row per setting (a later value replaces)
    for name, curve in (curves or {}).items():
        summary |= {f"CPR ({name})": curve.cpr, f"CMD ({name})": curve.cmd}
    rows = circuit.table().sort_values("score", ascending=False).head(top)
    edge_rows = [
        {"edge": r.name, "input": r.input, "receivers": ", ".join(r.receivers), "score": r.score}
        for r in rows.itertuples()
    ]
    body = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
{_table([{"": k, "value": v} for k, v in summary.items()])}
<p class="note">Edges u → v: u's write into the residual stream (embeddings, a head's output
projection slice, an MLP's output) read by v's own copy of the residual stream (a head's
q, a KV head's k or v, an MLP's input, the logits). Faithfulness f(C) = (M(C) − M(∅)) /
(M(full) − M(∅)) with every edge outside C patched exactly; CPR = area under f, CMD = area
between f and 1 (sizes as fractions of all edges, linear axis).</p>
{"".join(parts)}
<h2>Top {len(edge_rows)} edges of the circuit</h2>
{_table(edge_rows)}
</body></html>
"""
    with atomic_paths(path) as (tmp,):
        tmp.write_text(body, encoding="utf-8")
    return path
