"""A self-contained HTML report of one or more attribution runs.

:func:`write_report` writes into one folder:

* ``report.html`` — a single file with inline CSS and every figure embedded as a base64 PNG
  data URI (no external resources, no network): the run's settings, the sign and aggregation
  conventions, ranked tables and the figures with captions;
* the figures as ``.png`` files (the same images as in the HTML);
* every result as ``<name>.npz`` (:meth:`Attribution.save`, load with
  :meth:`Attribution.load`) and ``<name>.csv`` (:meth:`Attribution.to_csv`).

Figures are rendered with matplotlib's Agg backend; no window or browser is opened.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atp_nnsight import plots
from atp_nnsight.results import Attribution
from atp_nnsight.types import NODE_KINDS

__all__ = ["write_report"]

HEATMAP_KINDS = ("head", "q", "k", "v", "neuron")
"""Node kinds drawn as layer x unit heatmaps (the others appear in the tables)."""

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
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { width: 180px; }
.scroll { overflow-x: auto; max-width: 100%; }
code, .pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px;
  white-space: pre-wrap; }
.gallery { display: flex; flex-wrap: wrap; gap: 8px 28px; align-items: flex-start; }
figure { margin: 8px 0 20px; max-width: 100%; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; max-width: 900px; }
figcaption b { color: var(--fg); }
a { color: var(--accent); }
ul.files { columns: 3; font-size: 13px; }
"""

