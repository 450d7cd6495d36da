"""The architecture adapter: the only place that knows module paths and attention details.

Every method asks an :class:`Adapter` for *sites*. Inside an nnsight trace,
:meth:`Adapter.read_layer` returns the raw tensors of one layer in forward order (nnsight 0.8
requires reads in execution order), and :meth:`Adapter.units` views a raw tensor as
``[batch, position, unit, feature]`` so that every node kind is handled the same way:

==========  ===============================================  =================  ==========
kind        raw tensor (where it is read)                     units              feature
==========  ===============================================  =================  ==========
resid       decoder layer input                               1                  d_model
q           query at the attention call (post-norm, rotary)   query heads        head_dim
k, v        key/value at the attention call (post-rotary k)   KV heads           head_dim
head        output-projection input (per-head outputs)        query heads        head_dim
attn_out    the attention's residual write                    1                  d_model
neuron      down-projection input (MLP activation)            d_mlp              1
mlp_out     the MLP's residual write                          1                  d_model
==========  ===============================================  =================  ==========

``attn_out`` and ``mlp_out`` are what is actually added to the residual stream: the attention
(MLP) module's output, or, in families with norms *after* the block (Gemma 2/3's sandwich
norms, OLMo 2/3's post-norms), that norm's output (``attn_write`` / ``mlp_write``). So a
layer's output is always its input plus ``attn_out`` plus ``mlp_out``, sequential or parallel.
Families may refuse node kinds they cannot read as a plain ``[batch, position, ...]`` tensor
(``unsupported``: mixture-of-experts models refuse ``neuron``), with a message saying why.

q/k/v are read at the *attention call*: the call inside the attention module's ``forward``
that receives the query, key and value states (transformers 5.x: ``attention_interface(self,
query_states, key_states, value_states, attention_mask, scaling=..., ...)``). It is found by
what it is, from the forward's source (:func:`find_attention_call`), not by a numbered
nnsight name, because those names change with nnsight and transformers versions. Reading it
works under eager, sdpa and flash attention alike and gives the post-rotary tensors the
softmax recomputation of the QK fix needs, with the call's own ``scaling``, mask,
``sliding_window`` and ``softcap``.

Everything here runs on the NDIF server too, so it is plain, source-backed Python (no
dataclasses, no imports beyond torch): the attention call is described by a plain ``dict``.
"""

from __future__ import annotations

from typing import Any

import torch

ATTENTION_ARGS = (("query", "q"), ("key", "k"), ("value", "v"))
"""How the attention call's first three tensor arguments are recognised: an argument name
containing the long form, or equal to the short form."""


class AttentionCallNotFound(RuntimeError):
    """The attention module's forward has no recognisable attention call."""


def _call_arguments(text: str, start: int) -> list[str] | None:
    """Top-level comma-separated arguments of the call whose ``(`` is at ``text[start]``."""
    depth, args, current = 0, [], ""
    for ch in text[start:]:
        if ch in "([{":
            depth += 1
            if depth == 1:
                continue
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                args.append(current.strip())
                return [a for a in args if a]
        if depth == 1 and ch == ",":
            args.append(current.strip())
            current = ""
        elif depth >= 1:
            current += ch
    return None


def _qkv_offset(args: list[str]) -> int | None:
    """Index of the query among positional ``args`` if they pass query, key and value states
    consecutively (e.g. 1 for ``attention_interface(self, query, key, value, mask)``)."""
    positional = [a.strip().lower() for a in args if "=" not in a.split("(")[0]]
    for offset in range(len(positional) - len(ATTENTION_ARGS) + 1):
        window = positional[offset : offset + len(ATTENTION_ARGS)]
        if all(
            long in arg or arg == short
            for arg, (long, short) in zip(window, ATTENTION_ARGS, strict=True)
        ):
            return offset
    return None


