"""The one result type of every method: :class:`Attribution`.

Conventions: ``per_pair[p, n]`` is the per-pair value of node ``n`` on pair ``p`` (a signed
effect or estimate, ``metric(patched) - metric(unpatched)``; for GradDrop methods the per-pair
unsigned score). ``scores`` ranks nodes (higher = more important): ``|mean effect|`` for exact
patching, ``mean_pairs |estimate|`` for the AtP family. ``mean_effect`` is the signed mean over
pairs where the method has one, else ``None``. ``cost`` is in forward-pass equivalents
(one backward counts as 2), summed over all pairs.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atp_nnsight.nodes import NodeLayout
from atp_nnsight.types import Node, check_kind

NODE_COLUMNS = ["kind", "layer", "index", "position"]


class _NodeTable:
    """``Attribution.nodes``: a node table (``kind, layer, index, position``), given as a
    DataFrame or as the :class:`~atp_nnsight.nodes.NodeLayout` a method ran on. From a layout
    the DataFrame is built on first access only: ranking, ``top``, ``node`` and ``select``
    by kind work from the layout, so a result with millions of per-position nodes keeps just
    its dense arrays until a table is asked for."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = f"_{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> pd.DataFrame:
        if obj is None:  # no class-level default: the dataclass field stays required
            raise AttributeError("nodes")
        value = obj.__dict__[self.key]
        if isinstance(value, NodeLayout):
            value = obj.__dict__[self.key] = value.table()
        return value

    def __set__(self, obj: Any, value: pd.DataFrame | NodeLayout) -> None:
        if not isinstance(value, (pd.DataFrame, NodeLayout)):
            raise TypeError(
                f"Attribution nodes must be a DataFrame or a NodeLayout, got {type(value).__name__}"
            )
        obj.__dict__[self.key] = value
        obj.__dict__["layout"] = value if isinstance(value, NodeLayout) else None


@dataclass
class Attribution:
    """Node table + ranking scores + per-pair values + metadata of one method run.

    ``nodes`` may be given as the method's :class:`~atp_nnsight.nodes.NodeLayout` (kept as
    ``layout``); the table is then built only when first read (see :class:`_NodeTable`).
    """

    nodes: pd.DataFrame = _NodeTable()  # type: ignore[assignment]
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
        _check_shapes(len(self), self.scores, self.per_pair, "nodes")

    def __len__(self) -> int:
        layout = self.__dict__.get("layout")
        return layout.n_nodes if layout is not None else len(self.__dict__["_nodes"])

    def __repr__(self) -> str:
        return (
            f"Attribution(method={self.method!r}, nodes={len(self)}, "
            f"pairs={self.per_pair.shape[0]}, direction={self.direction!r}, "
            f"metric={self.metric!r}, cost={self.cost:g})"
        )

    def node(self, i: int) -> Node:
        if self.layout is not None:
            return self.layout.node(int(i))
        row = self.nodes.iloc[i]
        pos = row["position"]
        return Node(
            str(row["kind"]),
            int(row["layer"]),
            int(row["index"]),
            None if pd.isna(pos) else int(pos),
        )

    def select(self, mask: np.ndarray | pd.Series | str) -> Attribution:
        """The result restricted to some nodes: a boolean mask over nodes, or a node kind."""
        if isinstance(mask, str) and self.layout is not None:
            sub, index = self.layout.only(check_kind(mask))
            return self._subset(sub, index)
        if isinstance(mask, str):
            mask = self.nodes["kind"] == check_kind(mask)
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != (len(self),):
            raise ValueError(
                f"select needs a node kind or a boolean mask over the {len(self)} nodes, got "
                f"{mask.dtype} values of shape {mask.shape}"
            )
        return self._subset(self.nodes[mask].reset_index(drop=True), np.flatnonzero(mask))

    def _subset(self, nodes: pd.DataFrame | NodeLayout, index: np.ndarray) -> Attribution:
        return Attribution(
            nodes=nodes,
            scores=self.scores[index],
            per_pair=self.per_pair[:, index],
            mean_effect=None if self.mean_effect is None else self.mean_effect[index],
            method=self.method,
            direction=self.direction,
            metric=self.metric,
            model=self.model,
            cost=self.cost,
            pairs=self.pairs,
            metadata=self.metadata,
        )

    def ranking(self) -> np.ndarray:
        """Node indices by descending score; ties broken by node order (stable)."""
        return np.argsort(-self.scores, kind="stable")

    def to_dataframe(self) -> pd.DataFrame:
        """One row per node: ``kind, layer, index, position, score, mean_effect, rank``."""
        df = self.nodes.copy()
        df["score"] = self.scores
        df["mean_effect"] = np.nan if self.mean_effect is None else self.mean_effect
        df["rank"] = _ranks(self.ranking())
        return df

    def top(self, k: int = 10, kind: str | None = None) -> pd.DataFrame:
        """The ``k`` highest-scoring nodes (optionally of one kind), best first.

        Raises ``ValueError`` for an unknown kind, or one this result has no nodes of."""
        _check_top_k(k)
        if self.layout is not None:
            return self._top_from_layout(int(k), kind)
        df = self.to_dataframe()
        if kind is not None:
            present = list(dict.fromkeys(df["kind"]))
            if check_kind(kind) not in present:
                raise ValueError(
                    f"this {self.method} result has no {kind!r} nodes; its kinds are "
                    f"{', '.join(present)}"
                )
            df = df[df["kind"] == kind]
        return df.sort_values("rank").head(int(k))

    def _top_from_layout(self, k: int, kind: str | None) -> pd.DataFrame:
        """:meth:`top` without building the whole node table: rows for the top ``k`` only."""
        if kind is not None:
            present = list(self.layout.kinds)
            if check_kind(kind) not in present:
                raise ValueError(
                    f"this {self.method} result has no {kind!r} nodes; its kinds are "
                    f"{', '.join(present)}"
                )
        ranking = self.ranking()
        rank = _ranks(ranking)
        candidates = ranking
        if kind is not None:
            _, index = self.layout.only(kind)
            candidates = index[np.argsort(rank[index], kind="stable")]
        chosen = candidates[:k]
        nodes = [self.layout.node(int(i)) for i in chosen]
        return pd.DataFrame(
            {
                "kind": pd.Series([n.kind for n in nodes], dtype=object),
                "layer": np.array([n.layer for n in nodes], dtype=np.int64),
                "index": np.array([n.index for n in nodes], dtype=np.int64),
                "position": pd.array([n.position for n in nodes], dtype="Int64"),
                "score": self.scores[chosen],
                "mean_effect": np.nan if self.mean_effect is None else self.mean_effect[chosen],
                "rank": rank[chosen],
            },
            index=chosen,
        )

    # ---- plots (matplotlib; see atp_nnsight.plots) -------------------------------------------
    def plot_heads(self, kind: str = "head", value: str = "score", **kwargs: Any) -> Any:
        """Layer x head heatmap (a ``Figure``); see :func:`atp_nnsight.plots.head_heatmap`."""
        from atp_nnsight.plots import head_heatmap

        return head_heatmap(self, kind=kind, value=value, **kwargs)

    def plot_positions(
        self, kind: str = "head", tokens: list[str] | None = None, **kwargs: Any
    ) -> Any:
        """Layer x position heatmap; see :func:`atp_nnsight.plots.position_heatmap`."""
        from atp_nnsight.plots import position_heatmap

        return position_heatmap(self, kind=kind, tokens=tokens, **kwargs)

    def plot_scatter(self, exact: Any = None, **kwargs: Any) -> Any:
        """Estimate vs exact effect per node; see :func:`atp_nnsight.plots.scatter_vs_exact`."""
        from atp_nnsight.plots import scatter_vs_exact

        return scatter_vs_exact(self, exact, **kwargs)

    # ---- persistence -------------------------------------------------------------------------
    def to_csv(self, path: str | Path) -> Path:
        """CSV with ``kind,layer,index,position,score,mean_effect`` (position empty if summed).

        Written atomically: a failure leaves any earlier file at ``path`` intact."""
        path = Path(path)
        cols = NODE_COLUMNS + ["score", "mean_effect"]
        with atomic_paths(path) as (tmp,):
            self.to_dataframe()[cols].to_csv(tmp, index=False)
        return path

    def save(self, path: str | Path) -> Path:
        """Save everything (node table, scores, per-pair values, metadata) to one ``.npz``
        (the suffix is set to ``.npz``). Written atomically, like :meth:`to_csv`."""
        meta = _run_meta(self)
        arrays = {"scores": self.scores, "per_pair": self.per_pair}
        if self.layout is not None:  # the node table as its layout: a few numbers per site
            meta["layout"] = _layout_spec(self.layout)
        else:
            arrays["kind"] = self.nodes["kind"].to_numpy(dtype=str)
            arrays["layer"] = self.nodes["layer"].to_numpy(dtype=np.int64)
            arrays["index"] = self.nodes["index"].to_numpy(dtype=np.int64)
            arrays["position"] = self.nodes["position"].to_numpy(dtype=np.float64, na_value=np.nan)
        return _save_npz(path, arrays, meta, self.mean_effect)

    @classmethod
    def load(cls, path: str | Path) -> Attribution:
        """Read a result written by :meth:`save` (an ``.npz`` file)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no saved result at {path}")
        if path.suffix.lower() != ".npz":
            beside = path.with_suffix(".npz")
            hint = f"load {beside} instead" if beside.is_file() else "load the .npz file"
            raise ValueError(
                f"{path} is not a saved Attribution: save() writes .npz files (the CSV holds only "
                f"the node table; read it with pandas.read_csv); {hint}"
            )
        with _open_npz(path, "Attribution") as z:
            missing = [k for k in _SAVED_KEYS if k not in z.files]
            if not missing and "kind" not in z.files and "layout" not in str(z["meta"]):
                missing = list(NODE_COLUMNS)
            if missing:
                raise ValueError(
                    f"{path} is an .npz file but not a saved Attribution (no "
                    f"{', '.join(missing)}); load a file written by Attribution.save"
                )
            return cls._from_arrays(z)

    @classmethod
    def _from_arrays(cls, z: Any) -> Attribution:
        meta = json.loads(str(z["meta"]))
        if "layout" in meta:
            return cls(
                nodes=_layout_from_spec(meta.pop("layout")),
                scores=z["scores"],
                per_pair=z["per_pair"],
                mean_effect=z["mean_effect"] if "mean_effect" in z.files else None,
                **meta,
            )
        pos = z["position"]
        nodes = pd.DataFrame(
            {
                "kind": z["kind"].astype(object),
                "layer": z["layer"],
                "index": z["index"],
                "position": pd.array([None if np.isnan(p) else int(p) for p in pos], dtype="Int64"),
            }
        )
        return cls(
            nodes=nodes,
            scores=z["scores"],
            per_pair=z["per_pair"],
            mean_effect=z["mean_effect"] if "mean_effect" in z.files else None,
            **meta,
        )


_SAVED_KEYS = ("scores", "per_pair", "meta")


def _check_shapes(n: int, scores: np.ndarray, per_pair: np.ndarray, unit: str) -> None:
    """Refuse ``scores`` not of shape ``[n]`` or ``per_pair`` not ``[pairs, n]`` (``n`` units)."""
    if scores.shape != (n,) or per_pair.ndim != 2 or per_pair.shape[1] != n:
        raise ValueError(
            f"inconsistent result: {n} {unit}, scores {scores.shape}, per_pair {per_pair.shape}"
        )


def _ranks(ranking: np.ndarray) -> np.ndarray:
    """Rank of each unit (1 = best) from ``ranking``, the unit indices best first."""
    rank = np.empty(len(ranking), dtype=np.int64)
    rank[ranking] = np.arange(1, len(ranking) + 1)
    return rank


def _check_top_k(k: Any) -> None:
    """Refuse a ``top`` row count that is not an integer ``>= 0`` (bools included)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"top needs a number of rows k >= 0, got {k!r}")