# Marks every embedded image once decoded, so headless checks can read the result in the DOM.
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
  }
  document.body.setAttribute('data-images-loaded', String(ok));
  document.body.setAttribute('data-images-total', String(imgs.length));
});
"""


@dataclass
class _Image:
    file: str
    caption: str  # HTML (already escaped)
    alt: str


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
    out: list[str] = []
    for v in vals:
        if out and isinstance(out[-1], list) and out[-1][1] == v - 1:
            out[-1][1] = v
        else:
            out.append([v, v])  # type: ignore[arg-type]
    return ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in out)  # type: ignore[misc]


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
    present = set(map(str, r.nodes["kind"]))
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


def _exact_column(r: Attribution, exact: Attribution | None) -> tuple[np.ndarray, str] | None:
    """Exact mean effect per node of ``r`` (NaN where unknown) and its source, if any."""
    try:
        idx, eff, source = plots._exact_effects(r, exact)
    except ValueError:
        if exact is None:
            return None
        try:  # exact does not match ``r``: fall back to r's own verified nodes
            idx, eff, source = plots._exact_effects(r, None)
        except ValueError:
            return None
    out = np.full(len(r), np.nan)
    out[idx] = eff
    return out, source


def _top_table(r: Attribution, k: int, exact: Attribution | None) -> pd.DataFrame:
    df = r.to_dataframe()
    ex = _exact_column(r, exact)
    order = r.ranking()[:k]
    rows = df.iloc[order]
    out = pd.DataFrame(
        {
            "rank": rows["rank"].to_numpy(),
            "node": [str(r.node(int(i))) for i in order],
            "kind": rows["kind"].astype(str).to_numpy(),
            "layer": rows["layer"].to_numpy(),
            "index": rows["index"].to_numpy(),
            "position": ["all" if pd.isna(p) else str(int(p)) for p in rows["position"].to_numpy()],
            "score": rows["score"].to_numpy(dtype=np.float64),
        }
    )
    if r.mean_effect is not None:
        label = "exact mean effect" if r.method == "exact" else "signed mean estimate"
        out[label] = rows["mean_effect"].to_numpy(dtype=np.float64)
    if ex is not None and r.method != "exact":
        vals, source = ex
        out["verified exact effect" if source == "verified" else "exact mean effect"] = vals[order]
    return out


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
            f"exact mean effect of the {kind} nodes verified in AtP* order "
            "(one real patch each); grey = not verified"
        )
    else:
        what = f"exact activation-patching mean effect of every {kind} node"
    return (
        f"<b>{_esc(what[0].upper() + what[1:])}.</b> Signed mean over pairs of "
        "metric(patched) − metric(unpatched): red = patching raises the metric, blue = lowers "
        f"it; the colour scale is centred at 0. {_esc(sign)}"
    )


_DPI = 130


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=_DPI, metadata={"Software": None})


def _png_size(png: bytes) -> tuple[int, int]:
    """``(width, height)`` from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def write_report(
    folder: str | Path,
    results: Mapping[str, Attribution],
    *,
    settings: Mapping[str, Any],
    exact: Attribution | None = None,
    curves: pd.DataFrame | Mapping[str, Any] | None = None,
    tables: Mapping[str, pd.DataFrame] | None = None,
    tokens: Sequence[str] | None = None,
    title: str | None = None,
    top_k: int = 20,
    max_pairs: int = 8,
) -> Path:
    """Write a self-contained HTML report, its figures and the results into ``folder``.

    Args:
        folder: output directory (created if missing; existing files of the same names are
            overwritten).
        results: ``name -> Attribution`` (e.g. ``{"atp*": r, "atp": r2}``). The AtP* result
            (``method == "atp*"``), else the first, is the main one whose verified effects are
            shown when ``exact`` is not given.
        settings: the run's settings shown at the top (e.g. task, seed, time in seconds);
            model, pairs, nodes, methods, direction, metric and costs are filled in from the
            results. Keys and values are shown as text (escaped).
        exact: exact activation patching of (some of) the same nodes: adds exact-effect
            heatmaps, estimate-vs-exact scatter plots and exact columns in the tables. Without
            it, ``result.metadata["verified"]`` (from verification) is used when present.
        curves: cost-of-verified-recall curves (see :func:`atp_nnsight.plots.recall_curve`).
        tables: extra ``title -> DataFrame`` tables, shown as they are.
        tokens: one prompt's tokens, to label the position axis of per-position heatmaps.
        title: page title (default: ``"Attribution report — <model>"``).
        top_k: rows of each ranked table.
        max_pairs: prompt pairs listed.

    Returns:
        The path of ``report.html``.
    """
    if not results:
        raise ValueError("write_report needs at least one result")
    for name, r in results.items():
        if not isinstance(r, Attribution):
            raise TypeError(f"results[{name!r}] is {type(r).__name__}, not an Attribution")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    taken: set[str] = {"report"}
    slugs = {name: _slug(str(name), taken) for name in results}
    exact_slug = _slug("exact", taken) if exact is not None else None
    main_name = next((n for n, r in results.items() if r.method == "atp*"), next(iter(results)))
    main = results[main_name]

    # ---- data files ------------------------------------------------------------------------
    files: list[str] = []
    saved = [(slugs[n], r) for n, r in results.items()]
    if exact is not None and exact_slug is not None:
        saved.append((exact_slug, exact))
    for slug, r in saved:
        r.save(folder / f"{slug}.npz")
        r.to_csv(folder / f"{slug}.csv")
        files += [f"{slug}.csv", f"{slug}.npz"]

    # ---- figures ---------------------------------------------------------------------------
    sections: dict[str, list[_Image]] = {
        "Scores": [],
        "Exact effects": [],
        "Estimate vs exact": [],
        "Positions": [],
        "Cost of verified recall": [],
    }
    notes: list[str] = []

    def add(section: str, fig: Any, file: str, caption: str, alt: str) -> None:
        _save(fig, folder / file)
        sections[section].append(_Image(file, caption, alt))
        files.append(file)

    with plots.agg_figures():
        for kind, (name, r) in (
            (k, (n, r)) for k in HEATMAP_KINDS for n, r in results.items() if k in _kinds(r)
        ):
            fig = plots.head_heatmap(r, kind)
            add(
                "Scores",
                fig,
                f"{slugs[name]}_{kind}_score.png",
                _score_caption(r, kind),
                f"{name} {kind} score heatmap",
            )
        if exact is not None and exact.mean_effect is not None:
            for kind in (k for k in HEATMAP_KINDS if k in _kinds(exact)):
                signed = not _per_position(exact)
                fig = plots.head_heatmap(exact, kind, value="mean_effect")
                cap = _effect_caption(kind, "exact", exact.direction)
                if not signed:
                    cap += _esc(" Per-position nodes: the sum over positions of |effect|.")
                add("Exact effects", fig, f"exact_{kind}_effect.png", cap, f"exact {kind} effect")
        elif main.metadata.get("verified"):
            vals, _, _ = plots._values(main, "verified")
            for kind in (k for k in HEATMAP_KINDS if k in _kinds(main)):
                sel = (main.nodes["kind"] == kind).to_numpy()
                if not np.isfinite(vals[sel]).any():
                    continue
                fig = plots.head_heatmap(main, kind, value="verified")
                cap = _effect_caption(kind, "verified", main.direction)
                add(
                    "Exact effects",
                    fig,
                    f"verified_{kind}_effect.png",
                    cap,
                    f"verified {kind} effect",
                )
        for name, r in results.items():
            if r.method == "exact":
                continue
            try:
                fig = plots.scatter_vs_exact(r, exact)
            except ValueError as err:
                if exact is not None or r.metadata.get("verified"):
                    notes.append(f"No scatter plot for {name}: {err}")
                continue
            src = "exact patching" if exact is not None else "verified nodes (exact patches)"
            how = (
                "x = signed mean estimate over pairs, y = exact signed mean effect"
                if r.mean_effect is not None
                else "x = the (unsigned) GradDrop score, y = |exact mean effect|"
            )
            add(
                "Estimate vs exact",
                fig,
                f"{slugs[name]}_vs_exact.png",
                f"<b>{_esc(plots.method_label(r.method))} vs {_esc(src)}</b> — one point per node, "
                f"coloured by kind; {_esc(how)}. Dashed line: y = x (a perfect estimate). "
                "Labelled: the nodes farthest from it.",
                f"{name} vs exact scatter",
            )
        for name, r in results.items():
            if not _per_position(r):
                continue
            for kind in _kinds(r):
                fig = plots.position_heatmap(r, kind, tokens=tokens)
                add(
                    "Positions",
                    fig,
                    f"{slugs[name]}_{kind}_positions.png",
                    f"<b>{_esc(plots.method_label(r.method))} score of {_esc(kind)} nodes by "
                    "layer and position</b> — per (layer, position) cell the largest score over "
                    "the units (heads, neurons, ...) of that kind. Positions count tokens from "
                    "the first (0).",
                    f"{name} {kind} position heatmap",
                )
        if curves is not None:
            fig = plots.recall_curve(curves)
            add(
                "Cost of verified recall",
                fig,
                "verified_recall.png",
                "<b>Cost of verified recall</b> (log–log): y = forward passes per prompt pair "
                "(the method's own cost, one backward = 2 forwards, plus one patched forward "
                "per verified node) "
                "needed before the top x nodes by |exact mean effect| have all been verified, "
                "verifying in each method's order. Dashed diagonal: an oracle order (y = x); "
                "lower is better.",
                "cost of verified recall",
            )

    # ---- HTML ------------------------------------------------------------------------------
    html_text = _render(
        title=title or f"Attribution report — {main.model}",
        results=results,
        main=main,
        exact=exact,
        settings=settings,
        sections=sections,
        folder=folder,
        tables=tables or {},
        notes=notes,
        files=files,
        top_k=top_k,
        max_pairs=max_pairs,
    )
    out = folder / "report.html"
    out.write_text(html_text, encoding="utf-8")
    return out


