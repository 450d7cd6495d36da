"""The result type of the edge methods: :class:`EdgeAttribution` (mirrors ``Attribution``).

Conventions: ``per_pair[p, e]`` is edge ``e``'s value on pair ``p``: a signed estimate or
effect ``metric(patched) - metric(unpatched)``, or for GradDrop methods the per-pair unsigned
score. ``scores`` ranks edges (higher = more important): ``mean_pairs |estimate|`` for the
attribution methods, ``|mean effect|`` for exact patching. ``mean_effect`` is the signed mean
over pairs where the method has one, else ``None``. ``cost`` is in forward-pass equivalents
(one backward counts as 2), summed over all pairs. Edges are in the flat order of
:class:`atp_nnsight.edges.graph.EdgeGraph` (downstream-major); ``edges`` is its edge table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atp_nnsight.edges.graph import DOWNSTREAM_KINDS, EDGE_COLUMNS
from atp_nnsight.results import (
    _check_shapes,
    _check_top_k,
    _open_npz,
    _ranks,
    _run_meta,
    _save_npz,
    atomic_paths,
)

_SAVED_KEYS = ("scores", "per_pair", "meta", *EDGE_COLUMNS)
_INT_COLUMNS = ("edge", "upstream_layer", "upstream_index", "downstream_layer", "downstream_index")


@dataclass
class EdgeAttribution:
    """Edge table + ranking scores + per-pair values + metadata of one edge-method run."""

    edges: pd.DataFrame
    scores: np.ndarray
    per_pair: np.ndarray
    mean_effect: np.ndarray | None
    method: str
    direction: str
    metric: str
    model: str
    cost: float
    pairs: list[dict[str, str]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_shapes(len(self.edges), self.scores, self.per_pair, "edges")

    def __len__(self) -> int:
        return len(self.edges)

    def __repr__(self) -> str:
        return (
            f"EdgeAttribution(method={self.method!r}, edges={len(self)}, "
            f"pairs={self.per_pair.shape[0]}, direction={self.direction!r}, "
            f"metric={self.metric!r}, cost={self.cost:g})"
        )

    def ranking(self) -> np.ndarray:
        """Edge indices by descending score; ties broken by edge order (stable)."""
        return np.argsort(-self.scores, kind="stable")

    def to_dataframe(self) -> pd.DataFrame:
        """One row per edge: the edge table plus ``name, score, mean_effect, rank``."""
        df = self.edges.copy()
        df.insert(0, "name", edge_names(self.edges))
        df["score"] = self.scores
        df["mean_effect"] = np.nan if self.mean_effect is None else self.mean_effect
        df["rank"] = _ranks(self.ranking())
        return df

    def top(self, k: int = 10, input: str | None = None) -> pd.DataFrame:
        """The ``k`` highest-scoring edges (optionally into one input kind), best first."""
        _check_top_k(k)
        df = self.to_dataframe()
        if input is not None:
            if input not in DOWNSTREAM_KINDS:
                raise ValueError(
                    f"unknown input kind {input!r}; choose from {', '.join(DOWNSTREAM_KINDS)}"
                )
            df = df[df["input"] == input]
        return df.sort_values("rank").head(int(k))

    # ---- persistence -------------------------------------------------------------------------
    def to_csv(self, path: str | Path) -> Path:
        """CSV of :meth:`to_dataframe` (one row per edge), written atomically."""
        path = Path(path)
        with atomic_paths(path) as (tmp,):
            self.to_dataframe().to_csv(tmp, index=False)
        return path

    def save(self, path: str | Path) -> Path:
        """Everything in one ``.npz`` (no pickled objects; the suffix is set to ``.npz``)."""
        arrays = {"scores": self.scores, "per_pair": self.per_pair}
        for col in EDGE_COLUMNS:
            dtype = np.int64 if col in _INT_COLUMNS else str
            arrays[col] = self.edges[col].to_numpy(dtype=dtype)
        return _save_npz(path, arrays, _run_meta(self), self.mean_effect)

    @classmethod
    def load(cls, path: str | Path) -> EdgeAttribution:
        """Read a result written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no saved edge result at {path}")
        with _open_npz(path, "EdgeAttribution") as z:
            missing = [k for k in _SAVED_KEYS if k not in z.files]
            if missing:
                raise ValueError(f"{path} is not a saved EdgeAttribution (no {', '.join(missing)})")
            meta = json.loads(str(z["meta"]))
            edges = pd.DataFrame(
                {
                    col: z[col] if col in _INT_COLUMNS else z[col].astype(object)
                    for col in EDGE_COLUMNS
                }
            )
            return cls(
                edges=edges,
                scores=z["scores"],
                per_pair=z["per_pair"],
                mean_effect=z["mean_effect"] if "mean_effect" in z.files else None,
                **meta,
            )


def edge_names(edges: pd.DataFrame) -> np.ndarray:
    """``"{upstream}->{downstream}<{input}>"`` per edge (EAP-IG's naming), e.g.
    ``a0.h1->a2.h3<q>``, ``m0->m3``, ``a1.h0->logits``; MLP and logit inputs carry no tag."""
    up = edges["upstream"].to_numpy(dtype=object)
    down = edges["downstream"].to_numpy(dtype=object)
    kind = edges["input"].to_numpy(dtype=object)
    tag = np.where(np.isin(kind, ["q", "k", "v"]), "<" + kind + ">", "")
    return up + "->" + down + tag