def _run_meta(result: Any) -> dict[str, Any]:
    """The run fields a saved result keeps as JSON (``method`` ... ``metadata``)."""
    return {
        "method": result.method,
        "direction": result.direction,
        "metric": result.metric,
        "model": result.model,
        "cost": result.cost,
        "pairs": result.pairs,
        "metadata": result.metadata,
    }


def _save_npz(
    path: str | Path, arrays: dict[str, Any], meta: dict[str, Any], mean_effect: Any
) -> Path:
    """Write ``arrays``, ``meta`` (as JSON) and ``mean_effect`` (unless None) to one ``.npz``
    (the suffix is set to ``.npz``), atomically; returns the path written."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(".npz")
    arrays = {**arrays, "meta": np.array(json.dumps(meta, default=_json_default))}
    if mean_effect is not None:
        arrays["mean_effect"] = mean_effect
    with atomic_paths(path) as (tmp,):
        np.savez_compressed(tmp, **arrays)
    return path


def _open_npz(path: Path, name: str) -> Any:
    """The ``NpzFile`` at ``path`` (no pickles); ``ValueError`` naming result type ``name``
    when it is unreadable or holds a single array."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        raise ValueError(
            f"{path} is not a readable .npz file (truncated, or another format); write it "
            f"again with {name}.save"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path} holds one array, not a saved {name}; load a file written by {name}.save"
        )
    return archive