def _render(
    *,
    title: str,
    results: Mapping[str, Attribution],
    main: Attribution,
    exact: Attribution | None,
    settings: Mapping[str, Any],
    sections: Mapping[str, list[_Image]],
    folder: Path,
    tables: Mapping[str, pd.DataFrame],
    notes: list[str],
    files: list[str],
    top_k: int,
    max_pairs: int,
) -> str:
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
        per = r.cost / max(r.per_pair.shape[0], 1)
        run.append((f"cost: {name}", f"{r.cost:g} forward passes ({per:g} per pair)"))
    if exact is not None:
        per = exact.cost / max(exact.per_pair.shape[0], 1)
        run.append(("cost: exact patching", f"{exact.cost:g} forward passes ({per:g} per pair)"))
    ver_info = main.metadata.get("verified")
    if ver_info:
        run.append(
            (
                "verified",
                f"{len(ver_info.get('mean_effect', []))} nodes in "
                f"{plots.method_label(main.method)} order, cost {_fmt(ver_info.get('cost'))} "
                "forward passes",
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
        "</head><body>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="sub">atp_nnsight {_esc(ver)} · generated {_esc(now)}</p>',
        "<h2>Settings</h2>",
        _kv_table(run),
        '<div class="note"><b>Conventions</b><ul>',
        "<li>Effect of a node = metric(patched run) − metric(unpatched run), signed, "
        f"per prompt pair; here {_esc(_DIRECTION_TEXT.get(main.direction, main.direction))}, "
        f"metric {_esc(main.metric)}.</li>",
        "<li>Exact patching ranks by |mean effect over pairs|. The AtP family ranks by the "
        "mean over pairs of |estimate| and also reports the signed mean estimate; GradDrop "
        "scores are unsigned.</li>",
        "<li>Position = token index from the first token (0); <code>all</code> = the node "
        "summed over (patched at) every position.</li>",
        "<li>Costs are forward-pass equivalents; one backward counts as 2.</li>",
        "</ul></div>",
    ]
    for n in notes:
        parts.append(f'<p class="note">{_esc(n)}</p>')

    for section, images in sections.items():
        if not images:
            continue
        parts.append(f"<h2>{_esc(section)}</h2>")
        parts.append('<div class="gallery">')
        for img in images:
            png = (folder / img.file).read_bytes()
            width, height = _png_size(png)
            data = base64.b64encode(png).decode("ascii")
            # shown at 100 px per inch of figure size (sharp on high-density screens)
            w, h = round(width * 100 / _DPI), round(height * 100 / _DPI)
            parts.append(
                f'<figure style="width: {w}px">'
                f'<img src="data:image/png;base64,{data}" width="{w}" height="{h}" '
                f'alt="{_esc(img.alt)}" data-file="{_esc(img.file)}" '
                "onload=\"this.setAttribute('data-loaded', '1')\" "
                "onerror=\"this.setAttribute('data-loaded', 'error')\">"
                f'<figcaption>{img.caption} <span class="pre">({_esc(img.file)})</span>'
                "</figcaption></figure>"
            )
        parts.append("</div>")

    parts.append("<h2>Ranked nodes</h2>")
    for name, r in results.items():
        parts.append(
            f"<h3>{_esc(name)} — top {min(top_k, len(r))} of {len(r)} nodes "
            f"({_esc(plots.method_label(r.method))})</h3>"
        )
        parts.append(_html_table(_top_table(r, top_k, exact)))
    if exact is not None:
        parts.append(
            f"<h3>exact patching — top {min(top_k, len(exact))} of {len(exact)} nodes</h3>"
        )
        parts.append(_html_table(_top_table(exact, top_k, None)))
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
