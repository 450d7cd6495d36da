"""Verification: exact activation patching of a method's nodes in its ranked order.

A ranking method (AtP, AtP*, a baseline) is a *prefilter*: its false positives are removed by
verifying nodes one at a time with a real patch, best-ranked first (paper §4; spec §8.2). One
verified node costs one forward pass per prompt pair.

:func:`verify` runs that loop with :func:`~atp_nnsight.methods.exact.patch_sets`, a chunk of
nodes per call, until a budget is spent or a stopping rule fires, and stores everything needed
to recompute an evaluation in ``result.metadata["verified"]``:

* ``order`` — node indices (rows of the node table) in verification order;
* ``mean_effect`` — their exact signed mean effect over pairs (same order);
* ``per_pair`` — their exact per-pair effects, ``[pairs][verified]`` (the ``per_pair``
  convention of :class:`~atp_nnsight.results.Attribution`);
* ``cost`` — forward passes actually run, summed over pairs (patched forwards plus the two
  unpatched forwards per pair that every ``patch_sets`` session adds);
* ``direction``, ``metric``, ``n_pairs``, ``budget``, ``stop``, ``stopped_by``, ``chunk_size``.

Ranking order is :meth:`Attribution.ranking` (descending score, ties by node order).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atp_nnsight.methods.common import prepare_pairs
from atp_nnsight.methods.exact import patch_sets
from atp_nnsight.metrics import Metric, resolve_metric
from atp_nnsight.models import get_adapter
from atp_nnsight.nodes import NodeLayout
from atp_nnsight.remote import Remote
from atp_nnsight.results import NODE_COLUMNS, Attribution
from atp_nnsight.types import check_direction

StopFn = Callable[[np.ndarray, np.ndarray], bool]
"""``stop(order, mean_effect) -> bool``: called after every verified node with the node
indices and exact signed mean effects verified so far (in verification order); ``True`` stops
verification after that node."""

StopRule = StopFn | tuple | None

DEFAULT_CHUNK_WITH_STOP = 16
"""Nodes per ``patch_sets`` call when a stopping rule is given (without one, the whole budget
goes in one call; ``patch_sets`` batches it internally)."""


def resolve_stop(stop: StopRule) -> StopFn | None:
    """A stopping rule as a function ``(order, mean_effect) -> bool``.

    * ``None`` — never stop early (verify until the budget or the nodes run out);
    * ``("consecutive_below", k, theta)`` — stop after ``k`` consecutive verified nodes whose
      exact ``|mean effect|`` is below ``theta`` (a run of unimportant nodes suggests the
      ranking has moved past the important ones; this is a heuristic, not a guarantee — the
      diagnostic, :func:`atp_nnsight.evaluation.diagnostic.should_stop`, gives a bound);
    * a callable ``stop(order, mean_effect) -> bool`` (see :data:`StopFn`).
    """
    if stop is None or callable(stop):
        return stop
    if isinstance(stop, (tuple, list)) and len(stop) == 3 and stop[0] == "consecutive_below":
        k, theta = int(stop[1]), float(stop[2])
        if k < 1:
            raise ValueError(f"consecutive_below needs k >= 1, got {k}")

        def consecutive_below(order: np.ndarray, mean_effect: np.ndarray) -> bool:
            tail = np.abs(mean_effect[-k:])
            return len(tail) == k and bool((tail < theta).all())

        return consecutive_below
    raise ValueError(
        f"unknown stopping rule {stop!r}; use ('consecutive_below', k, theta) or a callable "
        "stop(order, mean_effect) -> bool"
    )


def resolve_result_metric(result: Attribution, metric: str | Metric | None) -> tuple[str, Metric]:
    """``metric`` or, if ``None``, the result's own (which must then be a built-in name)."""
    if metric is not None:
        return resolve_metric(metric)
    try:
        return resolve_metric(result.metric)
    except ValueError:
        raise ValueError(
            f"the result was computed with metric {result.metric!r}, which is not a built-in "
            "metric; pass the same callable as metric="
        ) from None


def result_layout(model: Any, result: Attribution) -> NodeLayout:
    """The node layout ``result`` was computed on, with a clear error if it is unknown."""
    try:
        return NodeLayout.of_result(get_adapter(model), result)
    except KeyError as err:
        raise ValueError(
            f"the result's metadata lacks {err}; verification needs a result made by this "
            "library's methods (metadata kinds/layers/seq_len)"
        ) from None


