"""Plots of :class:`~atp_nnsight.results.Attribution` results (matplotlib only).

Every function returns a :class:`matplotlib.figure.Figure` that renders inline in Jupyter
(it is closed in pyplot first, so a notebook cell shows it exactly once and scripts never open a
window), and accepts ``ax=`` to draw into an existing axes instead.

Conventions shown in the plots:

* ``value="score"`` is the method's ranking score (exact patching: ``|mean effect|``; AtP family:
  mean over pairs of ``|estimate|``; GradDrop: its unsigned score), drawn with a sequential
  colormap from 0.
* ``value="mean_effect"`` is the signed mean over pairs of ``metric(patched) - metric(unpatched)``
  (for the AtP family the signed mean estimate), drawn with a diverging colormap centred at 0
  (red = patching raises the metric, blue = lowers it).
* ``value="verified"`` is the exact mean effect of the nodes verified in ranked order
  (``result.metadata["verified"]``); unverified nodes are grey.
* Missing values (NaN) are grey in heatmaps and dropped from scatter plots.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, MaxNLocator

from atp_nnsight.types import NODE_KINDS, Node

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from atp_nnsight.results import Attribution

__all__ = [
    "agg_figures",
    "head_heatmap",
    "layer_position_matrix",
    "layer_position_nodes",
    "layer_unit_matrix",
    "layer_unit_nodes",
    "method_label",
    "position_heatmap",
    "recall_curve",
    "scatter_vs_exact",
    "sign_agrees",
    "top_units_by_position",
    "unit_position_matrix",
    "verification_depth",
    "within_kind_rank",
]

STYLE: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 100,
    "savefig.dpi": 130,
}
"""The small, consistent style every plot here is drawn with."""

SEQUENTIAL_CMAP = "viridis"
DIVERGING_CMAP = "RdBu_r"
MISSING_COLOR = "#d9d9d9"

_METHOD_LABELS = {
    "exact": "exact patching",
    "atp": "AtP",
    "atp+qk": "AtP+QK",
    "atp+gd": "AtP+GD",
    "atp*": "AtP*",
}
_UNIT_NAMES = {
    "head": "head",
    "q": "query head",
    "k": "KV head",
    "v": "KV head",
    "neuron": "neuron",
}
KIND_COLORS = dict(zip(NODE_KINDS, matplotlib.colormaps["tab10"].colors, strict=False))
"""One colour per node kind (RGB tuples), shared by every plot."""
_METHOD_COLORS = {
    "atp*": "#d62728",
    "atp": "#1f77b4",
    "atp+qk": "#ff7f0e",
    "atp+gd": "#2ca02c",
    "exact": "#7f7f7f",
    "subsampling": "#9467bd",
    "blocks": "#8c564b",
    "hierarchical": "#e377c2",
}
_VALUES = ("score", "mean_effect", "verified")


def method_label(method: str) -> str:
    """Display name of a method id (``"atp*"`` -> ``"AtP*"``); unknown ids pass through."""
    return _METHOD_LABELS.get(str(method).lower(), str(method))


# ---- data helpers ------------------------------------------------------------------------------
def _check_kind(result: Attribution, kind: str) -> np.ndarray:
    """Boolean mask of ``kind``'s nodes; a clear error for unknown or absent kinds."""
    if kind not in NODE_KINDS:
        raise ValueError(f"unknown node kind {kind!r}; choose from {', '.join(NODE_KINDS)}")
    mask = (result.nodes["kind"] == kind).to_numpy(dtype=bool)
    if not mask.any():
        present = ", ".join(dict.fromkeys(map(str, result.nodes["kind"]))) or "none"
        raise ValueError(
            f"the result has no {kind!r} nodes (it has: {present}); pass kind= one of those"
        )
    return mask


