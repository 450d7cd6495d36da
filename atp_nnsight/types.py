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
    items = [k.strip() for k in kinds.split(",")] if isinstance(kinds, str) else list(kinds)
    items = [k for k in items if k]
    if not items:
        raise ValueError(f"no node kinds given; choose from {', '.join(NODE_KINDS)}")
    unknown = [k for k in items if k not in NODE_KINDS]
    if unknown:
        raise ValueError(
            f"unknown node kind(s) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(NODE_KINDS)}"
        )
    return tuple(k for k in NODE_KINDS if k in items)


def parse_layers(spec: str | list[int] | tuple[int, ...] | None, n_layers: int) -> tuple[int, ...]:
    """Layers from ``None`` (all), a list, or a string such as ``"0-3,29"``; sorted, unique."""
    if spec is None:
        return tuple(range(n_layers))
    if isinstance(spec, str):
        out: list[int] = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            try:
                if "-" in part:
                    lo, hi = (int(x) for x in part.split("-", 1))
                    out.extend(range(lo, hi + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise ValueError(f"bad layer range {part!r}; use e.g. '0-3,29'") from None
        layers = out
    else:
        layers = [int(x) for x in spec]
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: the model has layers 0-{n_layers - 1}")
    if not layers:
        raise ValueError("no layers selected")
    return tuple(sorted(set(layers)))


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; use 'noising' or 'denoising'")
    return direction
