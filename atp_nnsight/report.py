"""A self-contained, explorable HTML report of one or more attribution runs.

:func:`write_report` writes into one folder:

* ``report.html`` — one file that opens offline (inline CSS, plotly.js and every figure's
  data inline; no network): the run's settings and conventions; what was verified (estimate vs
  exact for every verified node, with sign agreement; how far down each kind's ranking
  verification went and what it cost; what may still be missing); interactive heatmaps and
  scatter plots (hover a cell or point for its node, score, exact effect and rank; click it to
  filter the ranked table); per-position views; ranked tables that sort by any column;
* every figure as a ``.png`` file (matplotlib, Agg backend) for papers;
* every result as ``<name>.npz`` (:meth:`Attribution.save`, load with
  :meth:`Attribution.load`) and ``<name>.csv`` (:meth:`Attribution.to_csv`).

The cost-of-verified-recall curve needs ground truth (exact patching of every node) and is only
drawn when ``curves=`` are passed (see :func:`atp_nnsight.evaluation.curves`).
"""

from __future__ import annotations

import datetime as _dt
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from atp_nnsight import interactive, plots
from atp_nnsight.evaluation.diagnostic import THETA_FRACTION
from atp_nnsight.results import Attribution
from atp_nnsight.types import NODE_KINDS

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from atp_nnsight.evaluation.diagnostic import Diagnosis

__all__ = ["write_report"]

HEATMAP_KINDS = ("head", "q", "k", "v", "neuron")
"""Node kinds drawn as layer x unit heatmaps (the others appear in the tables)."""

INTERACTIVE_COLUMNS = 256
"""Most columns of an interactive heatmap; wider kinds (neurons) are pooled into blocks."""

TOP_UNITS = 12
"""Units (heads, neurons, ...) in the per-position view."""

MATTERS_FRACTION = THETA_FRACTION
"""A verified node "matters" when its exact ``|effect|`` is at least this fraction of the
largest verified one (the false-negative diagnostic's default ``θ``)."""

_DIRECTION_TEXT = {
    "noising": "noising — the noise prompt's activation is patched into the clean run",
    "denoising": "denoising — the clean prompt's activation is patched into the noise run",
}

_CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#f6f8fa; --accent:#0b5cad; }
* { box-sizing: border-box; }
body { font: 14px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg);
  max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 36px 0 10px; padding-bottom: 4px;
  border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 22px 0 8px; }
p.sub { color: var(--muted); margin: 0 0 18px; }
.note { background: var(--bg); border: 1px solid var(--line); border-radius: 6px;
  padding: 10px 14px; }
.note ul { margin: 4px 0; padding-left: 20px; }
.warn { border-left: 4px solid #d62728; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { width: 180px; }
table.ranked th { cursor: pointer; user-select: none; white-space: nowrap; }
table.ranked th[aria-sort="ascending"]::after { content: " ▲"; }
table.ranked th[aria-sort="descending"]::after { content: " ▼"; }
table.ranked tr.hidden { display: none; }
.scroll { overflow: auto; max-width: 100%; }
.scroll.tall { max-height: 560px; }
.filter { margin: 4px 0; color: var(--muted); }
.filter button { margin-left: 8px; }
code, .pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px;
  white-space: pre-wrap; }
