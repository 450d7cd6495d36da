"""Node layout: how a selection of node kinds × layers × (positions) maps to a flat node axis.

Every method computes, per *site* ``(kind, layer)``, a tensor ``[pairs, positions, units]``
(``positions`` is 1 when nodes are summed over positions) and flattens it into one node axis
in the order: kind (forward order), layer, position, unit. :class:`NodeLayout` owns that order
and turns it into the node table of a result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from atp_nnsight.models.adapter import Adapter
from atp_nnsight.types import Node, parse_kinds, parse_layers


@dataclass(frozen=True)
class SiteBlock:
    """The nodes of one site: ``n_positions × n_units`` entries starting at ``offset``."""

    kind: str
    layer: int
    n_units: int
    n_positions: int
    offset: int

    @property
    def size(self) -> int:
        return self.n_units * self.n_positions


@dataclass(frozen=True)
class NodeLayout:
    """Node kinds × layers, per position (prompts of ``seq_len`` tokens) or summed."""

    kinds: tuple[str, ...]
    layers: tuple[int, ...]
    seq_len: int | None
    blocks: tuple[SiteBlock, ...]

    @classmethod
    def build(
        cls,
        adapter: Adapter,
        kinds: str | list[str] | tuple[str, ...],
        layers: str | list[int] | tuple[int, ...] | None = None,
        seq_len: int | None = None,
    ) -> NodeLayout:
        """``seq_len=None`` sums every node over positions; an int gives per-position nodes."""
        kinds_t = parse_kinds(kinds)
        layers_t = parse_layers(layers, adapter.n_layers)
        n_pos = 1 if seq_len is None else seq_len
        blocks, offset = [], 0
        for kind in kinds_t:
            for layer in layers_t:
                block = SiteBlock(kind, layer, adapter.n_units(kind), n_pos, offset)
                blocks.append(block)
                offset += block.size
        return cls(kinds_t, layers_t, seq_len, tuple(blocks))

    @classmethod
    def of_result(cls, adapter: Adapter, result: Any) -> NodeLayout:
        """The layout a method's :class:`~atp_nnsight.results.Attribution` was computed on."""
        meta = result.metadata
        layout = cls.build(adapter, meta["kinds"], meta["layers"], meta.get("seq_len"))
        if layout.n_nodes != len(result):
            raise ValueError("the result's node table does not match this model's layout")
        return layout

    @property
    def per_position(self) -> bool:
        return self.seq_len is not None

    @property
    def n_nodes(self) -> int:
        return sum(b.size for b in self.blocks)

    def block(self, kind: str, layer: int) -> SiteBlock | None:
        for b in self.blocks:
            if b.kind == kind and b.layer == layer:
                return b
        return None

    def only(self, kind: str) -> tuple[NodeLayout, np.ndarray]:
        """The layout of ``kind``'s nodes alone, and their flat indices in this layout."""
        blocks, index, offset = [], [], 0
        for b in self.blocks:
            if b.kind == kind:
                blocks.append(SiteBlock(b.kind, b.layer, b.n_units, b.n_positions, offset))
                index.append(np.arange(b.offset, b.offset + b.size))
                offset += b.size
        flat = np.concatenate(index) if index else np.zeros(0, dtype=np.int64)
        kinds = (kind,) if blocks else ()
        return NodeLayout(kinds, self.layers, self.seq_len, tuple(blocks)), flat

    def blocks_in_layer(self, layer: int) -> list[SiteBlock]:
        return [b for b in self.blocks if b.layer == layer]

    def index_of(self, node: Node) -> int:
        """Flat index of ``node``; raises if the layout does not contain it."""
        b = self.block(node.kind, node.layer)
        ok = b is not None and 0 <= node.index < b.n_units
        if ok and self.per_position:
            ok = node.position is not None and 0 <= node.position < b.n_positions
        elif ok:
            ok = node.position is None
        if not ok:
            raise ValueError(f"node {node} is not in this layout")
        pos = node.position if self.per_position else 0
        return b.offset + pos * b.n_units + node.index

    def node(self, flat: int) -> Node:
        for b in self.blocks:
            if b.offset <= flat < b.offset + b.size:
                pos, unit = divmod(flat - b.offset, b.n_units)
                return Node(b.kind, b.layer, unit, pos if self.per_position else None)
        raise IndexError(flat)

    def table(self) -> pd.DataFrame:
        """One row per node: ``kind, layer, index, position`` (position empty when summed)."""
        kinds, layers, index, position = [], [], [], []
        for b in self.blocks:
            n = b.size
            kinds.append(np.full(n, b.kind, dtype=object))
            layers.append(np.full(n, b.layer, dtype=np.int64))
            index.append(np.tile(np.arange(b.n_units), b.n_positions))
            position.append(np.repeat(np.arange(b.n_positions), b.n_units))
        pos = np.concatenate(position) if position else np.zeros(0, dtype=np.int64)
        return pd.DataFrame(
            {
                "kind": np.concatenate(kinds) if kinds else np.zeros(0, dtype=object),
                "layer": np.concatenate(layers) if layers else np.zeros(0, dtype=np.int64),
                "index": np.concatenate(index) if index else np.zeros(0, dtype=np.int64),
                "position": pd.array(pos if self.per_position else [None] * len(pos), "Int64"),
            }
        )