def attention_call_candidates(source: Any) -> list[tuple[str, int]]:
    """``(op name, query argument index)`` of the calls receiving q, k, v in an attention
    module's ``.source``.

    Pure string work on the forward's source (``source.compiled``): for each op, the text of
    its statement from the op's line on, the call named like the op (``self._attn`` for
    ``self__attn_0``), and whether its positional arguments are query, key and value states.
    """
    compiled = source.compiled
    lines = compiled.source.split("\n")
    found = []
    for name in source.names:
        base = name.rsplit("_", 1)[0]
        first = compiled.lines[name] - 1
        statement = "\n".join(lines[first : first + 40]).replace(".", "_")
        own_line = len(lines[first])  # the call must start on the op's own line
        at = statement.find(base + "(")
        while 0 <= at < own_line:
            before = statement[at - 1] if at > 0 else " "
            if not (before.isalnum() or before == "_"):
                args = _call_arguments(statement, at + len(base))
                offset = None if args is None else _qkv_offset(args)
                if offset is not None:
                    found.append((name, offset))
                break
            at = statement.find(base + "(", at + 1)
    return found


def find_attention_call(source: Any, prefer: str | None, where: str) -> tuple[str, int]:
    """``(op name, query argument index)`` of the attention call in a module's ``.source``.

    ``prefer``: the callee (as nnsight names it, without the occurrence suffix) to choose when
    the forward has several calls receiving q, k, v (GPT-2's upcast-and-reorder branch).
    ``where`` names the model class and versions for the error message.
    """
    candidates = attention_call_candidates(source)
    if prefer is not None:
        preferred = [c for c in candidates if c[0].rsplit("_", 1)[0] == prefer]
        candidates = preferred or candidates
    if len(candidates) == 1:
        return candidates[0]
    names = ", ".join(name for name, _ in candidates)
    what = "no call" if not candidates else f"several calls ({names})"
    raise AttentionCallNotFound(
        f"{where}: found {what} receiving query, key and value states in the attention "
        "forward (looked for one call whose consecutive positional arguments are named like "
        "query/q, key/k, value/v, as transformers' attention_interface(self, query_states, "
        "key_states, value_states, attention_mask, scaling=...)), so q/k/v nodes and the QK "
        "fix cannot be read; this model's attention code is not supported by this version of "
        "atp_nnsight (report it with the versions above)"
    )


def separate_projections(head_dim: int, kinds: str = "qkv") -> dict[str, tuple[str, int, int]]:
    """``projections`` of separate ``q_proj``/``k_proj``/``v_proj`` modules (one head after
    the other along each output)."""
    return {kind: (kind + "_proj", 0, head_dim) for kind in kinds}