def _layout_spec(layout: NodeLayout) -> dict[str, Any]:
    return {
        "kinds": list(layout.kinds),
        "layers": list(layout.layers),
        "seq_len": layout.seq_len,
        "blocks": [[b.kind, b.layer, b.n_units, b.n_positions, b.offset] for b in layout.blocks],
    }


def _layout_from_spec(spec: dict[str, Any]) -> NodeLayout:
    from atp_nnsight.nodes import SiteBlock

    blocks = tuple(
        SiteBlock(k, int(la), int(u), int(p), int(o)) for k, la, u, p, o in spec["blocks"]
    )
    return NodeLayout(tuple(spec["kinds"]), tuple(spec["layers"]), spec["seq_len"], blocks)


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden name in ``path``'s folder that keeps its suffix (``.x.1a2b.tmp.csv``)."""
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")


@contextmanager
def atomic_paths(*paths: str | Path) -> Iterator[list[Path]]:
    """Temporary paths to write ``paths`` to, all published together.

    Yields one temporary sibling per target (same folder, same suffix). When the block
    finishes, each temporary replaces its target (``os.replace``); when it raises, the
    temporaries are deleted and every target is left as it was. Missing folders are created.
    """
    targets = [Path(p) for p in paths]
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
    temps = [temporary_sibling(t) for t in targets]
    try:
        yield temps
        for tmp in temps:
            if not tmp.exists():
                raise FileNotFoundError(f"nothing was written to {tmp}")
    except BaseException:
        for tmp in temps:
            _remove(tmp)
        raise
    for tmp, target in zip(temps, targets, strict=True):
        os.replace(tmp, target)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A temporary sibling folder to fill; on success it replaces folder ``path`` as a whole.

    An earlier folder at ``path`` is removed only once the new one is in place; when the block
    raises, the temporary folder is deleted and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    old = temporary_sibling(target) if target.exists() else None
    if old is not None:
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        _remove(tmp)
        raise
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
