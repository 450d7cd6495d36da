"""Shared vocabulary: node kinds, nodes, node selections and patch directions.

Conventions (pinned for the whole package):

* A *node* is one component: ``(kind, layer, index, position)``. ``index`` is the head (``head``,
  ``q``), the KV head (``k``, ``v``; under grouped-query attention one KV head feeds every query
  head of its group), the neuron (``neuron``) or 0 (``resid``, ``attn_out``, ``mlp_out``).
  ``position`` counts tokens from the first one, 0-based; ``None`` means the node is the
  component summed over (patched at) all positions.
* Node kinds, in forward order within a layer: ``resid`` (residual stream entering the layer),
  ``q``, ``k``, ``v`` (post-rotary, at the attention call), ``head`` (a head's output before the
  output projection: a slice of the projection's *input*), ``attn_out`` (attention block output),
  ``neuron`` (MLP activation = input of the down projection), ``mlp_out`` (MLP block output).
* Direction ``noising`` (default, the paper's): patch the noise activation into the clean run,
  gradients on the clean run. ``denoising`` swaps the roles of the two prompts. Effects are
  ``metric(patched run) - metric(unpatched run)``, signed.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

NodeKind = Literal["resid", "q", "k", "v", "head", "attn_out", "neuron", "mlp_out"]
Direction = Literal["noising", "denoising"]

NODE_KINDS: tuple[str, ...] = ("resid", "q", "k", "v", "head", "attn_out", "neuron", "mlp_out")
"""Every node kind, in the order the forward pass produces them within one layer."""

ATTENTION_INPUT_KINDS: tuple[str, ...] = ("q", "k", "v")
DIRECTIONS: tuple[str, ...] = ("noising", "denoising")


@dataclass(frozen=True, order=True)
class Node:
    """One component; see the module docstring for the meaning of each field."""

    kind: str
    layer: int
    index: int = 0
    position: int | None = None

    def __str__(self) -> str:
        where = "" if self.position is None else f"@{self.position}"
        unit = {"head": "H", "q": "Q", "k": "K", "v": "V", "neuron": "N"}.get(self.kind)
        body = f"L{self.layer}" + (f".{unit}{self.index}" if unit else "")
        return f"{self.kind} {body}{where}"


def parse_kinds(kinds: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Validate node kinds (comma-separated string or list); return them in forward order."""
    if isinstance(kinds, str):
        items = [k.strip() for k in kinds.split(",")]
    elif isinstance(kinds, (list, tuple)) and all(isinstance(k, str) for k in kinds):
        items = [k.strip() for k in kinds]
    else:
        raise TypeError(
            f"nodes must be node kinds as a string ('head,neuron') or a list of strings, got "
            f"{type(kinds).__name__} {kinds!r}"
        )
    items = [k for k in items if k]
    if not items:
        raise ValueError(f"no node kinds given; choose from {', '.join(NODE_KINDS)}")
    unknown = [k for k in items if k not in NODE_KINDS]
    if unknown:
        raise ValueError(
            f"unknown node kind(s) {', '.join(map(repr, unknown))}{_did_you_mean(unknown[0])}; "
            f"choose from {', '.join(NODE_KINDS)}"
        )
    return tuple(k for k in NODE_KINDS if k in items)


def check_kind(kind: str) -> str:
    """One node kind, validated."""
    if not isinstance(kind, str) or kind not in NODE_KINDS:
        shown = repr(kind) if isinstance(kind, str) else f"{type(kind).__name__} {kind!r}"
        hint = _did_you_mean(kind) if isinstance(kind, str) else ""
        raise ValueError(f"unknown node kind {shown}{hint}; choose from {', '.join(NODE_KINDS)}")
    return kind


def _did_you_mean(kind: str) -> str:
    close = difflib.get_close_matches(kind.lower(), NODE_KINDS, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


LAYER_SPEC_EXAMPLE = "'0-3,29'"


def parse_layers(
    spec: str | int | list[int] | tuple[int, ...] | range | None, n_layers: int
) -> tuple[int, ...]:
    """Layers from ``None`` (all), an int, a list/range of ints, or a string such as
    ``"0-3,29"`` (inclusive ranges); sorted, unique. Floats, reversed ranges (``"5-2"``) and
    layers outside ``0 .. n_layers - 1`` are refused, naming the offending item."""
    if spec is None:
        return tuple(range(n_layers))
    if isinstance(spec, str):
        layers = _parse_layer_string(spec)
    elif _is_layer_int(spec):
        layers = [int(spec)]
    elif isinstance(spec, (list, tuple, range)):
        bad = [x for x in spec if not _is_layer_int(x)]
        if bad:
            raise TypeError(
                f"layers must be integers; {bad[0]!r} ({type(bad[0]).__name__}) is not — give "
                f"whole layer numbers, e.g. [0, 1, 2] or {LAYER_SPEC_EXAMPLE}"
            )
        layers = [int(x) for x in spec]
    else:
        raise TypeError(
            f"layers must be None (all), an int, a list of ints or a string such as "
            f"{LAYER_SPEC_EXAMPLE}; got {type(spec).__name__} {spec!r}"
        )
    if not layers:
        raise ValueError(
            f"no layers selected by {spec!r}; give e.g. {LAYER_SPEC_EXAMPLE}, or omit layers "
            "for all"
        )
    bad = sorted({x for x in layers if not 0 <= x < n_layers})
    if bad:
        raise ValueError(
            f"layer(s) {', '.join(map(str, bad))} out of range: the model has layers "
            f"0-{n_layers - 1}"
        )
    return tuple(sorted(set(layers)))


def _is_layer_int(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    kind = getattr(getattr(value, "dtype", None), "kind", None)  # numpy integer scalars
    return kind in ("i", "u") and getattr(value, "ndim", 1) == 0


def _parse_layer_string(spec: str) -> list[int]:
    layers: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        ends = [lo.strip(), hi.strip()] if dash else [lo.strip()]
        if not all(e.isdigit() for e in ends):
            raise ValueError(
                f"bad layer item {part!r} in {spec!r}: use whole layer numbers and inclusive "
                f"ranges, e.g. {LAYER_SPEC_EXAMPLE}"
            )
        first, last = int(ends[0]), int(ends[-1])
        if first > last:
            raise ValueError(
                f"reversed layer range {part!r} in {spec!r}: write it as '{last}-{first}'"
            )
        layers.extend(range(first, last + 1))
    return layers


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; use 'noising' or 'denoising'")
    return direction