def verify(
    model: Any,
    pairs: Any,
    result: Attribution,
    *,
    budget: int | None = None,
    per_kind: int | None = None,
    stop: StopRule = None,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    remote: Remote = False,
    api_key: str | None = None,
    progress: bool = True,
    direction: str | None = None,
    metric: str | Metric | None = None,
    prepend_bos: bool = False,
    memory_gb: float = 2.0,
    checkpoint_dir: str | Path | None = None,
) -> Attribution:
    """Verify ``result``'s nodes in ranked order with exact patching; return an annotated copy.

    Args:
        pairs: the prompt pairs to verify on (any form :func:`load_pairs` accepts), or
            ``None`` for the pairs stored in ``result``.
        budget: total number of verified nodes to reach (``None``: every node, unless ``stop``
            fires). If ``result`` already carries ``metadata["verified"]`` (from an earlier
            call with the same direction, metric and number of pairs), verification resumes
            after those nodes and they count towards ``budget``.
        per_kind: verify at most this many nodes of each node kind (the top ones of each kind,
            still in global ranked order).
        stop: stopping rule, see :func:`resolve_stop`. It is checked after every node; nodes
            after the firing node are dropped even if they were patched in the same chunk
            (their forwards still count in ``cost``).
        batch_size: patched rows per forward (``patch_sets``).
        chunk_size: nodes per ``patch_sets`` call (default: the whole budget without ``stop``,
            :data:`DEFAULT_CHUNK_WITH_STOP` with it).
        direction, metric: default to the result's own.
        checkpoint_dir: keep finished patching chunks there (one subfolder per chunk of
            nodes); rerunning the same call resumes from them.

    Returns:
        A copy of ``result`` (same scores, per-pair values and ``cost`` — the method's cost)
        with ``metadata["verified"]`` as described in the module docstring; see
        :func:`verified_table`.
    """
    stop_fn = resolve_stop(stop)
    direction = check_direction(direction or result.direction)
    metric_name, metric_fn = resolve_result_metric(result, metric)
    layout = result_layout(model, result)
    if pairs is None:
        if not result.pairs:
            raise ValueError("no pairs given and the result stores none")
        pairs = result.pairs
    tok = prepare_pairs(model, pairs, prepend_bos)
    n_pairs = len(tok)

    previous = result.metadata.get("verified")
    order: list[int] = []
    effects: list[np.ndarray] = []  # [pairs] per verified node
    cost = 0.0
    if previous:
        same = (
            previous.get("direction") == direction
            and previous.get("metric") == metric_name
            and previous.get("n_pairs") == n_pairs
        )
        if not same:
            raise ValueError(
                "the result already holds a verification with another direction, metric or "
                "number of pairs; verify a result without metadata['verified']"
            )
        order = [int(i) for i in previous["order"]]
        effects = list(np.asarray(previous["per_pair"], dtype=np.float32).reshape(n_pairs, -1).T)
        cost = float(previous["cost"])

    n_nodes = len(result)
    target = n_nodes if budget is None else min(int(budget), n_nodes)
    if budget is not None and budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    done = set(order)
    ranked = [int(i) for i in result.ranking() if int(i) not in done]
    if per_kind is not None:
        kinds = result.nodes["kind"].to_numpy()
        taken = Counter(kinds[order].tolist())
        keep = []
        for i in ranked:
            if taken[kinds[i]] < per_kind:
                taken[kinds[i]] += 1
                keep.append(i)
        ranked = keep
    todo = ranked[: max(0, target - len(order))]
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_WITH_STOP if stop_fn is not None else max(1, len(todo))
    stopped_by = "budget" if target < n_nodes else "exhausted"
    if stop_fn is not None and order and stop_fn(np.array(order), _means(effects)):
        todo, stopped_by = [], "stop"

    for first in range(0, len(todo), chunk_size):
        ids = todo[first : first + chunk_size]
        eff, c = patch_sets(
            model,
            tok,
            [[i] for i in ids],
            layout=layout,
            direction=direction,
            metric=metric_fn,
            batch_size=batch_size,
            memory_gb=memory_gb,
            remote=remote,
            api_key=api_key,
            progress=progress,
            checkpoint_dir=None
            if checkpoint_dir is None
            else Path(checkpoint_dir) / f"{first:06d}",
        )
        cost += c
        fired = False
        for j, node in enumerate(ids):
            order.append(node)
            effects.append(eff[:, j].astype(np.float32))
            if stop_fn is not None and stop_fn(np.array(order), _means(effects)):
                fired = True
                break
        if fired:
            stopped_by = "stop"
            break

    per_pair = np.stack(effects, axis=1) if effects else np.zeros((n_pairs, 0), np.float32)
    out = copy.copy(result)
    out.nodes = result.nodes.copy()
    out.scores = result.scores.copy()
    out.per_pair = result.per_pair.copy()
    out.mean_effect = None if result.mean_effect is None else result.mean_effect.copy()
    out.metadata = copy.deepcopy(result.metadata)
    out.metadata["verified"] = {
        "order": order,
        "mean_effect": per_pair.mean(0).tolist(),
        "per_pair": per_pair.tolist(),
        "cost": cost,
        "n_pairs": n_pairs,
        "direction": direction,
        "metric": metric_name,
        "budget": budget,
        "per_kind": per_kind,
        "stop": _describe_stop(stop),
        "stopped_by": stopped_by,
        "chunk_size": chunk_size,
        "ranking": "descending result.scores, ties by node order",
    }
    return out


def _means(effects: Sequence[np.ndarray]) -> np.ndarray:
    return np.array([float(e.mean()) for e in effects], dtype=np.float64)


def _describe_stop(stop: StopRule) -> str | None:
    if stop is None:
        return None
    if callable(stop):
        return getattr(stop, "__name__", "callable")
    return repr(tuple(stop))


def verified_nodes(result: Attribution) -> np.ndarray:
    """Node indices verified so far, in verification order (empty if none)."""
    info = result.metadata.get("verified")
    return np.asarray(info["order"] if info else [], dtype=np.int64)


def verified_table(result: Attribution) -> pd.DataFrame:
    """One row per verified node, in verification order.

    Columns: ``step`` (1-based), ``node`` (row of the node table), ``kind, layer, index,
    position``, the method's ``score`` and ``rank``, its signed ``estimate`` (``NaN`` for
    unsigned methods), the ``exact`` signed mean effect and ``abs_exact``.
    """
    info = result.metadata.get("verified")
    if not info:
        raise ValueError("the result holds no verification; run verify(...) first")
    order = np.asarray(info["order"], dtype=np.int64)
    df = result.to_dataframe().iloc[order].reset_index(drop=True)
    df.insert(0, "node", order)
    df.insert(0, "step", np.arange(1, len(order) + 1))
    df = df.rename(columns={"mean_effect": "estimate"})
    df["exact"] = np.asarray(info["mean_effect"], dtype=np.float64)
    df["abs_exact"] = df["exact"].abs()
    cols = ["step", "node"] + NODE_COLUMNS + ["score", "rank", "estimate", "exact", "abs_exact"]
    return df[cols]
