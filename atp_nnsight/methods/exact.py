"""Exact activation patching: the ground truth and the verifier.

``I(η; base, source) = metric(base run with every node of η set to its source-run value)
- metric(base run)``. Noising (default): base = clean, source = noise; denoising swaps them.
A node summed over positions is patched at every position at once. Many patches share one
forward along the batch axis (one row per (pair, node set)), ``batch_size`` rows per forward.
Cost: one forward per patched row plus, per session, two per pair (unpatched base and source).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from atp_nnsight.checks import check_finite_scores, check_int, check_metric_values
from atp_nnsight.methods.common import (
    common_length,
    forward_kwargs,
    metric_values,
    model_name,
    prepare_run,
    roles_of,
    site_order,
)
from atp_nnsight.metrics import Metric
from atp_nnsight.models import Adapter, get_adapter
from atp_nnsight.nodes import NodeLayout
from atp_nnsight.remote import Remote, run_chunks
from atp_nnsight.results import Attribution
from atp_nnsight.types import NODE_KINDS, Node, check_direction

MAX_ROWS_PER_FORWARD = 128
"""Default cap on patched rows per forward: larger CPU batches measured slower per row."""

FORWARDS_PER_SESSION = 8
"""Patched forwards per session (chunk): the unit of progress, checkpointing and remote
requests; each session also runs the unpatched base and source prompts once."""


@dataclass(frozen=True)
class NodeSets:
    """Sets of nodes to patch together, as flat entry arrays (``pos == -1``: all positions)."""

    sites: tuple[tuple[str, int], ...]
    ptr: np.ndarray
    site: np.ndarray
    unit: np.ndarray
    pos: np.ndarray

    def __len__(self) -> int:
        return len(self.ptr) - 1

    @classmethod
    def singletons(cls, layout: NodeLayout) -> NodeSets:
        """One set per node of ``layout``, in layout order."""
        sites = tuple(
            sorted(((b.kind, b.layer) for b in layout.blocks), key=lambda s: site_order(*s))
        )
        index = {s: i for i, s in enumerate(sites)}
        site, unit, pos = [], [], []
        for b in layout.blocks:
            site.append(np.full(b.size, index[(b.kind, b.layer)]))
            unit.append(np.tile(np.arange(b.n_units), b.n_positions))
            p = np.repeat(np.arange(b.n_positions), b.n_units)
            pos.append(p if layout.per_position else np.full(b.size, -1))
        n = layout.n_nodes
        return cls(sites, np.arange(n + 1), *(np.concatenate(x) for x in (site, unit, pos)))

    @classmethod
    def from_layout(cls, layout: NodeLayout, sets: Sequence[Sequence[int]]) -> NodeSets:
        """Sets given as flat node indices of ``layout`` (e.g. rows of a result's node table)."""
        if len(sets) == 0:
            raise ValueError("no node sets given")
        one = cls.singletons(layout)
        flat = np.concatenate([np.asarray(s, dtype=np.int64).reshape(-1) for s in sets])
        if len(flat) and not 0 <= flat.min() <= flat.max() < layout.n_nodes:
            raise ValueError(f"node index out of range 0-{layout.n_nodes - 1} in a node set")
        ptr = np.cumsum([0] + [len(s) for s in sets])
        return cls(one.sites, ptr, one.site[flat], one.unit[flat], one.pos[flat])

    @classmethod
    def from_nodes(cls, sets: Sequence[Sequence[Node]], adapter: Adapter) -> NodeSets:
        """Arbitrary sets of :class:`Node`; validates kinds, layers and unit indices."""
        if len(sets) == 0:
            raise ValueError("no node sets given")
        nodes = [n for s in sets for n in s]
        for n in nodes:
            if n.kind not in NODE_KINDS:
                raise ValueError(
                    f"node {n}: unknown kind {n.kind!r}; choose from {', '.join(NODE_KINDS)}"
                )
            if not 0 <= n.layer < adapter.n_layers:
                raise ValueError(f"node {n}: layer out of range 0-{adapter.n_layers - 1}")
            if not 0 <= n.index < adapter.n_units(n.kind):
                raise ValueError(f"node {n}: index out of range 0-{adapter.n_units(n.kind) - 1}")
            if n.position is not None and n.position < 0:
                raise ValueError(f"node {n}: negative position")
        sites = tuple(sorted({(n.kind, n.layer) for n in nodes}, key=lambda s: site_order(*s)))
        index = {s: i for i, s in enumerate(sites)}
        ptr = np.cumsum([0] + [len(s) for s in sets])
        site = np.array([index[(n.kind, n.layer)] for n in nodes], dtype=np.int64)
        unit = np.array([n.index for n in nodes], dtype=np.int64)
        pos = np.array([-1 if n.position is None else n.position for n in nodes], dtype=np.int64)
        return cls(sites, ptr, site, unit, pos)

    def max_position(self) -> int:
        return int(self.pos.max()) if len(self.pos) else -1


def _row_batch(sets: NodeSets, pairs: np.ndarray, set_ids: np.ndarray, seq_len: int) -> dict:
    """One patched forward: ``pair`` (base pair of each row) and, per layer in forward order,
    the writes ``{kind, row, pos, unit, source_pair}`` (index tensors, one entry per patched
    (row, position, unit)). Plain dicts and tuples: this travels to the server."""
    counts = sets.ptr[set_ids + 1] - sets.ptr[set_ids]
    rows = np.repeat(np.arange(len(set_ids)), counts)
    entry = np.concatenate([np.arange(sets.ptr[s], sets.ptr[s + 1]) for s in set_ids])
    site, unit, pos = sets.site[entry], sets.unit[entry], sets.pos[entry]
    everywhere = pos < 0  # summed nodes: expand to every position
    if everywhere.any():
        n_all = int(everywhere.sum())
        rows = np.concatenate([rows[~everywhere], np.repeat(rows[everywhere], seq_len)])
        site = np.concatenate([site[~everywhere], np.repeat(site[everywhere], seq_len)])
        unit = np.concatenate([unit[~everywhere], np.repeat(unit[everywhere], seq_len)])
        pos = np.concatenate([pos[~everywhere], np.tile(np.arange(seq_len), n_all)])
    by_layer: dict[int, list[dict]] = {}
    for s in np.unique(site):
        kind, layer = sets.sites[s]
        m = site == s
        row, p, u, src = (
            torch.from_numpy(np.ascontiguousarray(a[m])) for a in (rows, pos, unit, pairs[rows])
        )
        write = {"kind": kind, "row": row, "pos": p, "unit": u, "source_pair": src}
        by_layer.setdefault(layer, []).append(write)
    return {
        "pair": torch.from_numpy(pairs),
        "layers": tuple((layer, tuple(ws)) for layer, ws in sorted(by_layer.items())),
    }


def _patch_body(model: Any, chunk: dict) -> dict[str, Any]:
    """One session: base+source forward, then one forward per row batch (runs remotely too).

    Every patch is indexed on the device of the layer it writes to; only the per-row metric
    change leaves the session, on the CPU.
    """
    adapter = chunk["adapter"]
    base_ids, source_ids, clean_target, noise_target = chunk["roles"]
    n = base_ids.shape[0]
    with model.trace(torch.cat([base_ids, source_ids]), **chunk["forward"]):
        source = {}
        for layer, kinds in chunk["source_sites"]:
            raws, _ = adapter.read_layer(model, layer, kinds)
            for kind in kinds:
                source[(kind, layer)] = adapter.units(kind, raws[kind])[n:].detach().clone()
        logits = model.output.logits
        both = metric_values(
            chunk["metric"], logits, clean_target.repeat(2), noise_target.repeat(2)
        ).detach()
        base_metric, source_metric = both[:n], both[n:]
    effects = []
    for batch in chunk["batches"]:
        pair = batch["pair"]
        with model.trace(base_ids[pair], **chunk["forward"]):
            for layer, writes in batch["layers"]:
                by_kind = {w["kind"]: w for w in writes}
                for kind, raw in adapter.iter_layer(model, layer, tuple(by_kind)):
                    w = by_kind[kind]
                    view = adapter.units(kind, raw)
                    dev = view.device
                    row, pos, unit = w["row"].to(dev), w["pos"].to(dev), w["unit"].to(dev)
                    stored = source[(kind, layer)]  # same layer: same device as ``view``
                    patch = stored[w["source_pair"].to(stored.device), pos, unit]
                    view[row, pos, unit] = patch.to(dev, view.dtype)
            logits = model.output.logits
            value = metric_values(chunk["metric"], logits, clean_target[pair], noise_target[pair])
            effects.append((value - base_metric[pair.to(value.device)]).detach().cpu())
    return {
        "effects": torch.cat(effects),
        "base": base_metric.cpu(),
        "source": source_metric.cpu(),
    }


def _rows_per_forward(adapter: Adapter, seq_len: int, vocab: int, memory_gb: float) -> int:
    """Rows per patched forward that keep activations under ``memory_gb`` (fp32 estimate)."""
    per_row = (
        4
        * seq_len
        * (vocab + 6 * adapter.d_model + 2 * adapter.d_mlp + 4 * adapter.n_heads * seq_len)
    )
    return max(1, min(MAX_ROWS_PER_FORWARD, int(memory_gb * 2**30 // per_row)))


def gather_effects(
    owners: list[tuple[Any, np.ndarray]], outs: list[dict], n_pairs: int, n_sets: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Sessions' outputs put in place: effects ``[pairs, sets]``, base and source metric
    ``[pairs]``, and the cost (one forward per patched row, two per pair and session).

    ``owners[i]`` is session ``i``'s (pair indices, set indices); its ``effects`` are set-major.
    """
    effects = np.zeros((n_pairs, n_sets), dtype=np.float32)
    base = np.zeros(n_pairs, dtype=np.float32)
    source = np.zeros(n_pairs, dtype=np.float32)
    cost = 0.0
    for (idx, set_ids), out in zip(owners, outs, strict=True):
        effects[np.ix_(idx, set_ids)] = out["effects"].numpy().reshape(len(set_ids), len(idx)).T
        base[idx] = out["base"].numpy()
        source[idx] = out["source"].numpy()
        cost += len(idx) * (len(set_ids) + 2)
    return effects, base, source, cost


def run_node_sets(
    model: Any,
    tok: Any,
    sets: NodeSets,
    *,
    direction: str,
    metric: Metric,
    batch_size: int | None,
    memory_gb: float,
    remote: Remote,
    api_key: str | None = None,
    progress: bool,
    checkpoint_dir: Any = None,
    pairs_per_chunk: int = 8,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Effects ``[pairs, sets]``, base metric ``[pairs]`` and cost (forward passes).

    Refuses (after the run, from the unpatched runs' metrics) a metric that is non-finite or
    the same on both runs of every pair (:func:`atp_nnsight.checks.check_metric_values`).
    """
    adapter = get_adapter(model)
    check_direction(direction)
    if batch_size is not None:
        check_int(batch_size, "batch_size")
    vocab = model._module.config.get_text_config().vocab_size
    source_sites: dict[int, list[str]] = {}
    for kind, layer in sets.sites:
        source_sites.setdefault(layer, []).append(kind)
    source_sites_t = tuple((lay, tuple(k)) for lay, k in sorted(source_sites.items()))
    chunks, owners = [], []
    for group in tok.chunks(pairs_per_chunk):
        if sets.max_position() >= group.length:
            raise ValueError(
                f"a node has position {sets.max_position()} but pairs {group.indices} have only "
                f"{group.length} tokens"
            )
        rows = batch_size or _rows_per_forward(adapter, group.length, vocab, memory_gb)
        n = len(group.indices)
        sets_per_chunk = max(1, rows * FORWARDS_PER_SESSION // n)
        roles = roles_of(group, direction)
        for first in range(0, len(sets), sets_per_chunk):
            set_ids = np.arange(first, min(first + sets_per_chunk, len(sets)))
            pair_of_row = np.tile(np.arange(n), len(set_ids))
            set_of_row = np.repeat(set_ids, n)
            batches = tuple(
                _row_batch(sets, pair_of_row[i : i + rows], set_of_row[i : i + rows], group.length)
                for i in range(0, len(pair_of_row), rows)
            )
            chunks.append(
                {
                    "adapter": adapter,
                    "roles": roles,
                    "metric": metric,
                    "forward": forward_kwargs(metric),
                    "source_sites": source_sites_t,
                    "batches": batches,
                }
            )
            owners.append((group.indices, set_ids))
    outs = run_chunks(
        model,
        chunks,
        _patch_body,
        remote=remote,
        api_key=api_key,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        desc="exact patching",
        grad=False,
    )
    effects, base, source, cost = gather_effects(owners, outs, len(tok), len(sets))
    check_metric_values(base, source, tok.pairs, direction=direction)
    return effects, base, cost


def patch(
    model: Any,
    pairs: Any,
    nodes: str | Sequence[str] = "head",
    *,
    layers: str | Sequence[int] | None = None,
    per_position: bool = False,
    direction: str = "noising",
    metric: str | Metric = "logit-diff",
    batch_size: int | None = None,
    memory_gb: float = 2.0,
    prepend_bos: bool = False,
    remote: Remote = False,
    api_key: str | None = None,
    progress: bool = True,
    checkpoint_dir: Any = None,
    allow_nonfinite: bool = False,
) -> Attribution:
    """Exact activation patching of every node of ``nodes`` × ``layers``, one node at a time.

    Returns per-pair signed effects, their mean (``mean_effect``) and ``score = |mean|``.
    Non-finite effects raise unless ``allow_nonfinite``.
    """
    tok, metric_name, metric_fn = prepare_run(model, pairs, metric, prepend_bos)
    adapter = get_adapter(model)
    seq_len = common_length(tok) if per_position else None
    layout = NodeLayout.build(adapter, nodes, layers, seq_len)
    effects, base, cost = run_node_sets(
        model,
        tok,
        NodeSets.singletons(layout),
        direction=direction,
        metric=metric_fn,
        batch_size=batch_size,
        memory_gb=memory_gb,
        remote=remote,
        api_key=api_key,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
    )
    mean = effects.mean(0)
    result = Attribution(
        nodes=layout,
        scores=np.abs(mean),
        per_pair=effects,
        mean_effect=mean,
        method="exact",
        direction=direction,
        metric=metric_name,
        model=model_name(model),
        cost=cost,
        pairs=[p.__dict__ for p in tok.pairs],
        metadata={
            "base_metric": base.tolist(),
            "per_position": per_position,
            "seq_len": seq_len,
            "layers": list(layout.layers),
            "kinds": list(layout.kinds),
        },
    )
    check_finite_scores(result, allow_nonfinite)
    return result


def patch_sets(
    model: Any,
    pairs: Any,
    sets: Sequence[Sequence[Node]] | Sequence[Sequence[int]],
    *,
    layout: NodeLayout | None = None,
    direction: str = "noising",
    metric: str | Metric = "logit-diff",
    batch_size: int | None = None,
    memory_gb: float = 2.0,
    prepend_bos: bool = False,
    remote: Remote = False,
    api_key: str | None = None,
    progress: bool = True,
    checkpoint_dir: Any = None,
) -> tuple[np.ndarray, float]:
    """Effects ``[pairs, sets]`` of patching each node set as a whole, and the cost.

    ``sets`` are lists of :class:`Node`, or, with ``layout``, lists of flat node indices of
    that layout (the row numbers of a result's node table). With ``checkpoint_dir`` finished
    chunks are kept there and a rerun resumes from them.
    """
    tok, _, metric_fn = prepare_run(model, pairs, metric, prepend_bos)
    if layout is None:
        node_sets = NodeSets.from_nodes(sets, get_adapter(model))
    else:
        node_sets = NodeSets.from_layout(layout, sets)
    effects, _, cost = run_node_sets(
        model,
        tok,
        node_sets,
        direction=direction,
        metric=metric_fn,
        batch_size=batch_size,
        memory_gb=memory_gb,
        remote=remote,
        api_key=api_key,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
    )
    return effects, cost