class Adapter:
    """Module paths and sizes of one architecture family (see the family modules).

    Paths are attribute paths: ``layers_path`` from the model, ``attn``/``mlp`` from a decoder
    layer, ``out_proj`` from ``attn``, ``down_proj`` from ``mlp``. ``attn_write`` /
    ``mlp_write``: the layer's post-norm whose output is the attention's / MLP's residual
    write (None: the attention module's ``output[0]`` / the MLP's output). ``unsupported``:
    node kind → why this family refuses it.
    ``attention_call``: the nnsight op name of the attention call found on the client's
    model (re-checked, and re-found if needed, against the model actually traced, e.g. on
    the server); ``attention_prefer`` disambiguates when several calls receive q, k, v.
    ``where``: model class and library versions, for error messages.
    ``projections``: q/k/v kind → ``(module, start, stride)``: the projection under ``attn``
    whose output holds unit ``u``'s features in columns ``start + u * stride + [0, head_dim)``,
    given only for kinds whose path from that output to the attention call stays within each
    head (per-head norms, rotary and elementwise clamps do; a norm over all heads does not).
    Edge methods use it to push each head's gradient through its
    own rows of the projection (:func:`atp_nnsight.edges.sites.copy_grads`).
    """

    def __init__(
        self,
        *,
        family: str,
        layers_path: str,
        attn: str,
        out_proj: str,
        mlp: str,
        down_proj: str,
        n_layers: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        d_model: int,
        d_mlp: int,
        parallel_residual: bool = False,
        attn_write: str | None = None,
        mlp_write: str | None = None,
        unsupported: dict[str, str] | None = None,
        attention_prefer: str | None = None,
        projections: dict[str, tuple[str, int, int]] | None = None,
        where: str = "",
    ) -> None:
        self.family = family
        self.layers_path = layers_path
        self.attn = attn
        self.out_proj = out_proj
        self.mlp = mlp
        self.down_proj = down_proj
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.d_model = d_model
        self.d_mlp = d_mlp
        self.parallel_residual = parallel_residual
        self.attn_write = attn_write
        self.mlp_write = mlp_write
        self.unsupported = dict(unsupported or {})
        self.attention_prefer = attention_prefer
        self.projections = dict(projections or {})
        self.where = where or family
        self.attention_call: tuple[str, int] | None = None

    def __repr__(self) -> str:
        return (
            f"Adapter({self.family}: {self.n_layers} layers, {self.n_heads} heads "
            f"({self.n_kv_heads} KV) × {self.head_dim}, d_model {self.d_model}, "
            f"d_mlp {self.d_mlp})"
        )

    # ---- sizes ---------------------------------------------------------------------------
    def n_units(self, kind: str) -> int:
        """Number of nodes of ``kind`` per layer and position (raises for refused kinds)."""
        sizes = {
            "resid": 1,
            "q": self.n_heads,
            "k": self.n_kv_heads,
            "v": self.n_kv_heads,
            "head": self.n_heads,
            "attn_out": 1,
            "neuron": self.d_mlp,
            "mlp_out": 1,
        }
        if kind in self.unsupported:
            supported = [k for k in sizes if k not in self.unsupported]
            raise ValueError(
                f"{self.family}: {kind!r} nodes are not supported ({self.unsupported[kind]}); "
                f"supported node kinds for this model: {', '.join(supported)}"
            )
        return sizes[kind]

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

    def attention_source_op(self, model: Any, layer: int) -> Any:
        """The nnsight source op of ``layer``'s attention call (found once, then checked)."""
        attn = getattr(self.layer(model, layer), self.attn)
        source = attn.source
        if self.attention_call is None or self.attention_call[0] not in source.names:
            where = f"{self.where}, attention module {type(attn._module).__name__}"
            self.attention_call = find_attention_call(source, self.attention_prefer, where)
        return getattr(source, self.attention_call[0])

    # ---- reads inside a trace --------------------------------------------------------------
    def iter_layer(self, model: Any, layer: int, kinds: tuple[str, ...], attention: bool = False):
        """Yield ``(kind, raw tensor)`` for ``kinds`` at ``layer`` in forward order (in a trace).

        The model advances to each site only when the next item is requested, so a consumer
        may edit a tensor in place before the forward pass moves on. With ``attention=True``
        an ``("attention", call)`` item follows q/k/v, where ``call`` is a dict with ``q``,
        ``k``, ``v`` (``[B, heads, T, D]``), ``mask``, ``scaling``, ``sliding_window`` and
        ``softcap`` as the attention function received them.
        """
        block = self.layer(model, layer)
        attn = getattr(block, self.attn)
        mlp = getattr(block, self.mlp)
        if "resid" in kinds:
            yield "resid", block.input
        if attention or "q" in kinds or "k" in kinds or "v" in kinds:
            args, kwargs = self.attention_source_op(model, layer).inputs
            first = self.attention_call[1]
            q, k, v = args[first], args[first + 1], args[first + 2]
            for name, t in (("q", q), ("k", k), ("v", v)):
                if name in kinds:
                    yield name, t
            if attention:
                mask = args[first + 3] if len(args) > first + 3 else kwargs.get("attention_mask")
                scaling = kwargs.get("scaling")
                yield (
                    "attention",
                    {
                        "q": q,
                        "k": k,
                        "v": v,
                        "mask": mask,
                        "scaling": float(scaling) if scaling else self.head_dim**-0.5,
                        "sliding_window": kwargs.get("sliding_window"),
                        "softcap": kwargs.get("softcap"),
                    },
                )
        if "head" in kinds:
            yield "head", getattr(attn, self.out_proj).input
        if "attn_out" in kinds:
            if self.attn_write is None:
                yield "attn_out", attn.output[0]
            else:
                yield "attn_out", getattr(block, self.attn_write).output
        if "neuron" in kinds:
            yield "neuron", getattr(mlp, self.down_proj).input
        if "mlp_out" in kinds:
            if self.mlp_write is None:
                yield "mlp_out", mlp.output
            else:
                yield "mlp_out", getattr(block, self.mlp_write).output

    def read_layer(
        self, model: Any, layer: int, kinds: tuple[str, ...], attention: bool = False
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """All of :meth:`iter_layer` at once: ``({kind: raw}, attention call dict or None)``.

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
