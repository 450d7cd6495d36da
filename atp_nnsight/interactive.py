"""Interactive (plotly) figures for the HTML report: hover to read a node, click to filter.

Every function returns a ``plotly.graph_objects.Figure``. Each point or heatmap cell carries
``customdata = [node, score, exact effect, rank, filter key]`` as display strings: the hover
label shows them, and the report's script filters its ranked table with the filter key on a
click (a node label such as ``head L23.H3@5``, or a unit label such as ``head L23.H3`` for a
cell that stands for every position of a unit).

Colours follow :mod:`atp_nnsight.plots`: scores sequential from 0 (viridis), signed effects
diverging and centred at 0 (red = patching raises the metric, blue = lowers it), grey = no
value. Text that comes from users (tokens, model names) is HTML-escaped, because plotly renders
a subset of HTML in labels.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from atp_nnsight import plots
from atp_nnsight.types import NODE_KINDS, Node

if TYPE_CHECKING:
    from atp_nnsight.results import Attribution

__all__ = [
    "HOVER_FIELDS",
    "NodeInfo",
    "depth_figure",
    "heatmap_figure",
    "recall_figure",
    "scatter_figure",
]

HOVER_FIELDS = ("node", "score", "exact effect", "rank", "filter key")
"""The order of the display strings in every point's ``customdata``."""

MISSING_COLOR = plots.MISSING_COLOR
MAX_TICKS = 40
"""Most labelled token columns of a heatmap (every n-th column is labelled beyond that)."""
MAX_NUMBER_TICKS = 12
"""About this many ticks on a numbered axis (heads, neurons)."""
_SEQUENTIAL = "Viridis"
_DIVERGING = "RdBu_r"
_KIND_COLORS = {
    k: "#{:02x}{:02x}{:02x}".format(*(round(255 * c) for c in rgb))
    for k, rgb in plots.KIND_COLORS.items()
}
_AGREE_COLORS = {True: "#2b7bba", False: "#d62728"}
_FONT = dict(family="-apple-system, Segoe UI, Helvetica, Arial, sans-serif", size=12)


def _esc(text: object) -> str:
    return html.escape(str(text), quote=False)


def _round_step(step: float) -> float:
    """The smallest of 1, 2, 5 x 10^k (at least 1) that is >= ``step``."""
    if step <= 1:
        return 1
    power = 10 ** np.floor(np.log10(step))
    return float(next(m * power for m in (1, 2, 5, 10) if m * power >= step))


def _num(v: float) -> str:
    return "" if not np.isfinite(v) else f"{v:.4g}"


class NodeInfo:
    """Display strings of one result's nodes, built on demand for the nodes a figure shows.

    ``exact``: exact signed mean effect per node (NaN where unknown); ``exact_note``: what a
    missing exact value means (e.g. ``"not verified"``).
    """

    def __init__(self, result: Attribution, exact: np.ndarray | None, exact_note: str) -> None:
        self.result = result
        self.exact = np.full(len(result), np.nan) if exact is None else exact
        self.exact_note = exact_note
        nodes = result.nodes
        self._kind = nodes["kind"].to_numpy(dtype=str)
        self._layer = nodes["layer"].to_numpy(dtype=np.int64)
        self._index = nodes["index"].to_numpy(dtype=np.int64)
        self._position = nodes["position"].to_numpy(dtype=np.float64, na_value=np.nan)
        self.rank = np.empty(len(result), dtype=np.int64)
        self.rank[result.ranking()] = np.arange(1, len(result) + 1)

    def label(self, i: int, with_position: bool = True) -> str:
        pos = self._position[i]
        position = None if not with_position or np.isnan(pos) else int(pos)
        return str(Node(self._kind[i], int(self._layer[i]), int(self._index[i]), position))

    def fields(self, i: int, filter_unit: bool = False) -> list[str]:
        """``HOVER_FIELDS`` of node ``i``; ``filter_unit`` filters on every position of it."""
        if i < 0:
            return ["no node", "", "", "", ""]
        exact = self.exact[i]
        return [
            self.label(i),
            _num(float(self.result.scores[i])),
            _num(float(exact)) if np.isfinite(exact) else self.exact_note,
            str(int(self.rank[i])),
            self.label(i, with_position=not filter_unit),
        ]

    def grid(self, nodes: np.ndarray, filter_unit: bool = False) -> np.ndarray:
        """``HOVER_FIELDS`` of every node of a ``[rows, columns]`` grid: ``[rows, columns, 5]``."""
        fields = [self.fields(int(i), filter_unit) for i in nodes.ravel()]
        return np.array(fields, dtype=object).reshape(*nodes.shape, len(HOVER_FIELDS))


