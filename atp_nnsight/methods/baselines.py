"""The paper's baselines: Subsampling, Blocks, Hierarchical and brute-force (no prior) order.

Each method is split in two:

* a pure core ``<name>_scores(oracle, n_nodes, ..., rng)`` — numpy statistics over a *set-effect
  oracle*, an :data:`Oracle` mapping a list of node-index sets to their effects ``[pairs, sets]``
  (signed, ``metric(patched) - metric(unpatched)``, every node of a set patched at once: the
  node-set effect ``I(η)`` of paper Eq. 3). It returns a :class:`BaselineScores`, which unpacks
  as ``(scores, signed_estimate_or_None, per_pair_or_None, n_set_patches)``;
* the public method ``<name>(model, pairs, nodes, ...) -> Attribution``, whose oracle is exact
  patching (:func:`~atp_nnsight.methods.exact.patch_sets`) on the flat node order of
  :class:`~atp_nnsight.nodes.NodeLayout` (kind → layer → position → unit).

Cost (``Attribution.cost``) is the number of forward passes actually run: one per patched set
per pair, plus the two unpatched forwards (base and source prompts) per pair that every
patching session runs. ``metadata["set_patches"]`` is the paper's count (patched sets per pair)
and ``metadata["oracle_calls"]`` the number of :func:`patch_sets` calls. An empty set is never
patched: its effect is 0 by definition.

Which parts are reconstructed (the paper text was not available; see
``reference/atp-star-paper-spec.md`` §7) is listed in every result's
``metadata["reconstructed"]``.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from atp_nnsight.methods.common import common_length, model_name, prepare_run
from atp_nnsight.methods.exact import patch_sets
from atp_nnsight.metrics import Metric
from atp_nnsight.models import get_adapter
from atp_nnsight.nodes import NodeLayout
from atp_nnsight.remote import Remote
from atp_nnsight.results import Attribution
from atp_nnsight.types import check_direction

Oracle = Callable[[list[np.ndarray]], np.ndarray]
"""Node-index sets → signed set effects ``[pairs, sets]``."""

SUBSAMPLING_TARGET_SIZE = 10.0
"""Default Subsampling inclusion rate: ``p = min(0.5, 10 / |N|)``, i.e. ~10 nodes per subset."""


@dataclass
class BaselineScores:
    """Output of a core: unpacks as ``(scores, signed, per_pair, n_set_patches)``.

    ``scores[n]`` ranks nodes (higher = more important); ``signed[n]`` is the signed estimate
    (mean over pairs) or ``None``; ``per_pair[p, n]`` the per-pair values or ``None``;
    ``n_set_patches`` the number of sets given to the oracle (each costs one forward per pair).
    ``info`` holds method-specific details (reported in the result's metadata).
    """

    scores: np.ndarray
    signed: np.ndarray | None
    per_pair: np.ndarray | None
    n_set_patches: int
    info: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.scores, self.signed, self.per_pair, self.n_set_patches))


# ---------------------------------------------------------------------------------------------
# Subsampling (Algorithm 1)
# ---------------------------------------------------------------------------------------------


def default_inclusion_rate(n_nodes: int) -> float:
    """``p = min(0.5, 10 / |N|)``: about 10 nodes per random subset."""
    return float(min(0.5, SUBSAMPLING_TARGET_SIZE / max(n_nodes, 1)))


def random_subsets(n_nodes: int, p: float, n_subsets: int, rng: np.random.Generator) -> list:
    """``n_subsets`` sets, each node included independently with probability ``p`` (sorted).

    Drawn as ``k ~ Binomial(|N|, p)`` then a uniform ``k``-subset, which has exactly the law of
    independent Bernoulli(p) inclusions but costs O(k) instead of O(|N|) per set.
    """
    sizes = rng.binomial(n_nodes, p, size=n_subsets)
    return [np.sort(rng.choice(n_nodes, size=int(k), replace=False)) for k in sizes]


def subsampling_scores(
    oracle: Oracle,
    n_nodes: int,
    *,
    p: float | None = None,
    n_subsets: int = 100,
    rng: np.random.Generator | None = None,
) -> BaselineScores:
    """Algorithm 1: included-minus-excluded mean of random-subset effects, per node.

    ``M = n_subsets`` subsets ``η_j`` (each node in independently with probability ``p``) are
    patched, one forward per subset per pair. Per pair ``d`` and node ``n``::

        stat_d(n) = mean_{j: n ∈ η_j} I_j(d) - mean_{j: n ∉ η_j} I_j(d)

    ``signed = mean_d stat_d``, ``score = |signed|``. A node that is in no subset (or in all)
    has no statistic: its values are set to 0 and counted in ``info["never_sampled"]``
    (``info["always_sampled"]``).

    Properties (spec §7.2, derived): under the additive model ``I(η) = Σ_{n∈η} I(n) + ε`` the
    statistic is unbiased for ``I(n)`` for any ``p`` (given the node is in some subsets and out
    of others), with variance ``≈ (p(1-p) Σ_{n'≠n} I(n')² + σ_ε²) · (1/M_in + 1/M_out)
    ≈ Σ_{n'≠n} I(n')² / M + σ_ε² / (M p (1-p))``. With pairwise interactions
    ``J(n, n')`` its expectation is ``I(n) + p Σ_{n'} J(n, n')``: the marginal effect of ``n``
    with a random ``p``-fraction of the other nodes already patched.
    """
    rng = np.random.default_rng() if rng is None else rng
    if n_nodes < 1:
        raise ValueError("no nodes")
    p = default_inclusion_rate(n_nodes) if p is None else float(p)
    if not 0.0 < p < 1.0:
        raise ValueError(f"inclusion rate p must be in (0, 1), got {p}")
    if n_subsets < 2:
        raise ValueError(f"n_subsets must be at least 2, got {n_subsets}")
    sets = random_subsets(n_nodes, p, n_subsets, rng)
    sizes = np.array([len(s) for s in sets])
    nonempty = np.flatnonzero(sizes > 0)
    if len(nonempty) == 0:  # nothing patched: no node is ever included
        zeros = np.zeros(n_nodes)
        info = {"p": p, "never_sampled": n_nodes, "always_sampled": 0, "empty_subsets": n_subsets}
        return BaselineScores(zeros, zeros.copy(), None, 0, info)
    effects = np.asarray(oracle([sets[j] for j in nonempty]), dtype=np.float64)
    n_pairs = effects.shape[0]
    full = np.zeros((n_pairs, n_subsets))
    full[:, nonempty] = effects
    members = np.concatenate(sets)
    owner = np.repeat(np.arange(n_subsets), sizes)
    n_in = np.bincount(members, minlength=n_nodes)
    n_out = n_subsets - n_in
    # sum over the subsets containing n, per pair: [pairs, nodes]
    sum_in = np.stack([np.bincount(members, weights=row[owner], minlength=n_nodes) for row in full])
    sum_out = full.sum(1, keepdims=True) - sum_in
    defined = (n_in > 0) & (n_out > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_pair = sum_in / n_in - sum_out / n_out
    per_pair = np.where(defined, per_pair, 0.0)
    signed = per_pair.mean(0)
    info = {
        "p": p,
        "never_sampled": int((n_in == 0).sum()),
        "always_sampled": int((n_out == 0).sum()),
        "empty_subsets": int((sizes == 0).sum()),
        "mean_subset_size": float(sizes.mean()),
    }
    return BaselineScores(np.abs(signed), signed, per_pair, len(nonempty), info)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def blocks_scores(
    oracle: Oracle,
    n_nodes: int,
    *,
    block_size: int = 16,
    rng: np.random.Generator | None = None,
) -> BaselineScores:
    """Patch contiguous blocks of ``block_size`` nodes (flat order); a node scores its block's
    ``|mean_pairs effect|``. ``signed``/``per_pair`` are the block's values, broadcast to its
    nodes. Ties (every node of a block) are broken by node order in ``Attribution.ranking``.
    Cost: ``ceil(|N| / B)`` set patches per pair. ``rng`` is unused (deterministic)."""
    del rng
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    starts = np.arange(0, n_nodes, block_size)
    sets = [np.arange(s, min(s + block_size, n_nodes)) for s in starts]
    effects = np.asarray(oracle(sets), dtype=np.float64)  # [pairs, blocks]
    block_of = np.arange(n_nodes) // block_size
    per_pair = effects[:, block_of]
    signed = per_pair.mean(0)
    info = {"n_blocks": len(sets)}
    return BaselineScores(np.abs(signed), signed, per_pair, len(sets), info)


# ---------------------------------------------------------------------------------------------
# Hierarchical
# ---------------------------------------------------------------------------------------------


def structure_keys(layout: NodeLayout) -> np.ndarray:
    """``[levels, nodes]`` keys of the model structure in flat order: kind, layer, position (if
    per position), unit. A group is a contiguous range of the flat order; it is split at the
    coarsest level whose key changes inside it."""
    kind, layer, pos, unit = [], [], [], []
    for b in layout.blocks:
        kind.append(np.full(b.size, layout.kinds.index(b.kind)))
        layer.append(np.full(b.size, b.layer))
        pos.append(np.repeat(np.arange(b.n_positions), b.n_units))
        unit.append(np.tile(np.arange(b.n_units), b.n_positions))
    levels = [kind, layer] + ([pos] if layout.per_position else []) + [unit]
    return np.stack([np.concatenate(x) for x in levels])


def split_group(
    lo: int, hi: int, levels: np.ndarray | None, branching: int
) -> list[tuple[int, int]]:
    """Children of the node range ``[lo, hi)``: the runs of the coarsest structural level that
    varies inside it (kinds, then layers, positions, units), grouped into ``min(branching,
    #runs)`` contiguous children with (near) equal numbers of runs. Structural levels with a
    single child are skipped. ``levels=None``: plain ``branching``-ary split of the range."""
    if hi - lo < 2:
        raise ValueError("a single node has no children")
    starts = None
    for keys in [] if levels is None else levels:
        k = keys[lo:hi]
        change = np.flatnonzero(k[1:] != k[:-1]) + 1
        if len(change):
            starts = np.concatenate([[lo], lo + change])
            break
    if starts is None:  # finest level: single nodes
        starts = np.arange(lo, hi)
    ends = np.append(starts[1:], hi)
    parts = np.array_split(np.arange(len(starts)), min(branching, len(starts)))
    return [(int(starts[q[0]]), int(ends[q[-1]])) for q in parts]


def hierarchical_scores(
    oracle: Oracle,
    n_nodes: int,
    *,
    levels: np.ndarray | None = None,
    branching: int = 3,
    threshold: float | None = None,
    budget: int | None = None,
    expand_per_round: int = 8,
    rng: np.random.Generator | None = None,
) -> BaselineScores:
    """Top-down search over a tree of node groups (spec §7.4).

    Tree: the root (all nodes) → children by :func:`split_group` (kinds → layers → positions →
    contiguous unit groups, every internal group split into ≤ ``branching`` children) → single
    nodes. The root's children are patched first. Expanding a group patches each of its
    children (one set per child; a single-node child is a *verified leaf*: its exact effect).

    * ``threshold`` given: breadth-first; every evaluated group with ``|mean_pairs I| ≥
      threshold`` is expanded; all children of one depth are patched in one oracle call.
      With a ``budget`` too, groups are expanded in order of ``|I|`` until the next would
      exceed it.
    * ``threshold=None`` (default): best-first by ``|mean_pairs I|`` until ``budget`` set
      patches (default ``|N|``) are spent; each round expands the ``expand_per_round`` best
      open groups in one oracle call (``1`` = strict best-first; larger rounds save the per-call
      overhead of patching sessions). Expansion stops when the next would exceed the budget.

    Scores: a verified leaf scores ``|I(n)|``; any other node scores just below (next float
    towards -inf) the ``|I|`` of its smallest evaluated group, so a verified leaf ranks above
    unverified nodes of an equal group score and the nodes of one group stay together, in node
    order. ``signed``/``per_pair`` are the effects of that smallest evaluated group (exact for
    leaves). ``info["verified"]`` lists the leaves. ``rng`` is unused (deterministic).
    """
    del rng
    if branching < 2:
        raise ValueError(f"branching must be at least 2, got {branching}")
    if expand_per_round < 1:
        raise ValueError(f"expand_per_round must be at least 1, got {expand_per_round}")
    if n_nodes < 1:
        raise ValueError("no nodes")
    best_first = threshold is None
    if best_first and budget is None:
        budget = n_nodes
    limit = np.inf if budget is None else budget
    first = [(0, n_nodes)] if n_nodes == 1 else split_group(0, n_nodes, levels, branching)
    if len(first) > limit:
        raise ValueError(f"budget {budget} is below the {len(first)} top-level groups")

    groups: list[tuple[int, int]] = []  # evaluated groups, parents before children
    effects: list[np.ndarray] = []  # per group: [pairs]
    calls = 0

    def evaluate(batch: list[tuple[int, int]]) -> list[int]:
        nonlocal calls
        out = np.asarray(oracle([np.arange(lo, hi) for lo, hi in batch]), dtype=np.float64)
        calls += 1
        ids = list(range(len(groups), len(groups) + len(batch)))
        groups.extend(batch)
        effects.extend(out.T)
        return ids

    def size(g: int) -> int:
        return groups[g][1] - groups[g][0]

    def strength(g: int) -> float:
        return abs(float(effects[g].mean()))

    depth = 1
    frontier = evaluate(first)
    stopped_by_budget = False
    if best_first:
        heap = [(-strength(g), groups[g][0], g) for g in frontier if size(g) > 1]
        heapq.heapify(heap)
        while heap:
            batch: list[tuple[int, int]] = []
            expanded = 0
            while heap and expanded < expand_per_round:
                children = split_group(*groups[heap[0][2]], levels, branching)
                if len(groups) + len(batch) + len(children) > limit:
                    stopped_by_budget = True
                    break
                heapq.heappop(heap)
                batch.extend(children)
                expanded += 1
            if batch:
                for g in evaluate(batch):
                    if size(g) > 1:
                        heapq.heappush(heap, (-strength(g), groups[g][0], g))
            if stopped_by_budget or not batch:
                break
    else:
        while True:
            open_ = sorted(
                (g for g in frontier if size(g) > 1 and strength(g) >= threshold),
                key=lambda g: (-strength(g), groups[g][0]),
            )
            batch = []
            for g in open_:
                children = split_group(*groups[g], levels, branching)
                if len(groups) + len(batch) + len(children) > limit:
                    stopped_by_budget = True
                    break
                batch.extend(children)
            if not batch:
                break
            frontier = evaluate(sorted(batch))
            depth += 1
            if stopped_by_budget:
                break

    deepest = np.empty(n_nodes, dtype=np.int64)
    for g, (lo, hi) in enumerate(groups):
        deepest[lo:hi] = g  # children come after their parents
    table = np.stack(effects, axis=1)  # [pairs, groups]
    per_pair = table[:, deepest]
    signed = per_pair.mean(0)
    leaf = np.array([size(g) == 1 for g in range(len(groups))])[deepest]
    scores = np.abs(signed)
    scores[~leaf] = np.nextafter(scores[~leaf], -np.inf)
    info = {
        "verified": np.flatnonzero(leaf).tolist(),
        "n_groups": len(groups),
        "oracle_calls": calls,
        "stopped_by_budget": stopped_by_budget,
        "mode": "best-first" if best_first else "threshold",
        "budget": None if budget is None else int(budget),
    }
    if not best_first:
        info["depth"] = depth
    return BaselineScores(scores, signed, per_pair, len(groups), info)


# ---------------------------------------------------------------------------------------------
# Brute force (no prior order)
# ---------------------------------------------------------------------------------------------


def brute_force_scores(
    oracle: Oracle | None, n_nodes: int, *, rng: np.random.Generator | None = None
) -> BaselineScores:
    """A uniformly random order: ``scores`` descend along a random permutation (``(|N| - i) /
    |N|`` for the i-th node of it). No patching (``oracle`` is unused): the verification that
    makes this brute-force patching is counted by the evaluation. Expected verification cost
    to find the top ``x`` nodes: ``≈ |N| · x / (x + 1)`` (the expected maximum rank of x random
    positions among |N|, ``x (|N| + 1) / (x + 1)``)."""
    del oracle
    rng = np.random.default_rng() if rng is None else rng
    perm = rng.permutation(n_nodes)
    scores = np.empty(n_nodes)
    scores[perm] = (n_nodes - np.arange(n_nodes)) / max(n_nodes, 1)
    return BaselineScores(scores, None, None, 0, {})


# ---------------------------------------------------------------------------------------------
# public methods
# ---------------------------------------------------------------------------------------------

RECONSTRUCTED = {
    "subsampling": [
        "Algorithm 1 statistic: mean over subsets containing n minus mean over the others "
        "(spec §7.2, R med)",
        "per-pair statistic aggregated as |mean over pairs| (spec §1 default |E[I]|)",
        "default p = min(0.5, 10/|N|) and n_subsets = 100 (the paper's grid is unknown)",
    ],
    "blocks": [
        "contiguous blocks in flat node order kind→layer→position→unit (spec §7.3, R lo)",
        "node score = |mean over pairs of its block effect|; ties broken by node order",
    ],
    "hierarchical": [
        "tree root→kind→layer→position→unit groups, every level split into ≤ branching "
        "contiguous children (spec §7.4, R lo; branching 3 unverified)",
        "expansion: |mean effect| ≥ threshold (breadth-first) or best-first by |mean effect| "
        "until a budget of set patches (default |N|), expand_per_round groups per round",
        "unexpanded nodes score just below their smallest evaluated group's |effect|",
    ],
    "brute-force": [
        "no-prior order = uniformly random permutation; cost 0 (verification counted by the "
        "evaluation); expected cost to find the top x ≈ |N|·x/(x+1) (spec §7.1, D)",
    ],
}


class _PatchOracle:
    """Exact set patching through :func:`patch_sets`; accumulates the forward-pass cost."""

    def __init__(self, model: Any, tok: Any, layout: NodeLayout, **kwargs: Any) -> None:
        self.model, self.tok, self.layout, self.kwargs = model, tok, layout, kwargs
        self.cost = 0.0
        self.calls = 0

    def __call__(self, sets: list[np.ndarray]) -> np.ndarray:
        effects, cost = patch_sets(self.model, self.tok, sets, layout=self.layout, **self.kwargs)
        self.cost += cost
        self.calls += 1
        return effects


def _run(
    name: str,
    core: Callable[..., BaselineScores],
    options: dict[str, Any],
    model: Any,
    pairs: Any,
    nodes: str | Sequence[str],
    *,
    layers: str | Sequence[int] | None,
    per_position: bool,
    direction: str,
    metric: str | Metric,
    seed: int,
    batch_size: int | None,
    memory_gb: float,
    remote: Remote,
    api_key: str | None = None,
    progress: bool,
    prepend_bos: bool,
    structured: bool = False,
) -> Attribution:
    check_direction(direction)
    tok, metric_name, metric_fn = prepare_run(model, pairs, metric, prepend_bos)
    adapter = get_adapter(model)
    seq_len = common_length(tok) if per_position else None
    layout = NodeLayout.build(adapter, nodes, layers, seq_len)
    oracle = _PatchOracle(
        model,
        tok,
        layout,
        direction=direction,
        metric=metric_fn,
        batch_size=batch_size,
        memory_gb=memory_gb,
        remote=remote,
        api_key=api_key,
        progress=progress,
    )
    extra = {"levels": structure_keys(layout)} if structured else {}
    out = core(oracle, layout.n_nodes, rng=np.random.default_rng(seed), **options, **extra)
    n_pairs = len(tok)
    per_pair = out.per_pair
    if per_pair is None:
        per_pair = np.zeros((n_pairs, layout.n_nodes), dtype=np.float32)
    info = dict(out.info)
    return Attribution(
        nodes=layout,
        scores=out.scores,
        per_pair=per_pair,
        mean_effect=out.signed,
        method=name,
        direction=direction,
        metric=metric_name,
        model=model_name(model),
        cost=float(oracle.cost),
        pairs=[p.__dict__ for p in tok.pairs],
        metadata={
            **options,
            "seed": seed,
            "batch_size": batch_size,
            "set_patches": out.n_set_patches,
            "oracle_calls": oracle.calls,
            **info,
            "per_position": per_position,
            "seq_len": seq_len,
            "layers": list(layout.layers),
            "kinds": list(layout.kinds),
            "reconstructed": RECONSTRUCTED[name],
        },
    )


def subsampling(
    model: Any,
    pairs: Any,
    nodes: str | Sequence[str] = "head",
    *,
    layers: str | Sequence[int] | None = None,
    per_position: bool = False,
    direction: str = "noising",
    metric: str | Metric = "logit-diff",
    p: float | None = None,
    n_subsets: int = 100,
    seed: int = 0,
    batch_size: int | None = None,
    memory_gb: float = 2.0,
    remote: Remote = False,
    api_key: str | None = None,
    progress: bool = True,
    prepend_bos: bool = False,
) -> Attribution:
    """Subsampling (Algorithm 1; see :func:`subsampling_scores`).

    ``p`` is the inclusion rate (default ``min(0.5, 10 / |N|)``, ~10 nodes per subset; the
    interaction bias ``p Σ J`` grows with it, the noise term of the variance shrinks),
    ``n_subsets`` the number ``M`` of random subsets. ``mean_effect`` = signed statistic (mean
    over pairs), ``score = |mean_effect|``; ``per_pair`` = the statistic on each pair. Nodes
    in no subset score 0 (``metadata["never_sampled"]``). Cost: ``pairs × (M' + 2 × sessions)``
    forwards, ``M'`` = non-empty subsets (``metadata["set_patches"]``).
    """
    return _run(
        "subsampling",
        subsampling_scores,
        {"p": p, "n_subsets": n_subsets},
        model,
        pairs,
        nodes,
        layers=layers,
        per_position=per_position,
        direction=direction,
        metric=metric,
        seed=seed,
        batch_size=batch_size,
        memory_gb=memory_gb,
        remote=remote,
        api_key=api_key,
        progress=progress,
        prepend_bos=prepend_bos,
    )


def blocks(
    model: Any,
    pairs: Any,
    nodes: str | Sequence[str] = "head",
    *,
    layers: str | Sequence[int] | None = None,
    per_position: bool = False,
    direction: str = "noising",
    metric: str | Metric = "logit-diff",
    block_size: int = 16,
    seed: int = 0,
    batch_size: int | None = None,
    memory_gb: float = 2.0,
    remote: Remote = False,
    api_key: str | None = None,
    progress: bool = True,
    prepend_bos: bool = False,
) -> Attribution:
    """Blocks (see :func:`blocks_scores`): contiguous blocks of ``block_size`` nodes in the flat
    order (kind → layer → position → unit; blocks may span sites), each patched as a set; a node
    scores ``|mean over pairs of its block's effect|``. ``block_size=1`` is exact patching.
    Cost: ``pairs × (ceil(|N| / B) + 2 × sessions)`` forwards. ``seed`` is unused."""
    return _run(
        "blocks",
        blocks_scores,
        {"block_size": block_size},
        model,
        pairs,
        nodes,
        layers=layers,
        per_position=per_position,
        direction=direction,
        metric=metric,
        seed=seed,
        batch_size=batch_size,
        memory_gb=memory_gb,
        remote=remote,
        api_key=api_key,
        progress=progress,
        prepend_bos=prepend_bos,
    )


def hierarchical(
    model: Any,
    pairs: Any,
    nodes: str | Sequence[str] = "head",
    *,
    layers: str | Sequence[int] | None = None,
    per_position: bool = False,
    direction: str = "noising",
    metric: str | Metric = "logit-diff",
    branching: int = 3,
    threshold: float | None = None,
    budget: int | None = None,
    expand_per_round: int = 8,
    seed: int = 0,
    batch_size: int | None = None,
    memory_gb: float = 2.0,
    remote: Remote = False,
    api_key: str | None = None,
    progress: bool = True,
    prepend_bos: bool = False,
) -> Attribution:
    """Hierarchical group patching (see :func:`hierarchical_scores` for the tree, the expansion
    rules and the scores). ``budget`` counts patched groups per pair (default ``|N|`` in
    best-first mode, unlimited with a ``threshold``). Verified leaves (exact single-node
    effects) are listed in ``metadata["verified"]``. Cost: ``pairs × (groups patched + 2 ×
    sessions)`` forwards, one :func:`patch_sets` call per depth (threshold) or round
    (best-first). ``seed`` is unused."""
    return _run(
        "hierarchical",
        hierarchical_scores,
        {
            "branching": branching,
            "threshold": threshold,
            "budget": budget,
            "expand_per_round": expand_per_round,
        },
        model,
        pairs,
        nodes,
        layers=layers,
        per_position=per_position,
        direction=direction,
        metric=metric,
        seed=seed,
        batch_size=batch_size,
        memory_gb=memory_gb,
        remote=remote,
        api_key=api_key,
        progress=progress,
        prepend_bos=prepend_bos,
        structured=True,
    )


def brute_force(
    model: Any,
    pairs: Any,
    nodes: str | Sequence[str] = "head",
    *,
    layers: str | Sequence[int] | None = None,
    per_position: bool = False,
    direction: str = "noising",
    metric: str | Metric = "logit-diff",
    seed: int = 0,
    batch_size: int | None = None,
    memory_gb: float = 2.0,
    remote: Remote = False,
    api_key: str | None = None,
    progress: bool = True,
    prepend_bos: bool = False,
) -> Attribution:
    """The no-prior order of brute-force patching: a random permutation (``seed``), scores
    descending along it, cost 0 (its verification is counted by the evaluation; expected cost
    to find the top ``x`` nodes ≈ ``|N| · x / (x + 1)``). ``per_pair`` is all zeros and
    ``mean_effect`` is ``None``; the model is not run."""
    return _run(
        "brute-force",
        brute_force_scores,
        {},
        model,
        pairs,
        nodes,
        layers=layers,
        per_position=per_position,
        direction=direction,
        metric=metric,
        seed=seed,
        batch_size=batch_size,
        memory_gb=memory_gb,
        remote=remote,
        api_key=api_key,
        progress=progress,
        prepend_bos=prepend_bos,
    )