figure { margin: 8px 0 24px; max-width: 100%; }
.plot { max-width: 100%; overflow-x: auto; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; max-width: 900px; }
figcaption b { color: var(--fg); }
a { color: var(--accent); }
ul.files { columns: 3; font-size: 13px; }
"""

# Renders every figure from its JSON spec and wires figures to tables: a click on a point or
# cell filters the ranked table named by the figure's data-table; a click on a column header
# sorts that table. <body data-figures-rendered> counts the figures plotly has drawn.
_SCRIPT = """
(function () {
  var CONFIG = {displaylogo: false, responsive: true};
  function rows(table) { return Array.prototype.slice.call(table.tBodies[0].rows); }
  function filterTable(id, key) {
    var table = document.getElementById(id);
    if (!table) return;
    var shown = 0;
    rows(table).forEach(function (row) {
      var node = row.getAttribute('data-node');
      var match = node === key || node.indexOf(key + '@') === 0;
      row.classList.toggle('hidden', !match);
      if (match) shown++;
    });
    var state = document.querySelector('[data-filter-for="' + id + '"]');
    state.querySelector('.state').textContent = shown
      ? 'Showing ' + shown + ' row(s) for ' + key + '.'
      : key + ' is not among the rows of this table (see its rank in the hover label).';
    state.querySelector('button').hidden = false;
    state.scrollIntoView({block: 'nearest'});
  }
  function clearFilter(id) {
    rows(document.getElementById(id)).forEach(function (r) { r.classList.remove('hidden'); });
    var state = document.querySelector('[data-filter-for="' + id + '"]');
    state.querySelector('.state').textContent = '';
    state.querySelector('button').hidden = true;
  }
  function sortBy(th) {
    var table = th.closest('table');
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var ascending = th.getAttribute('aria-sort') !== 'ascending';
    Array.prototype.forEach.call(th.parentNode.children, function (h) {
      h.removeAttribute('aria-sort');
    });
    th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
    var numeric = th.getAttribute('data-type') === 'number';
    function key(row) {
      var cell = row.cells[col], v = cell.getAttribute('data-sort');
      if (v === null) v = cell.textContent;
      return numeric ? (v === '' ? NaN : parseFloat(v)) : v;
    }
    var sorted = rows(table).sort(function (a, b) {
      var x = key(a), y = key(b);
      if (numeric) {
        if (isNaN(x)) return isNaN(y) ? 0 : 1;
        if (isNaN(y)) return -1;
        return ascending ? x - y : y - x;
      }
      return ascending ? x.localeCompare(y) : y.localeCompare(x);
    });
    sorted.forEach(function (row) { table.tBodies[0].appendChild(row); });
  }
  document.querySelectorAll('table.ranked th').forEach(function (th) {
    th.addEventListener('click', function () { sortBy(th); });
  });
  document.querySelectorAll('[data-filter-for] button').forEach(function (b) {
    b.addEventListener('click', function () {
      clearFilter(b.parentNode.getAttribute('data-filter-for'));
    });
  });
  var rendered = 0;
  document.querySelectorAll('script.figure-spec').forEach(function (spec) {
    var div = document.getElementById(spec.getAttribute('data-target'));
    var fig = JSON.parse(spec.textContent);
    Plotly.newPlot(div, fig.data, fig.layout, CONFIG).then(function () {
      div.setAttribute('data-rendered', '1');
      document.body.setAttribute('data-figures-rendered', String(++rendered));
    });
    div.on('plotly_click', function (event) {
      var point = event.points[0], data = point && point.customdata;
      if (data && data[0] !== 'no node' && div.getAttribute('data-table')) {
        filterTable(div.getAttribute('data-table'), data[4]);
      }
    });
  });
})();
"""


_SECTIONS = (
    "What was verified",
    "Estimate vs exact",
    "Scores",
    "Exact effects",
    "Positions",
    "Cost of verified recall",
)


@dataclass
class _Figure:
    """One figure of the page: the interactive version and its PNG twin."""

    plot: go.Figure
    png: str
    caption: str  # HTML (already escaped)
    table: str | None  # id of the ranked table a click filters


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _slug(name: str, taken: set[str]) -> str:
    base = name.replace("*", "_star").replace("+", "_")
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._") or "result"
    slug, i = base, 2
    while slug.lower() in taken:
        slug, i = f"{base}_{i}", i + 1
    taken.add(slug.lower())
    return slug


def _fmt(v: Any) -> str:
    """Compact text for a table cell or setting."""
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
        return ""
    if isinstance(v, bool | np.bool_):
        return "yes" if v else "no"
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        return f"{float(v):.4g}"
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    if isinstance(v, list | tuple | np.ndarray):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _ranges(values: Sequence[int]) -> str:
    """``[0,1,2,3,7]`` -> ``"0–3, 7"``."""
    vals = sorted({int(v) for v in values})
    spans: list[list[int]] = []
    for v in vals:
        if spans and spans[-1][1] == v - 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in spans)


def _html_table(df: pd.DataFrame, cls: str = "") -> str:
    """An escaped HTML table; numeric columns are right-aligned."""
    num = {c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])}
    head = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)
    rows = []
    for rec in df.itertuples(index=False):
        cells = []
        for col, v in zip(df.columns, rec, strict=True):
            attr = ' class="num"' if col in num else ""
            cells.append(f"<td{attr}>{_esc(_fmt(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    klass = f' class="{_esc(cls)}"' if cls else ""
    return (
        f'<div class="scroll"><table{klass}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _kv_table(items: Sequence[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_fmt(v))}</td></tr>" for k, v in items)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _kinds(r: Attribution) -> list[str]:
    present = set(r.nodes["kind"].unique())
    return [k for k in NODE_KINDS if k in present]


def _per_position(r: Attribution) -> bool:
    return bool(r.nodes["position"].notna().any())


def _nodes_text(r: Attribution) -> str:
    counts = r.nodes["kind"].value_counts()
    kinds = ", ".join(f"{k} ({int(counts[k])})" for k in _kinds(r))
    layers = _ranges(r.nodes["layer"].tolist()) if len(r) else "none"
    if _per_position(r):
        n_pos = r.metadata.get("seq_len") or int(r.nodes["position"].max()) + 1
        gran = f"per position ({n_pos} positions)"
    else:
        gran = "summed over positions"
    return f"{len(r)} nodes: {kinds}; layers {layers}; {gran}"


def _exact_values(r: Attribution, exact: Attribution | None) -> tuple[np.ndarray, str] | None:
    """Exact mean effect per node of ``r`` (NaN where unknown) and its source, if any.

    ``exact`` matched by node when it shares nodes with ``r``; otherwise ``r``'s own verified
    nodes (``metadata["verified"]``).
    """
    try:
        idx, eff, source = plots._exact_effects(r, exact)
    except ValueError:
        if exact is None:
            return None
        try:  # exact shares no nodes with r: fall back to r's own verified nodes
            idx, eff, source = plots._exact_effects(r, None)
        except ValueError:
            return None
    out = np.full(len(r), np.nan)
    out[idx] = eff
    return out, source


def _signed_estimate(r: Attribution) -> np.ndarray | None:
    """The signed mean estimate per node (``None`` for unsigned methods and exact patching)."""
    return None if r.method == "exact" else r.mean_effect


def _per_pair(r: Attribution) -> float:
    return r.cost / max(r.per_pair.shape[0], 1)


# ---- ranked tables -----------------------------------------------------------------------------
@dataclass
class _Column:
    name: str
    values: Sequence[Any]
    numeric: bool


def _ranked_rows(r: Attribution, top_k: int, rank: np.ndarray) -> np.ndarray:
    """The top ``top_k`` nodes and every verified node, best ``rank`` first."""
    verified = plots._verified(r.metadata["verified"], len(r))[0] if _verified(r) else []
    rows = np.union1d(r.ranking()[:top_k], np.asarray(verified, dtype=np.int64))
    return rows[np.argsort(rank[rows])]


def _ranked_columns(
    r: Attribution,
    rows: np.ndarray,
    info: interactive.NodeInfo,
    exact_source: str | None,
    tokens: Sequence[str] | None,
) -> list[_Column]:
    nodes = r.nodes.iloc[rows]
    positions = nodes["position"].to_numpy(dtype=np.float64, na_value=np.nan)
    pos_text = [
        "all"
        if np.isnan(p)
        else f"{int(p)}" + (f" {tokens[int(p)]!r}" if tokens is not None else "")
        for p in positions
    ]
    cols = [
        _Column("rank", info.rank[rows], True),
        _Column("node", [info.label(int(i)) for i in rows], False),
        _Column("kind", nodes["kind"].astype(str).tolist(), False),
        _Column("layer", nodes["layer"].to_numpy(), True),
        _Column("index", nodes["index"].to_numpy(), True),
        _Column("position", pos_text, False),
        _Column("score", r.scores[rows], True),
    ]
    if r.method == "exact" and r.mean_effect is not None:
        cols.append(_Column("exact mean effect", r.mean_effect[rows], True))
    signed = _signed_estimate(r)
    if signed is not None:
        cols.append(_Column("signed mean estimate", signed[rows], True))
    if exact_source is not None and r.method != "exact":
        name = "verified exact effect" if exact_source == "verified" else "exact mean effect"
        cols.append(_Column(name, info.exact[rows], True))
        if signed is not None:
            ex = info.exact[rows]
            agrees = np.where(
                np.isfinite(ex), np.where(plots.sign_agrees(signed[rows], ex), "yes", "no"), ""
            )
            cols.append(_Column("sign agrees", agrees.tolist(), False))
    return cols


def _ranked_table(table_id: str, cols: list[_Column], labels: list[str]) -> str:
    head = "".join(
        f'<th data-type="{"number" if c.numeric else "text"}">{_esc(c.name)}</th>' for c in cols
    )
    body = []
    for j, label in enumerate(labels):
        cells = []
        for c in cols:
            v = c.values[j]
            if c.numeric:
                num = float(v)
                sort = "" if not np.isfinite(num) else repr(num)
                cells.append(f'<td class="num" data-sort="{sort}">{_esc(_fmt(v))}</td>')
            else:
                cells.append(f"<td>{_esc(_fmt(v))}</td>")
        body.append(f'<tr data-node="{_esc(label)}">{"".join(cells)}</tr>')
    return (
        f'<p class="filter" data-filter-for="{_esc(table_id)}"><span class="state"></span>'
        '<button type="button" hidden>show all rows</button></p>'
        f'<div class="scroll tall"><table class="ranked" id="{_esc(table_id)}">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


# ---- verification summary ----------------------------------------------------------------------
def _verified(r: Attribution) -> bool:
    info = r.metadata.get("verified")
    return bool(info) and len(info.get("mean_effect", [])) > 0


def depth_table(r: Attribution) -> pd.DataFrame:
    """Per verified kind: how far down the ranking verification went.

    Columns: ``kind``, ``nodes`` (of that kind), ``verified``, ``deepest rank`` (within the
    kind), ``deepest overall rank``, ``score there / top score`` (the score at the deepest
    verified rank as a fraction of the kind's top score), ``largest |exact|`` and ``|exact| of
    the last verified`` node (the deepest one).
    """
    idx, effect = plots._verified(r.metadata["verified"], len(r))
    kinds = r.nodes["kind"].to_numpy(dtype=str)
    within = plots.within_kind_rank(r)
    overall = np.empty(len(r), dtype=np.int64)
    overall[r.ranking()] = np.arange(1, len(r) + 1)
    rows = []
    for kind in (k for k in NODE_KINDS if k in set(kinds[idx])):
        sel = kinds[idx] == kind
        mine, eff = idx[sel], effect[sel]
        deepest = mine[np.argmax(within[mine])]
        top_score = float(r.scores[kinds == kind].max())
        rows.append(
            {
                "kind": kind,
                "nodes": int((kinds == kind).sum()),
                "verified": int(sel.sum()),
                "deepest rank": int(within[deepest]),
                "deepest overall rank": int(overall[deepest]),
                "score there / top score": float(r.scores[deepest]) / top_score
                if top_score
                else np.nan,
                "largest |exact|": float(np.abs(eff).max()),
                "|exact| of the last verified": float(abs(eff[np.argmax(within[mine])])),
            }
        )
    return pd.DataFrame(rows)


def _held_up_text(r: Attribution, exact_vals: np.ndarray, verified_idx: np.ndarray) -> str:
    ex = exact_vals[verified_idx]
    theta = MATTERS_FRACTION * float(np.abs(ex).max())
    matters = int((np.abs(ex) >= theta).sum())
    parts = [
        f"{matters} of the {len(ex)} verified nodes have an exact |effect| of at least "
        f"{theta:.3g} ({MATTERS_FRACTION:.0%} of the largest verified one); the other "
        f"{len(ex) - matters} were ranked high by the estimate but matter little when patched."
    ]
    signed = _signed_estimate(r)
    if signed is not None:
        agree = plots.sign_agrees(signed[verified_idx], ex)
        parts.append(
            f"The sign of the estimate agrees with the exact effect for {int(agree.sum())} of "
            f"{len(ex)}."
        )
    else:
        parts.append(
            f"{plots.method_label(r.method)} scores are unsigned (GradDrop), so sign agreement "
            "cannot be checked here; the plot compares the score with |exact effect|."
        )
    return " ".join(parts)


def _missing_html(r: Attribution, diagnosis: Diagnosis | None, diagnose_command: str | None) -> str:
    """The "what may be missing" paragraph (and the diagnostic's flagged nodes)."""
    n_verified = len(r.metadata["verified"]["mean_effect"])
    n_rest = len(r) - n_verified
    if diagnosis is None:
        how = (
            f"<code>{_esc(diagnose_command)}</code>"
            if diagnose_command
            else "<code>atp_nnsight.evaluation.diagnose(model, pairs, result)</code> on this "
            "verified result"
        )
        return (
            f'<p class="note warn">Nothing bounds the effects of the {n_rest} nodes that were '
            "not verified: any of them may matter as much as a verified one. The "
            f"false-negative diagnostic bounds them: {how}.</p>"
        )
    d = diagnosis
    where = ""
    if d.bound_node is not None:
        label = d.nodes.set_index("node").loc[d.bound_node, "label"]
        where = f" (attained at {_esc(label)})"
    decision = "below" if d.stop else "not below"
    text = (
        f'<p class="note">The false-negative diagnostic patched {d.n_subsets} random subsets of '
        f"the {len(d.nodes)} unverified nodes (each node with probability {d.p:.3g}; cost "
        f"{d.cost:g} forward passes). At confidence {1 - d.delta:.0%}, no unverified node has "
        f"an exact |effect| above <b>{d.bound:.4g}</b>{where}, under the diagnostic's additive "
        f"model. That is {decision} θ = {d.theta:.4g}, the effect size that matters, so its "
        f"stopping rule says <b>{'stop' if d.stop else 'keep'} verifying</b>. "
        f"Suspected false negatives (flagged): {len(d.flagged)}.</p>"
    )
    if len(d.flagged):
        cols = ["label", "rank", "score", "estimate", "corrected", "lower", "upper"]
        text += _html_table(d.flagged[cols].head(20))
    return text


# ---- figures -----------------------------------------------------------------------------------
_DPI = 130


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=_DPI, metadata={"Software": None})


def _score_caption(r: Attribution, kind: str) -> str:
    name = plots.method_label(r.method)
    if r.method == "exact":
        what = "|exact mean effect| (the magnitude of the signed mean over pairs)"
    elif r.mean_effect is None:
        what = "the GradDrop score (mean over pairs of the per-layer-averaged |estimate|; unsigned)"
    else:
        what = "mean over pairs of |estimated effect| (unsigned: large = important either way)"
    agg = (
        " Per-position nodes are aggregated per cell as the sum over positions of |score|."
        if _per_position(r)
        else " Nodes are summed over positions (one patch of the whole sequence)."
    )
    unit = {"k": "KV heads", "v": "KV heads", "q": "query heads", "neuron": "neurons"}.get(
        kind, "heads"
    )
    return (
        f"<b>{_esc(name)} score of {_esc(kind)} nodes</b> — rows are layers (layer 0 at the "
        f"top), columns are {_esc(unit)}. Colour = {_esc(what)}.{_esc(agg)} Grey = no value."
    )


def _effect_caption(kind: str, source: str, direction: str) -> str:
    sign = (
        "Under noising, a negative effect means the clean activation supports the clean "
        "target over the noise target (with the logit-difference metric)."
        if direction == "noising"
        else "Under denoising, a positive effect means restoring the clean activation "
        "recovers the clean behaviour (with the logit-difference metric)."
    )
    if source == "verified":
        what = (
            f"exact mean effect of the {kind} nodes verified in ranked order "
            "(one real patch each); grey = not verified"
        )
    else:
        what = f"exact activation-patching mean effect of every {kind} node"
    return (
        f"<b>{_esc(what[0].upper() + what[1:])}.</b> Signed mean over pairs of "
        "metric(patched) − metric(unpatched): red = patching raises the metric, blue = lowers "
        f"it; the colour scale is centred at 0. {_esc(sign)}"
    )


_SHORT_VALUE_NAMES = {"score": "score", "mean_effect": "exact effect", "verified": "exact effect"}
"""Colour-bar titles of the interactive heatmaps (the captions say what each value is)."""


def _unit_heatmap(
    r: Attribution, kind: str, value: str, info: interactive.NodeInfo, title: str
) -> go.Figure:
    """The interactive twin of :func:`plots.head_heatmap` (wide kinds pooled in blocks)."""
    vals, signed, label = plots._values(r, value)
    matrix, layers, summed = plots.layer_unit_matrix(r, kind, vals)
    scores, _, _ = plots.layer_unit_matrix(r, kind, "score")
    # a cell without a value (not verified) still names its node: the best-scoring one
    nodes = plots.layer_unit_nodes(r, kind, vals)
    nodes = np.where(nodes >= 0, nodes, plots.layer_unit_nodes(r, kind, "score"))
    block = plots.column_block(matrix.shape[1], INTERACTIVE_COLUMNS)
    unit = plots._UNIT_NAMES.get(kind, "unit")
    x_title = unit
    if block > 1:
        matrix, source = plots.pool_columns(matrix, block)
        source = np.where(source >= 0, source, plots.pool_columns(scores, block)[1])
        nodes = np.where(source >= 0, np.take_along_axis(nodes, np.maximum(source, 0), 1), -1)
        x_title = f"{unit} (blocks of {block}: the one with the largest |value| is shown)"
    label = _SHORT_VALUE_NAMES.get(value, label)
    if summed:
        signed, label = False, f"Σ|{label}| over positions"
    return interactive.heatmap_figure(
        matrix,
        nodes,
        info,
        signed=signed,
        title=title,
        value_name=label,
        x_title=x_title,
        x_step=block,
        y_labels=[str(x) for x in layers],
        y_title="layer",
        filter_unit=summed,
        show_value=summed,
    )


def _position_heatmap(
    r: Attribution,
    kind: str,
    info: interactive.NodeInfo,
    tokens: Sequence[str] | None,
    title: str,
) -> go.Figure:
    matrix, layers = plots.layer_position_matrix(r, kind, "score")
    return interactive.heatmap_figure(
        matrix,
        plots.layer_position_nodes(r, kind, "score"),
        info,
        signed=False,
        title=title,
        value_name="largest score",
        x_title="clean prompt token" if tokens is not None else "position",
        x_labels=tokens,
        y_labels=[str(x) for x in layers],
        y_title="layer",
    )


def _units_by_position(
    r: Attribution, info: interactive.NodeInfo, tokens: Sequence[str] | None, title: str
) -> go.Figure:
    matrix, labels, nodes, signed = plots.unit_position_matrix(r, TOP_UNITS)
    return interactive.heatmap_figure(
        matrix,
        nodes,
        info,
        signed=signed,
        title=title,
        value_name="mean estimate (signed)" if signed else "score",
        x_title="clean prompt token" if tokens is not None else "position",
        x_labels=tokens,
        y_labels=labels,
        y_title="",
        show_value=signed,
    )


def _scatter(
    r: Attribution, info: interactive.NodeInfo, title: str
) -> tuple[go.Figure, np.ndarray]:
    """Estimate vs exact for every node with an exact value; also returns those nodes."""
    idx = np.flatnonzero(np.isfinite(info.exact))
    signed = _signed_estimate(r)
    if signed is not None:
        x, y = signed[idx], info.exact[idx]
    else:
        x, y = r.scores[idx], np.abs(info.exact[idx])
    ok = np.isfinite(x) & np.isfinite(y)
    fig = interactive.scatter_figure(
        idx[ok], x[ok], y[ok], info, signed=signed is not None, title=title
    )
    return fig, idx[ok]


def _check_tokens(results: Mapping[str, Attribution], tokens: Sequence[str] | None) -> None:
    if tokens is None:
        return
    for name, r in results.items():
        if not _per_position(r):
            continue
        n_pos = max(int(r.nodes["position"].max()) + 1, int(r.metadata.get("seq_len") or 0))
        if len(tokens) != n_pos:
            raise ValueError(
                f"got {len(tokens)} tokens for {n_pos} positions of {name!r}; pass one token "
                "per position (the clean prompt's tokens)"
            )


def write_report(
    folder: str | Path,
    results: Mapping[str, Attribution],
    *,
    settings: Mapping[str, Any],
    exact: Attribution | None = None,
    diagnosis: Diagnosis | None = None,
    diagnose_command: str | None = None,
    curves: pd.DataFrame | Mapping[str, Any] | None = None,
    tables: Mapping[str, pd.DataFrame] | None = None,
    tokens: Sequence[str] | None = None,
    title: str | None = None,
    top_k: int = 20,
    max_pairs: int = 8,
) -> Path:
    """Write a self-contained, interactive HTML report, its PNG figures and the results.

    Args:
        folder: output directory (created if missing; existing files of the same names are
            overwritten).
        results: ``name -> Attribution`` (e.g. ``{"atp*": r, "atp": r2}``). The AtP* result
            (``method == "atp*"``), else the first, is the main one: its verified nodes
            (``metadata["verified"]``, from :func:`atp_nnsight.evaluation.verify`) are
            summarised — estimate vs exact with sign agreement, how far down each kind's
            ranking verification went and its cost, and what may be missing.
        settings: the run's settings shown at the top (e.g. task, seed, time in seconds);
            model, pairs, nodes, methods, direction, metric and costs are filled in from the
            results. Keys and values are shown as text (escaped).
        exact: exact activation patching of (some of) the same nodes: adds exact-effect
            heatmaps, estimate-vs-exact scatter plots and exact columns in the tables.
        diagnosis: the false-negative diagnostic of the main result
            (:func:`atp_nnsight.evaluation.diagnose`): its bound on any unverified effect is
            shown. Without it the report says that nothing bounds the unverified nodes and
            gives ``diagnose_command`` (e.g. the CLI command that would), or the Python call.
        curves: cost-of-verified-recall curves against ground truth (exact patching of every
            node; :func:`atp_nnsight.evaluation.curves`), drawn log–log.
        tables: extra ``title -> DataFrame`` tables, shown as they are.
        tokens: the clean prompt's tokens (one per position), labelling per-position views.
        title: page title (default: ``"Attribution report — <model>"``).
        top_k: ranked-table rows per result (plus every verified node).
        max_pairs: prompt pairs listed.

    Returns:
        The path of ``report.html``.
    """
    if not results:
        raise ValueError("write_report needs at least one result")
    for name, r in results.items():
        if not isinstance(r, Attribution):
            raise TypeError(f"results[{name!r}] is {type(r).__name__}, not an Attribution")
    _check_tokens(results, tokens)
    main_name = next((n for n, r in results.items() if r.method == "atp*"), next(iter(results)))
    main = results[main_name]
    if diagnosis is not None:
        if not _verified(main):
            raise ValueError("a diagnosis needs a verified main result (metadata['verified'])")
        if len(diagnosis.nodes) and int(diagnosis.nodes["node"].max()) >= len(main):
            raise ValueError(f"the diagnosis is of another result than {main_name!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    taken: set[str] = {"report"}
    slugs = {name: _slug(str(name), taken) for name in results}
    exact_slug = _slug("exact", taken) if exact is not None else None

    # ---- data files ------------------------------------------------------------------------
    files: list[str] = []
    saved = [(slugs[n], r) for n, r in results.items()]
    if exact is not None and exact_slug is not None:
        saved.append((exact_slug, exact))
    for slug, r in saved:
        r.save(folder / f"{slug}.npz")
        r.to_csv(folder / f"{slug}.csv")
        files += [f"{slug}.csv", f"{slug}.npz"]

    # ---- what each result knows about exact effects ----------------------------------------
    infos: dict[str, interactive.NodeInfo] = {}
    sources: dict[str, str | None] = {}
    for name, r in results.items():
        found = _exact_values(r, exact) if r.method != "exact" else None
        values, source = found if found is not None else (None, None)
        note = "not verified" if source == "verified" else "not patched"
        if r.method == "exact" and r.mean_effect is not None:
            values, source, note = np.asarray(r.mean_effect, dtype=np.float64), "exact", ""
        infos[name] = interactive.NodeInfo(r, values, note)
        sources[name] = source
    table_ids = {name: f"ranked-{slugs[name]}" for name in results}
    main_info, main_table = infos[main_name], table_ids[main_name]

    page: dict[str, list[str | _Figure]] = {section: [] for section in _SECTIONS}

    def add(section: str, plot: go.Figure, png_fig: Any, png: str, caption: str, table: str | None):
        _save(png_fig, folder / png)
        files.append(png)
        page[section].append(_Figure(plot, png, caption, table))

    subtitle = plots._subtitle(main)
    with plots.agg_figures():
        # -- what was verified -------------------------------------------------------------
        if _verified(main):
            section = page["What was verified"]
            name = plots.method_label(main.method)
            ver = main.metadata["verified"]
            idx = plots._verified(ver, len(main))[0]
            n_pairs = main.per_pair.shape[0]
            section.append(
                f"<p>{len(idx)} of {len(main)} nodes were verified with exact activation "
                f"patching (one real patch per node and pair), taking each kind's best-ranked "
                f"nodes in {_esc(name)} order. Verification cost {ver['cost']:g} forward passes "
                f"({ver['cost'] / max(n_pairs, 1):g} per pair), on top of the ranking's "
                f"{main.cost:g} ({_per_pair(main):g} per pair).</p>"
            )
            plot, shown = _scatter(main, main_info, f"Which candidates held up? {name} vs exact")
            section.append(
                "<h3>Which candidates held up?</h3>"
                f"<p>{_esc(_held_up_text(main, main_info.exact, shown))}</p>"
            )
            add(
                "What was verified",
                plot,
                plots.scatter_vs_exact(main),
                "verified_vs_estimate.png",
                "<b>Estimate vs exact effect of every verified node.</b> "
                + (
                    "x = signed mean estimate, y = exact signed mean effect; blue = the signs "
                    "agree, red = they differ."
                    if _signed_estimate(main) is not None
                    else "x = the (unsigned) score, y = |exact mean effect|; colour = node kind."
                )
                + " Dashed: y = x. Hover a point for its node; click it to find it in the table.",
                main_table,
            )
            section.append("<h3>How far down did verification go, and what did it cost?</h3>")
            bound = None if diagnosis is None else diagnosis.bound
            theta = None if diagnosis is None else diagnosis.theta
            add(
                "What was verified",
                interactive.depth_figure(
                    main_info, idx, f"How far down verification went: {name}", bound, theta
                ),
                plots.verification_depth(main, bound=bound, theta=theta),
                "verification_depth.png",
                f"<b>How far down each kind's ranking verification went.</b> x = rank within the "
                f"kind (log scale); grey line = the {_esc(name)} score at each rank; dots = the "
                "verified nodes' |exact effect|; dashed = the deepest verified rank. Nodes right "
                "of it were never patched."
                + (
                    " Red lines: the diagnostic's bound on any unverified |effect| (solid) and "
                    "θ (dotted)."
                    if diagnosis is not None
                    else ""
                ),
                main_table,
            )
            section.append(_html_table(depth_table(main)))
            section.append("<h3>What may be missing?</h3>")
            section.append(_missing_html(main, diagnosis, diagnose_command))
        elif exact is None:
            page["What was verified"].append(
                '<p class="note warn">No node was verified: every score here is an estimate. '
                "Verify the top of the ranking with <code>atp_nnsight.evaluation.verify</code> "
                "(CLI: <code>atp-nnsight run</code>).</p>"
            )

        # -- estimate vs exact (with ground truth) ---------------------------------------
        if exact is not None:
            for name, r in results.items():
                if r.method == "exact" or sources[name] != "exact":
                    continue
                label = plots.method_label(r.method)
                plot, _ = _scatter(r, infos[name], f"{label} vs exact patching")
                add(
                    "Estimate vs exact",
                    plot,
                    plots.scatter_vs_exact(r, exact),
                    f"{slugs[name]}_vs_exact.png",
                    f"<b>{_esc(label)} vs exact patching</b> — one point per node; "
                    + (
                        "x = signed mean estimate, y = exact signed mean effect (blue = same sign)."
                        if _signed_estimate(r) is not None
                        else "x = the (unsigned) GradDrop score, y = |exact mean effect|."
                    )
                    + " Dashed line: y = x.",
                    table_ids[name],
                )

        # -- scores ------------------------------------------------------------------------
        for kind in HEATMAP_KINDS:
            for name, r in results.items():
                if kind not in _kinds(r):
                    continue
                label = plots.method_label(r.method)
                add(
                    "Scores",
                    _unit_heatmap(r, kind, "score", infos[name], f"{label}: {kind} nodes"),
                    plots.head_heatmap(r, kind),
                    f"{slugs[name]}_{kind}_score.png",
                    _score_caption(r, kind),
                    table_ids[name],
                )

        # -- exact effects: of every node (exact=) or of the verified ones -----------------
        shown: tuple[Attribution, str, interactive.NodeInfo, str | None] | None = None
        if exact is not None and exact.mean_effect is not None:
            exact_info = interactive.NodeInfo(exact, exact.mean_effect, "")
            table = next((table_ids[n] for n, r in results.items() if r.method == "exact"), None)
            shown = (exact, "mean_effect", exact_info, table)
        elif _verified(main):
            shown = (main, "verified", main_info, main_table)
        if shown is not None:
            r, value, info, table = shown
            source = "exact" if value == "mean_effect" else "verified"
            what = "exact patching" if source == "exact" else "verified exact effect"
            vals, _, _ = plots._values(r, value)
            for kind in (k for k in HEATMAP_KINDS if k in _kinds(r)):
                if not np.isfinite(vals[(r.nodes["kind"] == kind).to_numpy()]).any():
                    continue
                caption = _effect_caption(kind, source, r.direction)
                if _per_position(r):
                    caption += _esc(" Per-position nodes: the sum over positions of |effect|.")
                add(
                    "Exact effects",
                    _unit_heatmap(r, kind, value, info, f"{what}: {kind} nodes"),
                    plots.head_heatmap(r, kind, value=value),
                    f"{source}_{kind}_effect.png",
                    caption,
                    table,
                )

        # -- per-position views ------------------------------------------------------------
        for name, r in results.items():
            if not _per_position(r):
                continue
            label = plots.method_label(r.method)
            signed = _signed_estimate(r) is not None
            add(
                "Positions",
                _units_by_position(r, infos[name], tokens, f"{label}: top units by position"),
                plots.top_units_by_position(r, tokens, n_top=TOP_UNITS),
                f"{slugs[name]}_top_units_positions.png",
                f"<b>The {TOP_UNITS} best units of {_esc(label)}, position by position</b> — "
                "a unit is a head, KV head or neuron, ranked by its best score over positions; "
                "x = the clean prompt's tokens. Colour = "
                + (
                    "the signed mean estimate (red raises the metric, blue lowers it)."
                    if signed
                    else "the score."
                ),
                table_ids[name],
            )
            for kind in _kinds(r):
                add(
                    "Positions",
                    _position_heatmap(
                        r, kind, infos[name], tokens, f"{label}: {kind} nodes by position"
                    ),
                    plots.position_heatmap(r, kind, tokens=tokens),
                    f"{slugs[name]}_{kind}_positions.png",
                    f"<b>{_esc(label)} score of {_esc(kind)} nodes by layer and position</b> — "
                    "per (layer, position) cell the largest score over the units (heads, "
                    "neurons, ...) of that kind. Positions count tokens from the first (0).",
                    table_ids[name],
                )

        # -- cost of verified recall (ground truth) ----------------------------------------
        if curves is not None:
            add(
                "Cost of verified recall",
                interactive.recall_figure(curves, "Cost of verified recall"),
                plots.recall_curve(curves),
                "verified_recall.png",
                "<b>Cost of verified recall</b> (log–log) against exact patching of every node: "
                "y = forward passes per prompt pair (the method's own cost, one backward = 2 "
                "forwards, plus one patched forward per verified node) needed before the true "
                "top x nodes have all been verified, verifying in each method's order. Dashed "
                "diagonal: an oracle order (y = x); lower is better.",
                None,
            )

    # ---- HTML ------------------------------------------------------------------------------
    html_text = _render(
        title=title or f"Attribution report — {main.model}",
        subtitle=subtitle,
        results=results,
        main=main,
        exact=exact,
        settings=settings,
        page=page,
        infos=infos,
        sources=sources,
        table_ids=table_ids,
        tables=tables or {},
        files=files,
        tokens=tokens,
        top_k=top_k,
        max_pairs=max_pairs,
    )
    out = folder / "report.html"
    out.write_text(html_text, encoding="utf-8")
    return out


def _figure_html(fig: _Figure, n: int) -> str:
    spec = fig.plot.to_json()
    # inside <script>, "<" could close the element: JSON strings may hold it escaped instead
    spec = spec.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    target = f"figure-{n}"
    table = f' data-table="{_esc(fig.table)}"' if fig.table else ""
    return (
        f'<figure><div class="plot" id="{target}"{table}></div>'
        f'<script type="application/json" class="figure-spec" data-target="{target}">'
        f"{spec}</script>"
        f'<figcaption>{fig.caption} <a href="{_esc(fig.png)}">PNG</a></figcaption></figure>'
    )


def _render(
    *,
    title: str,
    subtitle: str,
    results: Mapping[str, Attribution],
    main: Attribution,
    exact: Attribution | None,
    settings: Mapping[str, Any],
    page: Mapping[str, list[str | _Figure]],
    infos: Mapping[str, interactive.NodeInfo],
    sources: Mapping[str, str | None],
    table_ids: Mapping[str, str],
    tables: Mapping[str, pd.DataFrame],
    files: list[str],
    tokens: Sequence[str] | None,
    top_k: int,
    max_pairs: int,
) -> str:
    import plotly.offline

    try:
        from importlib.metadata import version

        ver = version("atp_nnsight")
    except Exception:  # metadata missing in odd installs
        ver = "unknown"
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    n_pairs = main.per_pair.shape[0]
    run: list[tuple[str, Any]] = [
        ("model", main.model),
        ("prompt pairs", n_pairs),
        ("nodes", _nodes_text(main)),
        ("methods", ", ".join(plots.method_label(r.method) for r in results.values())),
        ("direction", _DIRECTION_TEXT.get(main.direction, main.direction)),
        ("metric", main.metric),
    ]
    for name, r in results.items():
        run.append((f"cost: {name}", f"{r.cost:g} forward passes ({_per_pair(r):g} per pair)"))
    if exact is not None:
        run.append(
            (
                "cost: exact patching",
                f"{exact.cost:g} forward passes ({_per_pair(exact):g} per pair)",
            )
        )
    if _verified(main):
        ver_info = main.metadata["verified"]
        run.append(
            (
                "verified",
                f"{len(ver_info['mean_effect'])} nodes in {plots.method_label(main.method)} "
                f"order, cost {_fmt(ver_info.get('cost'))} forward passes",
            )
        )
    run_keys = {k for k, _ in run}
    run += [(str(k), v) for k, v in settings.items() if str(k) not in run_keys]

    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>",
        f"<script>{plotly.offline.get_plotlyjs()}</script>",
        "</head><body>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="sub">atp_nnsight {_esc(ver)} · generated {_esc(now)} · {_esc(subtitle)}</p>',
        "<h2>Settings</h2>",
        _kv_table(run),
        '<div class="note"><b>Conventions</b><ul>',
        "<li>Effect of a node = metric(patched run) − metric(unpatched run), signed, "
        f"per prompt pair; here {_esc(_DIRECTION_TEXT.get(main.direction, main.direction))}, "
        f"metric {_esc(main.metric)}.</li>",
        "<li>Exact patching ranks by |mean effect over pairs|. The AtP family ranks by the "
        "mean over pairs of |estimate| and also reports the signed mean estimate; GradDrop "
        "(AtP*) scores are unsigned.</li>",
        "<li>Position = token index from the first token (0); <code>all</code> = the node "
        "summed over (patched at) every position.</li>",
        "<li>Costs are forward-pass equivalents; one backward counts as 2.</li>",
        "<li>Figures are interactive: hover a cell or point for its node, score, exact effect "
        "and rank; click it to filter the ranked table; click a column header to sort.</li>",
        "</ul></div>",
    ]

    n_figures = 0
    for section, blocks in page.items():
        if not blocks:
            continue
        parts.append(f"<h2>{_esc(section)}</h2>")
        for block in blocks:
            if isinstance(block, _Figure):
                parts.append(_figure_html(block, n_figures))
                n_figures += 1
            else:
                parts.append(block)

    parts.append("<h2>Ranked nodes</h2>")
    parts.append(
        "<p>Click a column header to sort; click a cell or point in a figure to show only "
        "that node (or unit). Each table lists the top nodes by score and every verified "
        "node.</p>"
    )
    for name, r in results.items():
        info = infos[name]
        rows = _ranked_rows(r, top_k, info.rank)
        parts.append(
            f"<h3>{_esc(name)} — {len(rows)} of {len(r)} nodes "
            f"({_esc(plots.method_label(r.method))})</h3>"
        )
        cols = _ranked_columns(r, rows, info, sources[name], tokens)
        parts.append(_ranked_table(table_ids[name], cols, [info.label(int(i)) for i in rows]))
    for name, df in tables.items():
        parts.append(f"<h3>{_esc(name)}</h3>")
        parts.append(_html_table(pd.DataFrame(df)))

    if main.pairs:
        shown = main.pairs[:max_pairs]
        cols = ["clean", "noise", "clean_target", "noise_target"]
        df = pd.DataFrame([{c: p.get(c, "") for c in cols} for p in shown], columns=cols)
        df = df.map(repr)
        parts.append(f"<h2>Prompt pairs ({len(shown)} of {len(main.pairs)})</h2>")
        parts.append(_html_table(df, cls="pre"))

    parts.append('<h2>Files</h2><ul class="files">')
    parts += [f'<li><a href="{_esc(f)}">{_esc(f)}</a></li>' for f in files]
    parts.append("</ul>")
    parts.append(f"<script>{_SCRIPT}</script>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
