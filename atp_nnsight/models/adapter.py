"""The architecture adapter: the only place that knows module paths and attention details.

Every method asks an :class:`Adapter` for *sites*. Inside an nnsight trace,
:meth:`Adapter.read_layer` returns the raw tensors of one layer in forward order (nnsight 0.8
requires reads in execution order), and :meth:`Adapter.units` views a raw tensor as
``[batch, position, unit, feature]`` so that every node kind is handled the same way:

==========  ===============================================  =================  ==========
kind        raw tensor (where it is read)                     units              feature
==========  ===============================================  =================  ==========
resid       decoder layer input                               1                  d_model
q           query at the attention call (post-rotary)         query heads        head_dim
k, v        key/value at the attention call (post-rotary k)   KV heads           head_dim
head        output-projection input (per-head outputs)        query heads        head_dim
attn_out    attention block output                            1                  d_model
neuron      down-projection input (MLP activation)            d_mlp              1
mlp_out     MLP block output                                  1                  d_model
==========  ===============================================  =================  ==========

Reading q/k/v at the attention-interface call (``attention_interface_1`` in the module's
``.source``) works under eager, sdpa and flash attention alike, and gives the post-rotary
tensors that the softmax recomputation of the QK fix needs, together with the call's own
``scaling``, mask, ``sliding_window`` and ``softcap``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from atp_nnsight.types import NODE_KINDS

ATTENTION_CALL = "attention_interface_1"
"""Name of the attention-function call inside every supported attention ``forward``
(transformers 5.x); ``attention_interface_0`` is the lookup of the function itself."""


@dataclass(frozen=True)
class AttentionCall:
    """What the attention function received for one layer (all tensors ``[B, heads, T, D]``)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    sliding_window: int | None
    softcap: float | None


@dataclass(frozen=True)
class Adapter:
    """Module paths and sizes of one architecture family (see the family modules)."""

    family: str
    layers_path: str
    attn: str
    out_proj: str
    mlp: str
    down_proj: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    d_mlp: int
    parallel_residual: bool = False

    # ---- sizes ---------------------------------------------------------------------------
    def n_units(self, kind: str) -> int:
        """Number of nodes of ``kind`` per layer and position."""
        return {
            "resid": 1,
            "q": self.n_heads,
            "k": self.n_kv_heads,
            "v": self.n_kv_heads,
            "head": self.n_heads,
            "attn_out": 1,
            "neuron": self.d_mlp,
            "mlp_out": 1,
        }[kind]

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    # ---- module access (usable inside and outside traces) --------------------------------
    def layers(self, model: Any) -> Any:
        envoy = model
        for part in self.layers_path.split("."):
            envoy = getattr(envoy, part)
        return envoy

    def layer(self, model: Any, layer: int) -> Any:
        return self.layers(model)[layer]

    # ---- reads inside a trace --------------------------------------------------------------
    def iter_layer(
        self, model: Any, layer: int, kinds: tuple[str, ...], attention: bool = False
    ) -> Iterator[tuple[str, Any]]:
        """Yield ``(kind, raw tensor)`` for ``kinds`` at ``layer`` in forward order (in a trace).

        The model advances to each site only when the next item is requested, so a consumer
        may edit a tensor in place before the forward pass moves on. With ``attention=True``
        an ``("attention", AttentionCall)`` item follows q/k/v.
        """
        block = self.layer(model, layer)
        attn = getattr(block, self.attn)
        mlp = getattr(block, self.mlp)
        if "resid" in kinds:
            yield "resid", block.input
        if attention or any(k in kinds for k in ("q", "k", "v")):
            args, kwargs = getattr(attn.source, ATTENTION_CALL).inputs
            q, k, v = args[1], args[2], args[3]
            for name, t in (("q", q), ("k", k), ("v", v)):
                if name in kinds:
                    yield name, t
            if attention:
                mask = args[4] if len(args) > 4 else kwargs.get("attention_mask")
                yield (
                    "attention",
                    AttentionCall(
                        q=q,
                        k=k,
                        v=v,
                        mask=mask,
                        scaling=float(kwargs.get("scaling") or self.head_dim**-0.5),
                        sliding_window=kwargs.get("sliding_window"),
                        softcap=kwargs.get("softcap"),
                    ),
                )
        if "head" in kinds:
            yield "head", getattr(attn, self.out_proj).input
        if "attn_out" in kinds:
            yield "attn_out", attn.output[0]
        if "neuron" in kinds:
            yield "neuron", getattr(mlp, self.down_proj).input
        if "mlp_out" in kinds:
            yield "mlp_out", mlp.output

    def read_layer(
        self, model: Any, layer: int, kinds: tuple[str, ...], attention: bool = False
    ) -> tuple[dict[str, torch.Tensor], AttentionCall | None]:
        """All of :meth:`iter_layer` at once: ``({kind: raw}, AttentionCall or None)``.

        Only for reading: the forward pass has passed every site when this returns.
        """
        raws = dict(self.iter_layer(model, layer, kinds, attention))
        call = raws.pop("attention", None)
        return raws, call

    def units(self, kind: str, raw: torch.Tensor) -> torch.Tensor:
        """View a raw site tensor as ``[batch, position, unit, feature]`` (no copy)."""
        if kind in ("q", "k", "v"):
            return raw.transpose(1, 2)
        if kind == "head":
            return raw.unflatten(-1, (self.n_heads, self.head_dim))
        if kind == "neuron":
            return raw.unsqueeze(-1)
        return raw.unsqueeze(-2)


def check_kinds(kinds: tuple[str, ...]) -> None:
    unknown = [k for k in kinds if k not in NODE_KINDS]
    if unknown:
        raise ValueError(f"unknown node kind(s) {unknown}; choose from {', '.join(NODE_KINDS)}")