def _verified(verified: Mapping[str, Any], n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(node indices, exact mean effects)`` of a ``metadata["verified"]`` record.

    ``order`` lists node indices (into the result's node table) in verification order and
    ``mean_effect`` the exact signed mean effect of the first ``len(mean_effect)`` of them.
    """
    if "order" not in verified or "mean_effect" not in verified:
        raise ValueError(
            "verified data must have 'order' (node indices in verification order) and "
            f"'mean_effect' (their exact mean effects); got keys {sorted(verified)}"
        )
    effect = np.asarray(verified["mean_effect"], dtype=np.float64).reshape(-1)
    order = np.asarray(verified["order"]).reshape(-1)
    if len(order) < len(effect):
        raise ValueError(
            f"verified data has {len(effect)} effects but only {len(order)} node indices"
        )
    order = order[: len(effect)].astype(np.int64)
    if len(order) and (order.min() < 0 or order.max() >= n_nodes):
        raise ValueError(f"verified node indices out of range for a result with {n_nodes} nodes")
    return order, effect


def _values(result: Attribution, value: str | np.ndarray) -> tuple[np.ndarray, bool, str]:
    """``(per-node values, signed?, label)``; NaN where a node has no value."""
    n = len(result)
    if not isinstance(value, str):
        arr = np.asarray(value, dtype=np.float64)
        if arr.shape != (n,):
            raise ValueError(f"value array has shape {arr.shape}; expected ({n},), one per node")
        return arr, bool(np.nanmin(arr, initial=0.0) < 0), "value"
    if value == "score":
        return np.asarray(result.scores, dtype=np.float64), False, "score"
    if value == "mean_effect":
        if result.mean_effect is None:
            raise ValueError(
                f"{method_label(result.method)} has no signed mean effect (GradDrop scores are "
                "unsigned); use value='score'"
            )
        label = "exact mean effect" if result.method == "exact" else "mean estimate (signed)"
        return np.asarray(result.mean_effect, dtype=np.float64), True, label
    if value == "verified":
        ver = result.metadata.get("verified")
        if not ver:
            raise ValueError(
                "the result has no verified nodes (metadata['verified']); verify its ranking "
                "first or pass an exact result"
            )
        idx, eff = _verified(ver, n)
        out = np.full(n, np.nan)
        out[idx] = eff
        return out, True, "verified exact mean effect"
    raise ValueError(f"unknown value {value!r}; use one of {', '.join(_VALUES)} or an array")


def _is_per_position(result: Attribution, mask: np.ndarray) -> bool:
    pos = result.nodes["position"][mask]
    has = pos.notna().to_numpy()
    if has.any() and not has.all():
        raise ValueError("the node table mixes per-position and summed nodes of one kind")
    return bool(has.all())


def _nan_abs_sum(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum of ``|values|`` per group ignoring NaN; NaN for groups with no finite value."""
    finite = np.isfinite(values)
    total = np.bincount(groups[finite], np.abs(values[finite]), minlength=n_groups)
    seen = np.bincount(groups[finite], minlength=n_groups) > 0
    return np.where(seen, total, np.nan)


def _largest_abs_member(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Per group, the position in ``values`` of its largest finite ``|value|``; -1 if none."""
    finite = np.flatnonzero(np.isfinite(values))
    order = finite[np.lexsort((np.abs(values[finite]), groups[finite]))]  # group, then |value|
    g = groups[order]
    last = np.r_[g[1:] != g[:-1], True] if len(g) else np.zeros(0, dtype=bool)
    out = np.full(n_groups, -1, dtype=np.int64)
    out[g[last]] = order[last]
    return out


class _Grid(NamedTuple):
    """Where one kind's nodes sit in a ``layers x columns`` grid."""

    rows: np.ndarray  # the kind's rows of the node table
    cell: np.ndarray  # their flat cell index, row-major
    layers: list[int]  # the grid's rows
    n_columns: int
    per_position: bool

    @property
    def size(self) -> int:
        return len(self.layers) * self.n_columns


def _unit_grid(result: Attribution, kind: str) -> _Grid:
    """``layers x units`` (all positions of a unit share its cell)."""
    mask = _check_kind(result, kind)
    rows = np.flatnonzero(mask)
    nodes = result.nodes.iloc[rows]
    layer = nodes["layer"].to_numpy(dtype=np.int64)
    unit = nodes["index"].to_numpy(dtype=np.int64)
    layers = sorted(set(layer.tolist()))
    n_units = int(unit.max()) + 1
    cell = np.searchsorted(np.asarray(layers), layer) * n_units + unit
    return _Grid(rows, cell, layers, n_units, _is_per_position(result, mask))


def layer_unit_matrix(
    result: Attribution, kind: str = "head", value: str | np.ndarray = "score"
) -> tuple[np.ndarray, list[int], bool]:
    """The ``layers x units`` matrix a :func:`head_heatmap` draws.

    Returns ``(matrix, layers, summed_abs)``: rows follow ``layers`` (the sorted layers that have
    ``kind`` nodes), columns are unit indices ``0..max index``; cells without a node are NaN. For
    per-position results each cell is the sum over positions of ``|value|`` and ``summed_abs``
    is True.
    """
    vals, _, _ = _values(result, value)
    grid = _unit_grid(result, kind)
    if grid.per_position:
        mat = _nan_abs_sum(vals[grid.rows], grid.cell, grid.size)
    else:
        mat = np.full(grid.size, np.nan)
        mat[grid.cell] = vals[grid.rows]
    return mat.reshape(len(grid.layers), grid.n_columns), grid.layers, grid.per_position


def layer_unit_nodes(
    result: Attribution, kind: str = "head", value: str | np.ndarray = "score"
) -> np.ndarray:
    """The node (row of the node table) behind each cell of :func:`layer_unit_matrix`.

    Summed over positions a cell is one node; per position it is the position with the
    largest finite ``|value|``. ``-1`` where a cell has no node (or only NaN values).
    """
    vals, _, _ = _values(result, value)
    return _cell_nodes(vals, _unit_grid(result, kind))


def _cell_nodes(vals: np.ndarray, grid: _Grid) -> np.ndarray:
    member = _largest_abs_member(vals[grid.rows], grid.cell, grid.size)
    nodes = np.where(member >= 0, grid.rows[np.maximum(member, 0)], -1)
    return nodes.reshape(len(grid.layers), grid.n_columns)


def _position_grid(result: Attribution, kind: str) -> _Grid:
    """``layers x positions`` (all units of a layer at one position share a cell)."""
    mask = _check_kind(result, kind)
    if not _is_per_position(result, mask):
        raise ValueError(
            f"position heatmap needs a per-position result, but the {kind!r} nodes of this "
            f"{method_label(result.method)} result are summed over positions (position = NA); "
            "rerun with per_position=True (CLI: --per-position), or use head_heatmap"
        )
    rows = np.flatnonzero(mask)
    nodes = result.nodes.iloc[rows]
    layer = nodes["layer"].to_numpy(dtype=np.int64)
    pos = nodes["position"].to_numpy(dtype=np.int64)
    layers = sorted(set(layer.tolist()))
    n_pos = max(int(pos.max()) + 1, int(result.metadata.get("seq_len") or 0))
    cell = np.searchsorted(np.asarray(layers), layer) * n_pos + pos
    return _Grid(rows, cell, layers, n_pos, True)


def layer_position_matrix(
    result: Attribution,
    kind: str,
    value: str | np.ndarray = "score",
    agg: str = "max",
) -> tuple[np.ndarray, list[int]]:
    """The ``layers x positions`` matrix a :func:`position_heatmap` draws.

    ``agg="max"`` keeps, per (layer, position), the value of the unit with the largest ``|value|``
    (its sign is kept; :func:`layer_position_nodes` names that unit); ``agg="sum"`` sums the
    units' values (for signed effects: the first-order effect of patching every unit at that
    position together). Cells with no finite value are NaN. Raises ``ValueError`` for results
    summed over positions.
    """
    if agg not in ("max", "sum"):
        raise ValueError(f"unknown agg {agg!r}; use 'max' (largest |value| over units) or 'sum'")
    vals, _, _ = _values(result, value)
    grid = _position_grid(result, kind)
    v, cell, size = vals[grid.rows], grid.cell, grid.size
    if agg == "sum":
        finite = np.isfinite(v)
        seen = np.bincount(cell[finite], minlength=size) > 0
        out = np.where(seen, np.bincount(cell[finite], v[finite], minlength=size), np.nan)
    else:
        member = _largest_abs_member(v, cell, size)
        out = np.where(member >= 0, v[np.maximum(member, 0)], np.nan)
    return out.reshape(len(grid.layers), grid.n_columns), grid.layers


def layer_position_nodes(
    result: Attribution, kind: str, value: str | np.ndarray = "score"
) -> np.ndarray:
    """The node behind each cell of ``layer_position_matrix(..., agg="max")``; -1 if none."""
    vals, _, _ = _values(result, value)
    return _cell_nodes(vals, _position_grid(result, kind))


# ---- figure helpers ----------------------------------------------------------------------------
_AGG_ONLY = False


@contextmanager
def agg_figures() -> Iterator[None]:
    """Within this block, new figures are plain Agg figures that never touch pyplot.

    For batch rendering (reports, tests): no GUI backend is loaded and nothing is registered
    with pyplot. Outside it, figures are made with pyplot and closed at once, which lets
    Jupyter's inline backend display the returned figure exactly once.
    """
    global _AGG_ONLY
    before, _AGG_ONLY = _AGG_ONLY, True
    try:
        yield
    finally:
        _AGG_ONLY = before


def _new_figure(figsize: tuple[float, float]) -> Figure:
    if _AGG_ONLY:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize, layout="constrained")
        FigureCanvasAgg(fig)
        return fig
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=figsize, layout="constrained")
    plt.close(fig)  # not managed by pyplot: shown once in notebooks, never opens a window
    return fig


def _figure(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return _root(ax), ax
    fig = _new_figure(figsize)
    return fig, fig.add_subplot()


def _root(ax: Axes) -> Figure:
    fig = ax.figure
    return getattr(fig, "figure", fig) or fig


def _subtitle(result: Attribution) -> str:
    n_pairs = result.per_pair.shape[0]
    bits = [result.model, result.metric, result.direction, f"{n_pairs} pair{'s' * (n_pairs != 1)}"]
    return ", ".join(str(b) for b in bits if b)


def _ticks(ax: Axes, axis: str, labels: Sequence[Any], max_ticks: int = 40) -> None:
    n = len(labels)
    step = max(1, int(np.ceil(n / max_ticks)))
    where = np.arange(0, n, step)
    getattr(ax, f"set_{axis}ticks")(where, [str(labels[i]) for i in where])


def _colormap(matrix: np.ndarray, signed: bool) -> dict[str, Any]:
    from matplotlib.colors import Normalize

    finite = matrix[np.isfinite(matrix)]
    vmax = float(np.abs(finite).max()) if finite.size else 0.0
    vmax = vmax if vmax > 0 else 1.0
    name = DIVERGING_CMAP if signed else SEQUENTIAL_CMAP
    cmap = matplotlib.colormaps[name].with_extremes(bad=MISSING_COLOR)
    lo = -vmax if signed else min(0.0, float(finite.min()) if finite.size else 0.0)
    return {"cmap": cmap, "norm": Normalize(vmin=lo, vmax=vmax)}


def _heat(
    fig: Figure,
    ax: Axes,
    matrix: np.ndarray,
    signed: bool,
    cbar_label: str,
) -> Any:
    im = ax.imshow(
        np.ma.masked_invalid(matrix),
        aspect="auto",
        interpolation="nearest",
        **_colormap(matrix, signed),
    )
    cb = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02)
    cb.set_label(cbar_label)
    cb.outline.set_visible(False)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    return im


def _value_label(result: Attribution, value: str | np.ndarray, label: str) -> str:
    if isinstance(value, str) and value == "score":
        if result.method == "exact":
            return "score = |exact mean effect|"
        if result.mean_effect is None:
            return "score (GradDrop, unsigned)"
        return "score = mean over pairs of |estimate|"
    return label


# ---- plots -------------------------------------------------------------------------------------
def pool_columns(matrix: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns pooled in blocks of ``block``: the entry with the largest ``|value|`` (sign kept).

    Returns ``(pooled, source)``: ``source[r, b]`` is the column of ``matrix`` that block ``b``
    of row ``r`` shows, ``-1`` where the whole block is NaN.
    """
    n_rows, n_cols = matrix.shape
    n_blocks = -(-n_cols // block)
    padded = np.full((n_rows, n_blocks * block), np.nan)
    padded[:, :n_cols] = matrix
    blocks = padded.reshape(n_rows, n_blocks, block)
    mag = np.where(np.isfinite(blocks), np.abs(blocks), -1.0)
    pick = mag.argmax(axis=2)
    best = np.take_along_axis(blocks, pick[..., None], axis=2)[..., 0]
    seen = (mag >= 0).any(axis=2)
    source = np.where(seen, pick + block * np.arange(n_blocks), -1)
    return np.where(seen, best, np.nan), source


def column_block(n_units: int, max_columns: int) -> int:
    """Units per pooled column so that at most ``max_columns`` columns are drawn."""
    return max(1, -(-n_units // max(1, max_columns)))


def head_heatmap(
    result: Attribution,
    kind: str = "head",
    value: str | np.ndarray = "score",
    ax: Axes | None = None,
    title: str | None = None,
    max_columns: int = 400,
) -> Figure:
    """Layer x head heatmap (layer x KV head for ``k``/``v``, layer x neuron for ``neuron``).

    ``value``: ``"score"`` (sequential colormap from 0), ``"mean_effect"`` (signed, diverging
    colormap centred at 0), ``"verified"`` (exact effects of verified nodes, others grey) or an
    array with one value per node. For per-position results each cell is the sum over positions
    of ``|value|`` (unsigned; the title says so). Layer 0 is the top row. With more than
    ``max_columns`` units (e.g. thousands of neurons) consecutive units are pooled into blocks
    showing the value of largest ``|value|``, so no large effect disappears (the title says so).
    """
    vals, signed, label = _values(result, value)
    matrix, layers, summed = layer_unit_matrix(result, kind, vals)
    if summed:
        signed = False
        short = "score" if isinstance(value, str) and value == "score" else label
        label = f"Σ over positions of |{short}|"
    else:
        label = _value_label(result, value, label)
    unit = _UNIT_NAMES.get(kind, "unit")
    n_layers, n_units = matrix.shape
    block = column_block(n_units, max_columns)
    shown = pool_columns(matrix, block)[0] if block > 1 else matrix
    with matplotlib.rc_context(STYLE):
        figsize = (
            float(np.clip(2.6 + 0.3 * shown.shape[1], 4.5, 12)),
            float(np.clip(1.6 + 0.2 * n_layers, 3.2, 10)),
        )
        fig, ax = _figure(ax, figsize)
        _heat(fig, ax, shown, signed, label)
        _ticks(ax, "y", layers)
        if block > 1:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{round(v) * block:d}"))
            ax.set_xlabel(f"{unit} (blocks of {block}: max |·|)")
        else:
            _ticks(ax, "x", list(range(n_units)))
            ax.set_xlabel(unit)
        ax.set_ylabel("layer")
        if title is None:
            what = f"{kind} nodes, layer × {unit}"
            if summed:
                what += " (Σ|·| over positions)"
            if block > 1:
                what += f"\n{n_units} {unit}s in blocks of {block}, largest |·| shown"
            title = f"{method_label(result.method)}: {what}\n{_subtitle(result)}"
        ax.set_title(title)
    return fig


def _token_label(tok: Any) -> str:
    s = str(tok).replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")
    return s if s.strip() else repr(str(tok))


def _position_axis(ax: Axes, n_pos: int, tokens: Sequence[str] | None) -> None:
    """Positions on the x axis, labelled with ``tokens`` when given."""
    if tokens is not None:
        ax.set_xticks(np.arange(n_pos), [_token_label(t) for t in tokens], rotation=90)
        ax.set_xlabel("token (position 0 = first)")
    else:
        _ticks(ax, "x", list(range(n_pos)))
        ax.set_xlabel("position (0 = first token)")


def position_heatmap(
    result: Attribution,
    kind: str,
    tokens: Sequence[str] | None = None,
    value: str | np.ndarray = "score",
    agg: str = "max",
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Layer x position heatmap of a per-position result.

    Units (heads, neurons, ...) are aggregated per (layer, position): ``agg="max"`` shows the
    value of the unit with the largest ``|value|`` (keeping its sign), ``agg="sum"`` their sum.
    ``tokens`` (one string per position, e.g. one prompt's tokens from the tokenizer) label the
    x axis; without them positions are numbered from 0. Raises ``ValueError`` for results summed
    over positions.
    """
    vals, signed, label = _values(result, value)
    matrix, layers = layer_position_matrix(result, kind, vals, agg)
    n_layers, n_pos = matrix.shape
    if tokens is not None and len(tokens) != n_pos:
        raise ValueError(f"got {len(tokens)} tokens for {n_pos} positions; pass one per position")
    label = _value_label(result, value, label)
    unit = _UNIT_NAMES.get(kind, "unit")
    agg_text = f"{unit} with max |·|" if agg == "max" else f"Σ over {unit}s"
    with matplotlib.rc_context(STYLE):
        figsize = (
            float(np.clip(2.8 + 0.32 * n_pos, 4.5, 14)),
            float(np.clip(2.2 + 0.2 * n_layers, 3.4, 10)),
        )
        fig, ax = _figure(ax, figsize)
        _heat(fig, ax, matrix, signed, f"{label}\n({agg_text})")
        _ticks(ax, "y", layers)
        _position_axis(ax, n_pos, tokens)
        ax.set_ylabel("layer")
        if title is None:
            title = (
                f"{method_label(result.method)}: {kind} nodes, layer × position ({agg_text})\n"
                f"{_subtitle(result)}"
            )
        ax.set_title(title)
    return fig


def _node_keys(nodes: pd.DataFrame) -> list[tuple[str, int, int, int]]:
    pos = nodes["position"].to_numpy(dtype=np.float64, na_value=np.nan)
    return [
        (str(k), int(la), int(i), -1 if np.isnan(p) else int(p))
        for k, la, i, p in zip(nodes["kind"], nodes["layer"], nodes["index"], pos, strict=True)
    ]


def _exact_effects(
    estimate: Attribution, exact: Attribution | Mapping[str, Any] | None
) -> tuple[np.ndarray, np.ndarray, str]:
    """``(estimate node indices, exact signed mean effects, source)`` for the scatter."""
    if exact is None:
        if not estimate.metadata.get("verified"):
            raise ValueError(
                "no exact values to compare with: pass exact= (an exact-patching Attribution "
                "or verified data) or verify the ranking first (metadata['verified'])"
            )
        idx, eff = _verified(estimate.metadata["verified"], len(estimate))
        return idx, eff, "verified"
    if isinstance(exact, Mapping):
        idx, eff = _verified(exact, len(estimate))
        return idx, eff, "verified"
    if exact.mean_effect is None:
        raise ValueError(
            "the exact result has no signed mean effect; pass an exact-patching result"
        )
    if (
        len(exact) == len(estimate)
        and exact.nodes[["kind", "layer", "index"]].equals(
            estimate.nodes[["kind", "layer", "index"]]
        )
        and exact.nodes["position"].equals(estimate.nodes["position"])
    ):
        return np.arange(len(estimate)), np.asarray(exact.mean_effect, dtype=np.float64), "exact"
    where = {key: i for i, key in enumerate(_node_keys(exact.nodes))}
    pairs = [(i, where[k]) for i, k in enumerate(_node_keys(estimate.nodes)) if k in where]
    if not pairs:
        raise ValueError("the estimate and the exact result share no nodes")
    est_idx, ex_idx = (np.asarray(x, dtype=np.int64) for x in zip(*pairs, strict=True))
    return est_idx, np.asarray(exact.mean_effect, dtype=np.float64)[ex_idx], "exact"


def sign_agrees(estimate: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per node: the estimate and the exact effect have the same sign (zero counts as its own)."""
    return np.sign(np.asarray(estimate)) == np.sign(np.asarray(exact))


def scatter_vs_exact(
    estimate: Attribution,
    exact: Attribution | Mapping[str, Any] | None = None,
    *,
    value: str = "auto",
    annotate: int = 5,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Estimate vs exact mean effect, one point per node, coloured by node kind.

    ``exact``: an exact-patching :class:`Attribution` (nodes are matched by
    ``kind, layer, index, position``), a verified record ``{"order": [...], "mean_effect":
    [...]}`` or ``None`` to use ``estimate.metadata["verified"]`` (only verified nodes are
    drawn). ``value="signed"`` plots the signed mean estimate against the signed exact mean
    effect; ``value="score"`` the ranking score against ``|exact mean effect|``; ``"auto"``
    picks ``"signed"`` when the estimate has a signed mean (not GradDrop). The dashed line is
    ``y = x``. The ``annotate`` nodes farthest from it are labelled (e.g. ``head L23.H3``).
    """
    if value == "auto":
        value = "score" if estimate.mean_effect is None else "signed"
    if value not in ("signed", "score"):
        raise ValueError(f"unknown value {value!r}; use 'auto', 'signed' or 'score'")
    if value == "signed" and estimate.mean_effect is None:
        raise ValueError(
            f"{method_label(estimate.method)} has no signed mean (GradDrop); use value='score'"
        )
    idx, y, source = _exact_effects(estimate, exact)
    est = estimate.mean_effect if value == "signed" else estimate.scores
    x = np.asarray(est, dtype=np.float64)[idx]
    if value == "score":
        y = np.abs(y)
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        raise ValueError("no node has both an estimate and an exact value (all NaN)")
    idx, x, y = idx[ok], x[ok], y[ok]
    kinds = estimate.nodes["kind"].to_numpy(dtype=str)[idx]
    name = method_label(estimate.method)
    truth = "verified exact" if source == "verified" else "exact"
    with matplotlib.rc_context(STYLE):
        fig, ax = _figure(ax, (5.2, 4.6))
        for kind in [k for k in NODE_KINDS if k in set(kinds)]:
            sel = kinds == kind
            ax.scatter(
                x[sel],
                y[sel],
                s=14,
                alpha=0.75,
                linewidths=0,
                color=KIND_COLORS[kind],
                label=f"{kind} ({int(sel.sum())})",
            )
        lo = float(min(x.min(), y.min()))
        hi = float(max(x.max(), y.max()))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot(
            [lo - pad, hi + pad], [lo - pad, hi + pad], "--", color="0.4", lw=0.8, label="y = x"
        )
        if value == "signed":
            ax.axhline(0, color="0.85", lw=0.6, zorder=0)
            ax.axvline(0, color="0.85", lw=0.6, zorder=0)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        _annotate_outliers(ax, x, y, [str(estimate.node(int(i))) for i in idx], annotate)
        stats = [f"n = {len(x)}"]
        if len(x) > 2 and np.std(x) > 0 and np.std(y) > 0:
            r = float(np.corrcoef(x, y)[0, 1])
            rho = float(pd.Series(x).rank().corr(pd.Series(y).rank()))
            stats += [f"Pearson r = {r:.3f}", f"Spearman ρ = {rho:.3f}"]
        if value == "signed":
            stats.append(f"sign agrees: {int(sign_agrees(x, y).sum())} of {len(x)}")
        ax.text(
            0.02, 0.98, "\n".join(stats), transform=ax.transAxes, va="top", fontsize=7, color="0.25"
        )
        if value == "signed":
            ax.set_xlabel(f"{name} estimate, signed mean over pairs")
            ax.set_ylabel(f"{truth} mean effect")
        else:
            ax.set_xlabel(f"{name} score")
            ax.set_ylabel(f"|{truth} mean effect|")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), markerscale=1.5, handletextpad=0.3)
        if title is None:
            title = f"{name} vs {truth} patching\n{_subtitle(estimate)}"
        ax.set_title(title)
    return fig


def _annotate_outliers(
    ax: Axes, x: np.ndarray, y: np.ndarray, labels: list[str], k: int, fontsize: float = 7
) -> None:
    """Label the ``k`` points farthest from ``y = x``, skipping labels that would overlap."""
    if k <= 0:
        return
    to_px = ax.transData.transform
    char_w, line_h = 0.62 * fontsize, 1.3 * fontsize  # points, rough DejaVu Sans metrics
    offsets = [(4, 3, "left"), (4, -10, "left"), (-4, 3, "right"), (-4, -10, "right")]
    placed: list[tuple[float, float, float, float]] = []
    scale = ax.figure.dpi / 72.0
    for j in np.argsort(-np.abs(x - y), kind="stable"):
        if len(placed) >= k:
            break
        px, py = to_px((x[j], y[j]))
        width = char_w * len(labels[j]) * scale
        for dx, dy, ha in offsets:
            x0 = px + dx * scale - (width if ha == "right" else 0.0)
            y0 = py + dy * scale
            box = (x0, y0, x0 + width, y0 + line_h * scale)
            if all(
                box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed
            ):
                placed.append(box)
                ax.annotate(
                    labels[j],
                    (x[j], y[j]),
                    xytext=(dx, dy),
                    textcoords="offset points",
                    ha=ha,
                    fontsize=fontsize,
                    color="0.15",
                )
                break


# ---- verification depth ------------------------------------------------------------------------
def within_kind_rank(result: Attribution) -> np.ndarray:
    """Per node, its rank (1 = best) among the nodes of its kind, in :meth:`ranking` order."""
    order = result.ranking()
    kinds = result.nodes["kind"].to_numpy(dtype=str)[order]
    rank = np.empty(len(result), dtype=np.int64)
    for kind in np.unique(kinds):
        sel = kinds == kind
        rank[order[sel]] = np.arange(1, int(sel.sum()) + 1)
    return rank


def log_spaced_ranks(n: int, points: int = 200) -> np.ndarray:
    """At most ``points`` 1-based ranks from 1 to ``n``, log-spaced (all of them when few)."""
    if n <= points:
        return np.arange(1, n + 1)
    return np.unique(np.geomspace(1, n, num=points).round().astype(np.int64))


def verification_depth(
    result: Attribution,
    *,
    bound: float | None = None,
    theta: float | None = None,
    max_columns: int = 3,
) -> Figure:
    """How far down each kind's ranking verification went: one panel per verified kind.

    x = rank within the kind (log scale, 1 = best). The grey line is the method's score at
    each rank (the ranking verification walked down); dots are the verified nodes' exact
    ``|mean effect|``; the dashed line marks the deepest verified rank. Nodes right of it were
    never patched. ``bound`` (the false-negative diagnostic's upper bound on any unverified
    ``|effect|``) and ``theta`` (the effect size that matters) are drawn as horizontal lines.
    Needs ``result.metadata["verified"]``.
    """
    verified, _, _ = _values(result, "verified")  # NaN where not verified
    idx = np.flatnonzero(np.isfinite(verified))
    effect = verified[idx]
    kinds = result.nodes["kind"].to_numpy(dtype=str)
    rank = within_kind_rank(result)
    panels = [k for k in NODE_KINDS if k in set(kinds[idx])]
    name = method_label(result.method)
    with matplotlib.rc_context(STYLE):
        ncols = min(len(panels), max_columns)
        nrows = -(-len(panels) // ncols)
        fig = _new_figure((3.4 * ncols + 0.4, 2.9 * nrows + 0.6))
        grid = fig.subplots(nrows, ncols, squeeze=False)
        for extra in grid.ravel()[len(panels) :]:
            extra.remove()
        for kind, ax in zip(panels, grid.ravel(), strict=False):
            of_kind = np.flatnonzero(kinds == kind)
            curve = np.sort(result.scores[of_kind])[::-1]
            at = log_spaced_ranks(len(curve))
            ax.plot(at, curve[at - 1], color="0.55", lw=1.2, label=f"{name} score")
            sel = kinds[idx] == kind
            deepest = int(rank[idx[sel]].max())
            ax.scatter(
                rank[idx[sel]],
                np.abs(effect[sel]),
                s=16,
                color=KIND_COLORS[kind],
                zorder=3,
                label="|exact effect|",
            )
            ax.axvline(deepest, color="0.3", ls="--", lw=0.8)
            if bound is not None:
                ax.axhline(bound, color="#d62728", lw=0.9, label="diagnostic bound (unverified)")
            if theta is not None:
                ax.axhline(theta, color="#d62728", ls=":", lw=0.9, label="θ (effect that matters)")
            ax.set_xscale("log")
            _plain_log_labels(ax.xaxis)
            ax.set_title(f"{kind}: verified {int(sel.sum())}, to rank {deepest} of {len(of_kind)}")
            ax.set_xlabel(f"rank among {kind} nodes")
            ax.grid(True, which="major", color="0.92", lw=0.6)
        grid[0][0].set_ylabel("score · |exact mean effect|")
        grid[0][0].legend(loc="upper right")
        fig.suptitle(f"How far down verification went — {name}\n{_subtitle(result)}")
    return fig


# ---- per-position views ------------------------------------------------------------------------
def unit_position_matrix(
    result: Attribution, n_top: int = 12, value: str = "auto"
) -> tuple[np.ndarray, list[str], np.ndarray, bool]:
    """The top units' values at each position of a per-position result.

    A unit is ``(kind, layer, index)`` (a head, a KV head, a neuron, ...); units are ranked by
    their best score over positions and the ``n_top`` best kept. ``value="auto"`` is the
    signed mean estimate when the method has one (else the score); ``"score"`` or
    ``"mean_effect"`` pick one. Returns ``(matrix [units, positions], unit labels, node rows
    [units, positions] (-1 where none), signed)``.
    """
    if value == "auto":
        value = "score" if result.mean_effect is None else "mean_effect"
    vals, signed, _ = _values(result, value)
    has_pos = result.nodes["position"].notna().to_numpy()
    if not has_pos.any():
        raise ValueError(
            "per-position view needs a per-position result (rerun with per_position=True, CLI "
            "--per-position); this one is summed over positions"
        )
    rows = np.flatnonzero(has_pos)
    nodes = result.nodes.iloc[rows]
    keys = list(zip(nodes["kind"].astype(str), nodes["layer"], nodes["index"], strict=True))
    unit_of, _ = pd.factorize(pd.Series(keys))
    best = np.full(unit_of.max() + 1, -np.inf)
    np.maximum.at(best, unit_of, np.nan_to_num(result.scores[rows], nan=-np.inf))
    top = np.argsort(-best, kind="stable")[:n_top]
    first = [int(np.flatnonzero(unit_of == u)[0]) for u in top]
    n_pos = max(int(nodes["position"].max()) + 1, int(result.metadata.get("seq_len") or 0))
    which = np.full((len(top), n_pos), -1, dtype=np.int64)
    slot = np.full(len(best), -1, dtype=np.int64)
    slot[top] = np.arange(len(top))
    keep = slot[unit_of] >= 0
    which[slot[unit_of[keep]], nodes["position"].to_numpy(dtype=np.int64)[keep]] = rows[keep]
    matrix = np.where(which >= 0, vals[np.maximum(which, 0)], np.nan)
    labels = [str(Node(str(k), int(la), int(i))) for k, la, i in (keys[j] for j in first)]
    return matrix, labels, which, signed


def top_units_by_position(
    result: Attribution,
    tokens: Sequence[str] | None = None,
    *,
    n_top: int = 12,
    value: str = "auto",
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Heatmap of the ``n_top`` best units (rows) at every position (columns).

    See :func:`unit_position_matrix` for the units and values: signed estimates use a diverging
    colormap centred at 0, scores a sequential one. ``tokens`` (one per position, e.g. the
    clean prompt's tokens) label the x axis.
    """
    matrix, labels, _, signed = unit_position_matrix(result, n_top, value)
    n_units, n_pos = matrix.shape
    if tokens is not None and len(tokens) != n_pos:
        raise ValueError(f"got {len(tokens)} tokens for {n_pos} positions; pass one per position")
    label = "mean estimate (signed)" if signed else _value_label(result, "score", "score")
    with matplotlib.rc_context(STYLE):
        figsize = (
            float(np.clip(3.6 + 0.32 * n_pos, 5.0, 14)),
            float(np.clip(1.8 + 0.24 * n_units, 3.0, 9)),
        )
        fig, ax = _figure(ax, figsize)
        _heat(fig, ax, matrix, signed, label)
        ax.set_yticks(np.arange(n_units), labels)
        _position_axis(ax, n_pos, tokens)
        if title is None:
            title = (
                f"{method_label(result.method)}: top {n_units} units by position\n"
                f"{_subtitle(result)}"
            )
        ax.set_title(title)
    return fig


# ---- cost of verified recall -------------------------------------------------------------------
_X_COLUMNS = ("x", "n_recalled", "recalled", "top_x")
_COST_COLUMNS = ("cost", "forward_passes")
_NAME_COLUMNS = ("method", "name")


def _pick(df: pd.DataFrame, names: Sequence[str], what: str) -> str:
    for n in names:
        if n in df.columns:
            return n
    raise ValueError(f"curves need a {what} column (one of {', '.join(names)}); got {list(df)}")


def curves_frame(curves: pd.DataFrame | Mapping[str, Any]) -> pd.DataFrame:
    """Long frame ``method, x, cost[, kind][, cost_lo, cost_hi]``."""
    if isinstance(curves, Mapping):
        parts = []
        for name, c in curves.items():
            if isinstance(c, pd.DataFrame):
                part = c.copy()
            elif isinstance(c, Mapping):
                part = pd.DataFrame(dict(c))
            else:
                if len(c) != 2:
                    raise ValueError(f"curve {name!r}: expected (x, cost), got {len(c)} items")
                x, cost = (np.asarray(a, dtype=np.float64).reshape(-1) for a in c)
                if x.shape != cost.shape:
                    raise ValueError(f"curve {name!r}: x has {len(x)} points, cost {len(cost)}")
                part = pd.DataFrame({"x": x, "cost": cost})
            part["method"] = str(name)
            parts.append(part)
        if not parts:
            raise ValueError("no curves given")
        curves = pd.concat(parts, ignore_index=True)
    df = pd.DataFrame(curves)
    out = pd.DataFrame(
        {
            "method": df[_pick(df, _NAME_COLUMNS, "method")].astype(str),
            "x": pd.to_numeric(df[_pick(df, _X_COLUMNS, "x")], errors="coerce"),
            "cost": pd.to_numeric(df[_pick(df, _COST_COLUMNS, "cost")], errors="coerce"),
        }
    )
    for col in ("kind", "cost_lo", "cost_hi"):
        if col in df.columns:
            out[col] = df[col].to_numpy()
    return out


def _plain_log_labels(axis: Any) -> None:
    """Log-axis labels as plain numbers (1, 10, 100); minor ticks labelled only within a decade."""

    def minor(v: float, _: Any) -> str:
        lo, hi = sorted(axis.get_view_interval())
        return f"{v:g}" if lo > 0 and hi / lo < 10 else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def recall_curve(
    curves: pd.DataFrame | Mapping[str, Any],
    *,
    kinds: Sequence[str] | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    title: str | None = None,
    ylabel: str = "cost (forward passes per pair)",
    max_columns: int = 3,
) -> Figure:
    """Cost-of-verified-recall curves on log-log axes, one panel per node kind.

    ``curves``: a long DataFrame with columns ``method``, ``x`` (number of true top nodes
    recalled), ``cost`` (forward passes, method cost included; backward = 2) and optionally
    ``kind`` (one panel per node kind) and ``cost_lo``/``cost_hi`` (a shaded band), e.g. the
    table of :func:`atp_nnsight.evaluation.recall.curves`; or a dict ``name -> (x, cost)`` (or
    ``name -> DataFrame``). ``kinds`` picks panels; by default every kind except the ``"all"``
    summary when per-kind curves exist. Points with non-positive or non-finite values are left
    out (log axes). The dashed diagonal ``y = x`` is the oracle verification order: every node
    must be verified, so no verification curve lies below it. ``ax``: one axes per panel;
    without it panels are laid out ``max_columns`` to a row.
    """
    from matplotlib.colors import to_hex

    df = curves_frame(curves)
    df = df[np.isfinite(df["x"]) & np.isfinite(df["cost"]) & (df["x"] > 0) & (df["cost"] > 0)]
    if df.empty:
        raise ValueError("no positive, finite (x, cost) points to draw on log-log axes")
    if "kind" in df.columns:
        df = df.assign(kind=df["kind"].astype(str))
        available = [k for k in NODE_KINDS if k in set(df["kind"])]
        available += sorted(set(df["kind"]) - set(NODE_KINDS))
        if kinds is None:
            panels: list[str | None] = [k for k in available if k != "all"] or available
        else:
            missing = [k for k in kinds if k not in available]
            if missing:
                raise ValueError(f"no curves for kind(s) {missing}; available: {available}")
            panels = list(kinds)
    elif kinds is not None:
        raise ValueError("kinds= needs curves with a 'kind' column")
    else:
        panels = [None]
    methods = list(dict.fromkeys(df["method"]))
    taken = {to_hex(c) for c in _METHOD_COLORS.values()}
    cycle = iter(c for c in matplotlib.colormaps["tab10"].colors if to_hex(c) not in taken)
    colors = {m: _METHOD_COLORS.get(m.lower()) or next(cycle, "0.3") for m in methods}
    with matplotlib.rc_context(STYLE):
        if ax is None:
            ncols = min(len(panels), max_columns)
            nrows = -(-len(panels) // ncols)
            fig = _new_figure((4.2 * ncols + 1.6, 3.7 * nrows + 0.4))  # + legend
            grid = fig.subplots(nrows, ncols, squeeze=False)
            axes = list(grid.ravel()[: len(panels)])
            for extra in grid.ravel()[len(panels) :]:
                extra.remove()
        else:
            axes = [ax] if not isinstance(ax, Sequence | np.ndarray) else list(np.ravel(ax))
            if len(axes) != len(panels):
                raise ValueError(
                    f"curves have {len(panels)} panel(s) {panels} but {len(axes)} axes"
                )
            fig = _root(axes[0])
        for panel, a in zip(panels, axes, strict=True):
            sub = df if panel is None else df[df["kind"].astype(str) == panel]
            for m in methods:
                c = sub[sub["method"] == m].sort_values("x")
                if c.empty:
                    continue
                a.plot(
                    c["x"],
                    c["cost"],
                    color=colors[m],
                    lw=1.8 if m.lower() == "atp*" else 1.2,
                    zorder=3 if m.lower() == "atp*" else 2,  # the headline method on top
                    marker="." if len(c) <= 30 else None,
                    ms=4,
                    label=method_label(m),
                )
                if "cost_lo" in c.columns and "cost_hi" in c.columns:
                    a.fill_between(
                        c["x"], c["cost_lo"], c["cost_hi"], color=colors[m], alpha=0.15, lw=0
                    )
            xmax = float(max(sub["x"].max(), 1.0))
            a.plot([1, xmax], [1, xmax], "--", color="0.4", lw=0.8, label="oracle (y = x)")
            a.set_xscale("log")
            a.set_yscale("log")
            for axis in (a.xaxis, a.yaxis):
                _plain_log_labels(axis)
            a.set_xlabel("top-x true nodes recalled")
            a.set_ylabel(ylabel)
            a.grid(True, which="major", color="0.92", lw=0.6)
            if panel is not None:
                a.set_title("all nodes" if panel == "all" else f"{panel} nodes")
        if ax is None:
            handles, labels = axes[0].get_legend_handles_labels()
            for a in axes[1:]:  # methods missing from the first panel
                for h, lab in zip(*a.get_legend_handles_labels(), strict=True):
                    if lab not in labels:
                        handles.append(h)
                        labels.append(lab)
            fig.legend(handles, labels, loc="outside right upper")
        else:
            axes[0].legend(loc="best")
        if title is None:
            title = "Cost of verified recall"
        if ax is None:
            fig.suptitle(title, fontsize=STYLE["axes.titlesize"])
        elif len(axes) == 1 and panels == [None]:
            axes[0].set_title(title)
    return fig