def _hover(value_name: str | None) -> str:
    cell = f"{_esc(value_name)}: %{{z:.4g}}<br>" if value_name else ""
    return (
        "<b>%{customdata[0]}</b><br>"
        + cell
        + "score %{customdata[1]} (rank %{customdata[3]})<br>"
        + "exact effect %{customdata[2]}<extra></extra>"
    )


def _layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    fig.update_layout(
        template="none",
        title=dict(text=title, x=0.0, xanchor="left", font=dict(size=14)),
        height=height,
        margin=dict(l=70, r=20, t=60, b=60),
        font=_FONT,
        hoverlabel=dict(font=dict(family=_FONT["family"], size=12)),
    )
    return fig


def heatmap_figure(
    matrix: np.ndarray,
    nodes: np.ndarray,
    info: NodeInfo,
    *,
    signed: bool,
    title: str,
    value_name: str,
    x_title: str,
    y_labels: Sequence[str],
    y_title: str,
    x_labels: Sequence[str] | None = None,
    x_step: int = 1,
    filter_unit: bool = False,
    show_value: bool = False,
) -> go.Figure:
    """A heatmap whose cell ``[r, c]`` shows ``matrix[r, c]`` and node ``nodes[r, c]``.

    ``x_labels`` name the columns (e.g. tokens; numbered from 0, in steps of ``x_step``, when
    absent); ``y_labels`` the rows (the first row at the top). ``signed`` picks a diverging
    colour scale centred at 0. ``show_value`` adds the cell's value (``value_name``) to the
    hover label, for cells whose value is not already one of the node's fields;
    ``filter_unit``: a click filters on every position of the cell's unit.
    """
    finite = matrix[np.isfinite(matrix)]
    vmax = float(np.abs(finite).max()) if finite.size else 1.0
    vmax = vmax or 1.0
    n_rows, n_cols = matrix.shape
    x = np.arange(n_cols) * x_step
    colors = (
        dict(colorscale=_DIVERGING, zmid=0.0, zmin=-vmax, zmax=vmax)
        if signed
        else dict(colorscale=_SEQUENTIAL, zmin=min(0.0, float(finite.min(initial=0.0))), zmax=vmax)
    )
    heat = go.Heatmap(
        z=np.where(np.isfinite(matrix), matrix, None),
        x=x,
        y=np.arange(n_rows),
        customdata=info.grid(nodes, filter_unit),
        hovertemplate=_hover(value_name if show_value else None),
        colorbar=dict(title=dict(text=_esc(value_name), side="top"), thickness=12),
        xgap=0,
        ygap=0,
        **colors,
    )
    fig = go.Figure(heat)
    if x_labels is None:  # unit numbers: round ticks
        ticks = dict(tick0=0, dtick=_round_step(n_cols * x_step / MAX_NUMBER_TICKS))
    else:  # tokens: label every column, or every n-th when there are many
        every = max(1, -(-n_cols // MAX_TICKS))
        ticks = dict(
            tickmode="array", tickvals=x[::every], ticktext=[_esc(t) for t in x_labels][::every]
        )
    fig.update_xaxes(title=_esc(x_title), showgrid=False, zeroline=False, **ticks)
    fig.update_yaxes(
        title=_esc(y_title),
        automargin=True,  # room for long row labels (unit names)
        autorange="reversed",
        tickmode="array",
        tickvals=np.arange(n_rows),
        ticktext=[_esc(t) for t in y_labels],
        showgrid=False,
        zeroline=False,
    )
    height = int(np.clip(140 + 18 * n_rows, 300, 720))
    _layout(fig, _esc(title), height)
    width = 230 + 48 * n_cols  # a few columns need no more; many take the page's width
    fig.update_layout(plot_bgcolor=MISSING_COLOR, width=max(width, 480) if width < 1000 else None)
    return fig


def scatter_figure(
    nodes: np.ndarray, x: np.ndarray, y: np.ndarray, info: NodeInfo, *, signed: bool, title: str
) -> go.Figure:
    """Estimate (``x``) vs exact effect (``y``) of ``nodes``, with the line ``y = x``.

    Signed: one colour for nodes whose estimate and exact effect share a sign, another for the
    rest. Unsigned (``x`` = score, ``y`` = ``|exact|``): one colour per node kind.
    """
    fig = go.Figure()
    custom = info.grid(nodes)
    kinds = info.result.nodes["kind"].to_numpy(dtype=str)[nodes]
    if signed:
        agree = plots.sign_agrees(x, y)
        groups = []
        for flag in (True, False):
            word = "agrees" if flag else "differs"
            sel = agree == flag
            groups.append((sel, f"sign {word} ({int(sel.sum())})", _AGREE_COLORS[flag]))
    else:
        groups = [
            (kinds == k, f"{k} ({int((kinds == k).sum())})", _KIND_COLORS[k])
            for k in NODE_KINDS
            if k in set(kinds)
        ]
    for sel, name, color in groups:
        if not sel.any():
            continue
        fig.add_trace(
            go.Scatter(
                x=x[sel],
                y=y[sel],
                mode="markers",
                name=name,
                marker=dict(color=color, size=8, opacity=0.8, line=dict(width=0)),
                customdata=custom[sel],
                hovertemplate=_hover(None),
            )
        )
    lo = float(min(x.min(), y.min()))
    hi = float(max(x.max(), y.max()))
    pad = 0.05 * (hi - lo or 1.0)
    fig.add_trace(
        go.Scatter(
            x=[lo - pad, hi + pad],
            y=[lo - pad, hi + pad],
            mode="lines",
            name="y = x",
            line=dict(color="#666", dash="dash", width=1),
            hoverinfo="skip",
        )
    )
    name = _esc(plots.method_label(info.result.method))
    fig.update_xaxes(
        title=f"{name} {'estimate (signed mean over pairs)' if signed else 'score'}",
        zeroline=signed,
        zerolinecolor="#ccc",
        gridcolor="#eee",
    )
    fig.update_yaxes(
        title="exact mean effect" if signed else "|exact mean effect|",
        zeroline=signed,
        zerolinecolor="#ccc",
        gridcolor="#eee",
    )
    return _layout(fig, _esc(title), 460)


def depth_figure(
    info: NodeInfo,
    verified: np.ndarray,
    title: str,
    bound: float | None = None,
    theta: float | None = None,
) -> go.Figure:
    """Per verified kind: the score at each within-kind rank (line, log x) and the verified
    nodes' ``|exact effect|`` (dots); a dashed line at the deepest verified rank. ``bound``
    (the diagnostic's bound on any unverified ``|effect|``) and ``theta`` are drawn as
    horizontal red lines."""
    result = info.result
    kinds = result.nodes["kind"].to_numpy(dtype=str)
    rank = plots.within_kind_rank(result)
    panels = [k for k in NODE_KINDS if k in set(kinds[verified])]
    n_cols = min(len(panels), 3)
    n_rows = -(-len(panels) // n_cols)
    fig = make_subplots(
        rows=n_rows,
        cols=n_cols,
        subplot_titles=[f"{k} nodes" for k in panels],
        horizontal_spacing=0.07,
        vertical_spacing=0.16,
    )
    name = _esc(plots.method_label(result.method))
    for p, kind in enumerate(panels):
        row, col = p // n_cols + 1, p % n_cols + 1
        of_kind = np.flatnonzero(kinds == kind)
        order = of_kind[np.argsort(-result.scores[of_kind], kind="stable")]
        at = plots.log_spaced_ranks(len(order))
        fig.add_trace(
            go.Scatter(
                x=at,
                y=result.scores[order[at - 1]],
                mode="lines",
                line=dict(color="#999", width=1.5),
                name=f"{name} score",
                legendgroup="score",
                showlegend=p == 0,
                customdata=info.grid(order[at - 1]),
                hovertemplate=_hover(None),
            ),
            row=row,
            col=col,
        )
        mine = verified[kinds[verified] == kind]
        fig.add_trace(
            go.Scatter(
                x=rank[mine],
                y=np.abs(info.exact[mine]),
                mode="markers",
                marker=dict(color=_KIND_COLORS[kind], size=8),
                name="|exact effect| (verified)",
                legendgroup="exact",
                showlegend=p == 0,
                customdata=info.grid(mine),
                hovertemplate=_hover(None),
            ),
            row=row,
            col=col,
        )
        deepest = int(rank[mine].max())
        fig.add_vline(x=deepest, line=dict(color="#444", dash="dash", width=1), row=row, col=col)
        for level, dash in ((bound, "solid"), (theta, "dot")):
            if level is not None:
                fig.add_hline(
                    y=level, line=dict(color="#d62728", dash=dash, width=1), row=row, col=col
                )
        fig.update_xaxes(
            type="log",
            dtick=1,  # one tick per decade
            title=f"rank among {kind} nodes",
            gridcolor="#eee",
            row=row,
            col=col,
        )
        fig.update_yaxes(gridcolor="#eee", rangemode="tozero", row=row, col=col)
    fig.update_yaxes(title="score · |exact effect|", row=1, col=1)
    return _layout(fig, _esc(title), 120 + 300 * n_rows)


def recall_figure(curves: pd.DataFrame, title: str) -> go.Figure:
    """Cost-of-verified-recall curves (long frame ``method, x, cost[, kind]``), log–log, one
    panel per kind, with the oracle diagonal ``y = x``."""
    df = plots.curves_frame(curves)
    df = df[np.isfinite(df["x"]) & np.isfinite(df["cost"]) & (df["x"] > 0) & (df["cost"] > 0)]
    kinds = [None]
    if "kind" in df.columns:
        present = list(dict.fromkeys(df["kind"].astype(str)))
        kinds = [k for k in present if k != "all"] or present
    fig = make_subplots(
        rows=1,
        cols=len(kinds),
        subplot_titles=[f"{k} nodes" if k else "" for k in kinds],
        horizontal_spacing=0.06,
    )
    methods = list(dict.fromkeys(df["method"]))
    palette = ["#d62728", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
    for col, kind in enumerate(kinds, start=1):
        sub = df if kind is None else df[df["kind"].astype(str) == kind]
        for j, m in enumerate(methods):
            c = sub[sub["method"] == m].sort_values("x")
            fig.add_trace(
                go.Scatter(
                    x=c["x"],
                    y=c["cost"],
                    mode="lines+markers",
                    name=_esc(plots.method_label(m)),
                    legendgroup=m,
                    showlegend=col == 1,
                    line=dict(color=palette[j % len(palette)]),
                    hovertemplate="top %{x} recalled: %{y:.4g} forward passes per pair",
                ),
                row=1,
                col=col,
            )
        top = float(max(sub["x"].max(), 1.0))
        fig.add_trace(
            go.Scatter(
                x=[1, top],
                y=[1, top],
                mode="lines",
                name="oracle (y = x)",
                legendgroup="oracle",
                showlegend=col == 1,
                line=dict(color="#666", dash="dash", width=1),
                hoverinfo="skip",
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(type="log", dtick=1, title="top-x true nodes recalled", row=1, col=col)
        fig.update_yaxes(type="log", dtick=1, gridcolor="#eee", row=1, col=col)
    fig.update_yaxes(title="forward passes per pair", row=1, col=1)
    return _layout(fig, _esc(title), 420)
