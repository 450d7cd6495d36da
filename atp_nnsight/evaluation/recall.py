"""Cost of verified recall (paper §4, Figure 1; spec §8.2–8.3) and its one-number summary.

Setting: a method produces an ordering ``π`` of the nodes (:meth:`Attribution.ranking`), and
the user verifies nodes in that order with one real patch each. Ground truth is exact
patching of every node, ``truth.scores = |mean_pairs I(n)|``; ``Top_x`` = the ``x`` nodes with
the largest true score (ties by node order, as :meth:`Attribution.ranking`).

**Units: forward passes per prompt pair.** Verifying one node costs one forward per pair, and
a method that costs ``C`` forward-pass equivalents in total over ``P`` pairs (``result.cost``;
one backward = 2 forwards) costs ``C / P`` per pair. So::

    cost(x) = C_method / P  +  max_{n ∈ Top_x} rank_π(n)        (rank 1 = first verified)

An oracle ordering gives ``C/P + x``; verification alone can never beat ``x`` (the diagonal of
the plot). Multiply by the number of verification pairs to get total forward passes.
(Reconstructed from the paper's description; the paper's exact cost accounting of backward
passes is not known — this library counts one backward as two forwards.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from atp_nnsight.results import Attribution

NONZERO_TOL = 1e-6
"""True scores at most ``NONZERO_TOL * max(truth.scores)`` count as zero effects (e.g. nodes
before the first differing token). The default ``k_max`` stops before them."""


def _keys(result: Attribution) -> list[tuple]:
    pos = result.nodes["position"]
    return [
        (str(k), int(layer), int(i), -1 if pd.isna(p) else int(p))
        for k, layer, i, p in zip(
            result.nodes["kind"], result.nodes["layer"], result.nodes["index"], pos, strict=True
        )
    ]


def align(truth: Attribution, result: Attribution) -> np.ndarray:
    """``perm`` with ``result`` row ``perm[i]`` = the node of ``truth`` row ``i``.

    Both results must cover the same set of nodes (in any order).
    """
    tk, rk = _keys(truth), _keys(result)
    if tk == rk:
        return np.arange(len(tk))
    where = {k: i for i, k in enumerate(rk)}
    if len(where) != len(rk) or set(where) != set(tk):
        raise ValueError(
            f"the results cover different nodes ({len(tk)} vs {len(rk)}); compute the ground "
            "truth and the method on the same node kinds, layers and positions"
        )
    return np.array([where[k] for k in tk], dtype=np.int64)


def _default_k(truth: Attribution) -> int:
    s = truth.scores
    if len(s) == 0 or not s.max() > 0:
        return 0
    return int((s > NONZERO_TOL * s.max()).sum())


def method_cost_per_pair(result: Attribution) -> float:
    """``result.cost / pairs``: forward-pass equivalents per prompt pair."""
    return float(result.cost) / max(1, result.per_pair.shape[0])


def cost_of_verified_recall(
    truth: Attribution,
    method_result: Attribution,
    k_max: int | None = None,
    *,
    method_cost: float | None = None,
) -> np.ndarray:
    """``cost[x - 1]`` for ``x = 1 .. k_max``, in forward passes per prompt pair.

    ``cost(x) = C_method/P + max_{n ∈ Top_x(truth)} rank_π(n)``, see the module docstring.

    Args:
        truth: exact patching of every node (``patch(...)``); ``truth.scores`` ranks.
        method_result: the method's result over the same nodes; its ranking is ``π``.
        k_max: largest ``x`` (default: every node with a non-zero true effect, see
            :data:`NONZERO_TOL`).
        method_cost: override ``C_method/P`` (per pair; e.g. ``0`` for verification only).
    """
    perm = align(truth, method_result)
    n = len(truth)
    k = _default_k(truth) if k_max is None else int(k_max)
    if not 0 <= k <= n:
        raise ValueError(f"k_max must be in 0..{n}, got {k}")
    rank_of = np.empty(n, dtype=np.int64)
    rank_of[method_result.ranking()] = np.arange(1, n + 1)
    ranks = rank_of[perm][truth.ranking()[:k]]
    c = method_cost_per_pair(method_result) if method_cost is None else float(method_cost)
    return c + np.maximum.accumulate(ranks).astype(np.float64)


def recall_at_budget(truth: Attribution, result: Attribution, x: int, budget: int) -> float:
    """Top-``x`` recall after verifying ``budget`` nodes in ``result``'s order.

    ``|Top_x(truth) ∩ {first budget nodes of π}| / x`` (budget counted in verified nodes, not
    forward passes).
    """
    if x < 1:
        raise ValueError(f"x must be >= 1, got {x}")
    perm = align(truth, result)
    first = set(result.ranking()[: max(0, int(budget))].tolist())
    top = perm[truth.ranking()[:x]]
    return float(sum(int(i) in first for i in top)) / x


def curves(
    truth: Attribution,
    results: Mapping[str, Attribution],
    k_max: int | None = None,
    *,
    by_kind: bool = True,
) -> pd.DataFrame:
    """Cost-of-verified-recall curves of several methods, as a long DataFrame.

    Columns ``method, kind, x, cost, method_cost`` (costs per prompt pair). ``kind`` is each
    node kind (nodes of one kind verified in the method's order restricted to that kind; the
    method's full cost is charged to each kind, since one run scores all of them) and ``"all"``
    for all nodes together when there are several kinds. ``k_max`` is capped per kind at the
    number of nodes with a non-zero true effect.
    """
    kinds = list(dict.fromkeys(truth.nodes["kind"]))
    groups: list[tuple[str, Any]] = []
    if len(kinds) > 1 or not by_kind:
        groups.append(("all", None))
    if by_kind:
        groups += [(k, k) for k in kinds]
    rows = []
    for kind, sel in groups:
        t = truth if sel is None else truth.select(sel)
        k = _default_k(t) if k_max is None else min(int(k_max), _default_k(t))
        for name, res in results.items():
            r = res if sel is None else res.select(sel)
            cost = cost_of_verified_recall(t, r, k, method_cost=method_cost_per_pair(res))
            rows.append(
                pd.DataFrame(
                    {
                        "method": name,
                        "kind": kind,
                        "x": np.arange(1, k + 1),
                        "cost": cost,
                        "method_cost": method_cost_per_pair(res),
                    }
                )
            )
    cols = ["method", "kind", "x", "cost", "method_cost"]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=cols)


def irwrgm(costs_method: Sequence[float], costs_ref: Sequence[float] | None = None) -> float:
    """Inverse-rank-weighted geometric mean of cost ratios (spec §8.3, reconstructed).

    With ``r_x = cost_method(x) / cost_ref(x)`` for ``x = 1 .. K`` (``K`` = the common length)::

        IRWRGM = exp( Σ_x (1/x) · log r_x  /  Σ_x (1/x) )

    1 means "as cheap as the reference", 2 "twice the reference's cost" (geometric, with the
    top nodes weighted most). ``costs_ref=None`` uses the verification-only oracle,
    ``cost_ref(x) = x``. The paper's own definition could not be verified; report ``K`` and
    the reference with the number.
    """
    m = np.asarray(costs_method, dtype=np.float64)
    ref = np.arange(1, len(m) + 1, dtype=np.float64) if costs_ref is None else costs_ref
    r = np.asarray(ref, dtype=np.float64)
    if m.shape != r.shape or m.ndim != 1 or len(m) == 0:
        raise ValueError(
            f"need two non-empty 1-D cost arrays of one length, got {m.shape}, {r.shape}"
        )
    if (m <= 0).any() or (r <= 0).any():
        raise ValueError("costs must be positive")
    w = 1.0 / np.arange(1, len(m) + 1)
    return float(math.exp(float((w * np.log(m / r)).sum() / w.sum())))


def irwrgm_table(curve_df: pd.DataFrame, reference: str = "atp*") -> pd.DataFrame:
    """IRWRGM of every method and kind of a :func:`curves` table relative to ``reference``.

    ``reference`` is a method name in the table (default ``"atp*"``) or ``"oracle"``
    (cost ``x``). Columns ``method, kind, K, irwrgm``.
    """
    methods = list(dict.fromkeys(curve_df["method"]))
    if reference != "oracle" and reference not in methods:
        raise ValueError(
            f"reference {reference!r} is not among the methods {methods}; pass reference="
        )
    rows = []
    for kind, df in curve_df.groupby("kind", sort=False):
        ref = None
        if reference != "oracle":
            ref = df[df["method"] == reference].sort_values("x")["cost"].to_numpy()
        for name in methods:
            c = df[df["method"] == name].sort_values("x")["cost"].to_numpy()
            if len(c) == 0:
                continue
            rows.append({"method": name, "kind": kind, "K": len(c), "irwrgm": irwrgm(c, ref)})
    return pd.DataFrame(rows, columns=["method", "kind", "K", "irwrgm"])


def plot_cost_of_verified_recall(
    curve_df: pd.DataFrame,
    *,
    kinds: Sequence[str] | None = None,
    title: str | None = None,
    panel_size: tuple[float, float] = (4.5, 4.0),
) -> Any:
    """Log–log cost-of-verified-recall plot: one panel per node kind, one line per method.

    x = number of true top nodes recalled, y = forward passes per pair. The dashed diagonal
    ``y = x`` is the verification-only oracle; every curve lies above it. Returns the
    matplotlib ``Figure``. When the table has several kinds, the ``"all"`` panel is shown only
    if asked for in ``kinds``.
    """
    import matplotlib.pyplot as plt

    available = list(dict.fromkeys(curve_df["kind"]))
    if kinds is None:
        kinds = [k for k in available if k != "all"] or available
    missing = [k for k in kinds if k not in available]
    if missing:
        raise ValueError(f"no curves for kind(s) {missing}; available: {available}")
    fig, axes = plt.subplots(
        1, len(kinds), figsize=(panel_size[0] * len(kinds), panel_size[1]), squeeze=False
    )
    for ax, kind in zip(axes[0], kinds, strict=True):
        df = curve_df[curve_df["kind"] == kind]
        for name, d in df.groupby("method", sort=False):
            d = d.sort_values("x")
            ax.plot(d["x"], d["cost"], label=str(name))
        k = int(df["x"].max()) if len(df) else 1
        xs = np.arange(1, k + 1)
        ax.plot(xs, xs, "k--", lw=1, label="oracle (y = x)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("top-x true nodes recalled")
        ax.set_ylabel("forward passes per pair")
        ax.set_title(kind)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
