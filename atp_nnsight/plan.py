"""Size a run before it starts: nodes, passes, peak memory per chunk, NDIF requests, time.

:func:`plan` needs a model *config* only (no weights): a loaded model, a transformers config,
a local directory, a hub id, or one of the configs shipped with the package
(:data:`SHIPPED_CONFIGS`: the bundled SmolLM2 and Llama-3.1 8B/70B/405B), so it works offline
on them. Nothing is computed on real tensors.

Memory model of one chunk of ``B`` pairs of ``T`` tokens (bytes; AtP-family methods):

* ``graph``: what autograd saves in the base forward with gradients from the first layer's
  input (frozen weights), measured by running the model on the meta device under
  ``saved_tensors_hooks`` (fused attention counted as flash attention saves it: q, k, v, the
  output and the log-sum-exp; eager attention saves its probabilities);
* ``logits``: the base run's last-position logits ``B·V`` (built-in metrics), held until the
  backward starts, and their gradient, which the backward through the unembedding materialises;
* ``source``: what the engine keeps of the source run until the backward reaches its layer:
  a clone (model dtype) of sites autograd saves anyway (resid, q, k, v), the float32
  difference ``source - base`` of the others;
* ``backward``: autograd's gradient buffers while it steps through one layer (about one
  layer's saved activations, measured);
* ``transient``: one layer's site gradients for one backward and their float32 products
  (the largest selected kind), one residual-sized gradient per live GradDrop stream at the
  top, and the QK fix's attention temporaries (bounded by ``qk_chunk_bytes``).

The peak is their sum: it is reached when the backward starts, before any layer is freed.
Weights are counted separately (locally they are resident; on NDIF they are the server's).
Only the AtP family is planned (exact patching sizes its own row batches from ``memory_gb``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nnsight
import torch

from atp_nnsight.nodes import NodeLayout
from atp_nnsight.types import parse_kinds

CONFIG_DIR = Path(__file__).parent / "configs"
SHIPPED_CONFIGS: dict[str, str] = {
    "SmolLM2-135M-Instruct": "SmolLM2-135M-Instruct.json",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "SmolLM2-135M-Instruct.json",
    "meta-llama/Llama-3.1-8B": "Llama-3.1-8B.json",
    "meta-llama/Llama-3.1-8B-Instruct": "Llama-3.1-8B.json",
    "meta-llama/Llama-3.1-70B": "Llama-3.1-70B.json",
    "meta-llama/Llama-3.1-70B-Instruct": "Llama-3.1-70B.json",
    "meta-llama/Llama-3.3-70B-Instruct": "Llama-3.1-70B.json",
    "meta-llama/Llama-3.1-405B": "Llama-3.1-405B.json",
    "meta-llama/Llama-3.1-405B-Instruct": "Llama-3.1-405B.json",
}
"""Model ids whose config ships with the package (config JSON only, no weights)."""

NDIF_ACTIVATION_BUDGET = (0.15, 500 * 2**20)
"""NDIF caps a job's GPU memory near ``weights × 1.15 + 500 MB`` (nnsight's design notes), so
the activation budget of a remote chunk is ``0.15 × weights + 500 MB``."""

AVAILABLE_FRACTION = 0.8
"""Share of the free memory a chunk may use when no ``max_memory`` is given."""

FORWARD_EQUIVALENTS = {"atp": 4, "atp+qk": 4}
"""Forward-pass equivalents per pair (backward = 2) of methods without GradDrop."""


# ---- configs -------------------------------------------------------------------------------
def resolve_config(model: Any) -> Any:
    """A transformers config from a model, a config, a shipped id, a local dir or a hub id."""
    import transformers

    if isinstance(model, transformers.PretrainedConfig):
        return model
    module = getattr(model, "_module", None)
    if module is not None and hasattr(module, "config"):
        return module.config
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        return model.config
    name = "SmolLM2-135M-Instruct" if model is None else model
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(
            f"plan needs a model, a transformers config or a model id/path, got "
            f"{type(model).__name__}"
        )
    name = str(name)
    if name in SHIPPED_CONFIGS:
        data = json.loads((CONFIG_DIR / SHIPPED_CONFIGS[name]).read_text())
        return transformers.AutoConfig.for_model(**data)
    from atp_nnsight.models.loading import _load_config

    return _load_config(os.path.expanduser(name))


def _dtype_of(config: Any, dtype: Any) -> torch.dtype:
    from atp_nnsight.models.loading import resolve_dtype

    if dtype is not None:
        return resolve_dtype(dtype)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, torch.dtype):
        return stored
    return resolve_dtype(stored) if isinstance(stored, str) else torch.float32


# ---- meta-device measurement of autograd's saved activations -------------------------------
class _FlashAccounting:
    """Replace fused attention during a meta forward by a stand-in that saves what flash
    attention saves (q, k, v, output, log-sum-exp), instead of the math path's probabilities
    that the meta device would otherwise dispatch to."""

    def __enter__(self) -> _FlashAccounting:
        import torch.nn.functional as F

        self.original = F.scaled_dot_product_attention

        class Flash(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
                out = q.new_empty(q.shape[:-1] + v.shape[-1:])
                lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
                ctx.save_for_backward(q, k, v, out, lse)
                return out

        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any):
            return Flash.apply(q, k, v)

        F.scaled_dot_product_attention = sdpa
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch.nn.functional as F

        F.scaled_dot_product_attention = self.original


def _with_layers(config: Any, n_layers: int) -> Any:
    """A copy of ``config`` with ``n_layers`` decoder layers (per-layer lists truncated)."""
    import copy

    config = copy.deepcopy(config)
    text = config.get_text_config()
    text.num_hidden_layers = n_layers
    for name in ("layer_types", "mlp_only_layers"):
        value = getattr(text, name, None)
        if isinstance(value, list):
            setattr(text, name, value[:n_layers])
    return config


def _meta_model(config: Any, dtype: torch.dtype) -> Any:
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.requires_grad_(False)


def _probe(config: Any, n_layers: int, seq_len: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(saved activation bytes of one prompt, weight bytes)`` of ``config`` cut to
    ``n_layers`` layers, on the meta device (no memory, no compute)."""
    from atp_nnsight.models import adapter_for_config

    config = _with_layers(config, n_layers)
    adapter = adapter_for_config(config)
    model = _meta_model(config, dtype)
    storages = {t.untyped_storage()._cdata: t for t in [*model.parameters(), *model.buffers()]}
    params = {p.untyped_storage()._cdata: p.untyped_storage().nbytes() for p in model.parameters()}
    weights = sum(params.values())
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in storages:
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    def start_graph(module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden.requires_grad_(True)

    handle = adapter.layer(model, 0).register_forward_pre_hook(start_graph, with_kwargs=True)
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    mask = torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device="meta")
    try:
        with _FlashAccounting(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    return sum(saved.values()), weights


_PROBES: dict[tuple, tuple[int, int, int, int]] = {}


def layer_profile(config: Any, seq_len: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(saved bytes outside the layers, saved bytes per layer, weight bytes outside the
    layers, weight bytes per layer)`` for one prompt of ``seq_len`` tokens, from meta models of
    one and two layers (cached per config, length and dtype)."""
    key = (config.to_json_string(), seq_len, dtype)
    if key not in _PROBES:
        try:
            saved1, weights1 = _probe(config, 1, seq_len, dtype)
            saved2, weights2 = _probe(config, 2, seq_len, dtype)
        except Exception:  # an architecture the meta device cannot run (e.g. grouped MoE)
            _PROBES[key] = _analytic_profile(config, seq_len, dtype)
        else:
            per_saved, per_weights = saved2 - saved1, weights2 - weights1
            _PROBES[key] = (saved1 - per_saved, per_saved, weights1 - per_weights, per_weights)
    return _PROBES[key]


def _analytic_profile(config: Any, seq_len: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """:func:`layer_profile` from sizes alone, for models the meta device cannot run: a
    pre-norm layer saves about 4 residual-sized tensors, q/k/v and the attention output, 4
    MLP-width tensors (gated MLP), and, under eager attention, the probabilities."""
    from atp_nnsight.models import adapter_for_config

    adapter = adapter_for_config(config)
    size = torch.empty((), dtype=dtype).element_size()
    text = config.get_text_config()
    d, mlp = adapter.d_model, adapter.d_mlp
    attn = (2 * adapter.n_heads + 2 * adapter.n_kv_heads) * adapter.head_dim
    per_token = 4 * d + attn + 4 * mlp
    eager = getattr(text, "_attn_implementation", None) == "eager"
    probs = adapter.n_heads * seq_len if eager else 2 * adapter.n_heads
    per_layer = seq_len * (per_token * size + probs * 4)
    vocab = text.vocab_size
    layer_weights = (4 * d * adapter.n_heads * adapter.head_dim + 3 * d * mlp) * size
    return 2 * seq_len * d * size, per_layer, 2 * vocab * d * size, layer_weights


def saved_activation_bytes(config: Any, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes autograd saves for one prompt of ``seq_len`` tokens in a forward with gradients
    from the first layer's input, weights frozen (see :func:`layer_profile`)."""
    fixed, per_layer, _, _ = layer_profile(config, seq_len, dtype)
    return fixed + per_layer * config.get_text_config().num_hidden_layers


def weights_bytes(config: Any, dtype: torch.dtype) -> int:
    """Bytes of the model's weights in ``dtype`` (tied weights counted once)."""
    _, _, fixed, per_layer = layer_profile(config, 1, dtype)
    return fixed + per_layer * config.get_text_config().num_hidden_layers


# ---- the plan ------------------------------------------------------------------------------
@dataclass
class Plan:
    """What a run will cost; ``memory`` holds per-chunk bytes by component (see module doc)."""

    model: str
    method: str
    n_nodes: int
    n_pairs: int
    seq_len: int
    pairs_per_chunk: int
    n_chunks: int
    forwards_per_pair: float
    backwards_per_pair: float
    memory: dict[str, int]
    weights_bytes: int
    budget_bytes: int | None
    remote: bool
    request_bytes: int | None = None
    result_bytes: int | None = None
    seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        """Peak activation memory of one chunk (weights excluded)."""
        return sum(self.memory.values())

    @property
    def cost(self) -> float:
        """Forward-pass equivalents for all pairs (backward = 2)."""
        return self.n_pairs * (self.forwards_per_pair + 2 * self.backwards_per_pair)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["peak_bytes"] = self.peak_bytes
        out["cost"] = self.cost
        return out

    def __str__(self) -> str:
        gib = 2**30
        lines = [
            f"plan: {self.method} on {self.model}, {self.n_pairs} pairs × {self.seq_len} tokens, "
            f"{self.n_nodes:,} nodes",
            f"  passes per pair: {self.forwards_per_pair:g} forward + {self.backwards_per_pair:g} "
            f"backward = {self.cost / max(1, self.n_pairs):g} forward equivalents "
            f"(total {self.cost:,.0f})",
            f"  chunks: {self.n_chunks} of ≤ {self.pairs_per_chunk} pairs",
            f"  peak memory per chunk: {self.peak_bytes / gib:.2f} GiB activations"
            + (f" + {self.weights_bytes / gib:.2f} GiB weights" if not self.remote else "")
            + (f" (budget {self.budget_bytes / gib:.2f} GiB)" if self.budget_bytes else ""),
            "    " + ", ".join(f"{k} {v / gib:.2f}" for k, v in self.memory.items() if v) + " GiB",
        ]
        if self.remote:
            sent = "?" if self.request_bytes is None else f"{self.request_bytes / 1024:,.0f} KiB"
            back = "?" if self.result_bytes is None else f"{self.result_bytes / 1024:,.0f} KiB"
            lines.append(
                f"  NDIF: {self.n_chunks} request(s), ~{sent} sent and ≤ {back} returned each"
            )
        if self.seconds is not None:
            lines.append(f"  estimated wall time: {_duration(self.seconds)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _site_bytes(adapter: Any, kinds: tuple[str, ...], layers: Any, n_pos: int) -> int:
    """Elements of the selected sites for one prompt of ``n_pos`` positions."""
    feature = {"q": adapter.head_dim, "k": adapter.head_dim, "v": adapter.head_dim}
    feature.update(head=adapter.head_dim, neuron=1, resid=adapter.d_model)
    feature.update(attn_out=adapter.d_model, mlp_out=adapter.d_model)
    return sum(adapter.n_units(k) * feature[k] for k in kinds) * len(layers) * n_pos


def _largest_site(adapter: Any, kinds: tuple[str, ...], n_pos: int) -> int:
    """Elements of the largest selected site of one layer for one prompt."""
    return max(_site_bytes(adapter, (k,), (0,), n_pos) for k in kinds)


def atp_memory(
    config: Any,
    adapter: Any,
    layout: NodeLayout,
    *,
    method: str,
    batch: int,
    seq_len: int,
    dtype: torch.dtype,
    qk_chunk_bytes: int | None = None,
    saved: tuple[int, int] | None = None,
) -> dict[str, int]:
    """Peak activation bytes of one AtP-family chunk by component (see the module doc)."""
    from atp_nnsight.methods.atp import METHODS
    from atp_nnsight.methods.qk_fix import QK_TEMPORARIES, default_chunk_bytes

    qk, graddrop = METHODS[method]
    size = torch.empty((), dtype=dtype).element_size()
    if saved is None:
        saved = layer_profile(config, seq_len, dtype)[:2]
    fixed, per_layer = saved
    n_layers = config.get_text_config().num_hidden_layers
    vocab = config.get_text_config().vocab_size
    from atp_nnsight.methods.atp import HELD_BY_AUTOGRAD

    kinds = layout.kinds
    n_pos = seq_len
    held = tuple(k for k in kinds if k in HELD_BY_AUTOGRAD or (qk and k in ("q", "k")))
    formed = tuple(k for k in kinds if k not in held)  # float32 differences
    source = _site_bytes(adapter, held, layout.layers, n_pos) * size if held else 0
    source += _site_bytes(adapter, formed, layout.layers, n_pos) * 4 if formed else 0
    largest = _largest_site(adapter, kinds, seq_len)
    streams = adapter.d_model * seq_len * size * (2 if graddrop else 1)
    qk_temp = 0
    if qk and {"q", "k"} & set(kinds):
        kind = "key_per_position" if "k" in kinds and layout.per_position else "other"
        full = QK_TEMPORARIES[kind] * batch * adapter.n_heads * seq_len * seq_len * 4
        width = adapter.n_heads * adapter.head_dim
        bound = qk_chunk_bytes or default_chunk_bytes(batch, seq_len, width)
        qk_temp = min(full, bound)
    return {
        "graph": batch * (fixed + n_layers * per_layer),
        "backward": batch * per_layer,
        "logits": 2 * batch * vocab * size,  # last position only (built-in metrics)
        "source": batch * source,
        "transient": batch * (largest * (size + 3 * 4) + streams) + qk_temp,
    }


def available_memory(device: str = "cpu") -> int:
    """Free memory of ``device`` in bytes (CUDA: ``mem_get_info``; CPU: ``MemAvailable``)."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _memory_model(
    config: Any,
    adapter: Any,
    layout: NodeLayout,
    method: str,
    seq_len: int,
    dtype: torch.dtype,
    qk_chunk_bytes: int | None,
    saved: tuple[int, int],
) -> Any:
    """``batch -> atp_memory(...)`` for one model, layout, method and prompt length."""
    return lambda batch: atp_memory(
        config,
        adapter,
        layout,
        method=method,
        batch=batch,
        seq_len=seq_len,
        dtype=dtype,
        qk_chunk_bytes=qk_chunk_bytes,
        saved=saved,
    )


class MemoryBudgetError(ValueError):
    """Not even one pair fits the memory budget."""


def pairs_per_chunk_for(
    budget: int, memory_of: Any, n_pairs: int, what: str
) -> tuple[int, dict[str, int]]:
    """The largest chunk (≤ ``n_pairs``) whose peak ``memory_of(batch)`` fits ``budget``."""
    one = memory_of(1)
    if sum(one.values()) > budget:
        parts = ", ".join(f"{k} {v / 2**20:,.0f} MiB" for k, v in one.items() if v)
        raise MemoryBudgetError(
            f"{what}: one pair needs about {sum(one.values()) / 2**20:,.0f} MiB ({parts}) but the "
            f"memory budget is {budget / 2**20:,.0f} MiB; use fewer node kinds or layers, "
            "shorter prompts, a larger max_memory, or a device with more memory"
        )
    per_pair = max(1, sum(memory_of(2).values()) - sum(one.values()))
    fixed = sum(one.values()) - per_pair
    batch = int(min(n_pairs, max(1, (budget - fixed) // per_pair)))
    while batch > 1 and sum(memory_of(batch).values()) > budget:
        batch -= 1
    return batch, memory_of(batch)


def chunk_budget(model: Any, remote: Any, max_memory: int | float | None) -> int:
    """Activation budget (bytes) of one chunk: ``max_memory`` if given; on NDIF
    (``remote=True``) its per-job cap above the weights; else 80 % of the free memory of the
    device(s) holding the model."""
    if max_memory is not None:
        if max_memory <= 0:
            raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory}")
        return int(max_memory)
    if remote is True:
        config = resolve_config(model)
        fraction, extra = NDIF_ACTIVATION_BUDGET
        return int(fraction * weights_bytes(config, _dtype_of(config, None)) + extra)
    module = getattr(model, "_module", model)
    devices = (
        {p.device for p in module.parameters()} if isinstance(module, torch.nn.Module) else set()
    )
    cuda = sorted(str(d) for d in devices if d.type == "cuda")
    free = sum(available_memory(d) for d in cuda) if cuda else available_memory()
    return int(AVAILABLE_FRACTION * free)


def atp_pairs_per_chunk(
    model: Any,
    layout: NodeLayout,
    *,
    method: str,
    n_pairs: int,
    seq_len: int,
    budget: int,
    qk_chunk_bytes: int | None = None,
) -> int:
    """The most pairs per chunk whose predicted peak fits ``budget`` (see :func:`atp_memory`)."""
    from atp_nnsight.models import get_adapter

    config = resolve_config(model)
    adapter = get_adapter(model)
    module = getattr(model, "_module", None)
    dtype = next(module.parameters()).dtype if module is not None else _dtype_of(config, None)
    cache = getattr(model, "_atp_saved_bytes", None)
    if cache is None:  # per model wrapper, like its adapter: no config hashing per call
        cache = {}
        object.__setattr__(model, "_atp_saved_bytes", cache)
    if (seq_len, dtype) not in cache:
        cache[(seq_len, dtype)] = layer_profile(config, seq_len, dtype)[:2]
    memory_of = _memory_model(
        config, adapter, layout, method, seq_len, dtype, qk_chunk_bytes, cache[(seq_len, dtype)]
    )

    name = str(getattr(config, "_name_or_path", "") or config.model_type)
    return pairs_per_chunk_for(budget, memory_of, n_pairs, f"{method} on {name}")[0]


def plan(
    model: Any = None,
    *,
    pairs: Any = None,
    seq_len: int | None = None,
    n_pairs: int | None = None,
    nodes: str | list[str] = "head",
    method: str = "atp*",
    layers: Any = None,
    per_position: bool = False,
    remote: bool = False,
    pairs_per_chunk: int | None = None,
    max_memory: int | float | None = None,
    dtype: Any = None,
    qk_chunk_bytes: int | None = None,
    throughput: float | None = None,
    measure_request: bool = True,
) -> Plan:
    """Plan an :func:`~atp_nnsight.attribute` run without running it.

    Args:
        model: a loaded model, a transformers config, a model id or a local directory
            (default: the bundled SmolLM2); only its config is read.
        pairs / seq_len, n_pairs: the pairs (any form ``load_pairs`` accepts; needs a loaded
            model for the tokenizer) or their token length and count.
        nodes, method, layers, per_position, remote, pairs_per_chunk: as in ``attribute``.
        max_memory: activation budget per chunk in bytes (default: NDIF's cap for remote runs,
            else 80 % of the free memory); sizes the chunk when ``pairs_per_chunk`` is None.
        dtype: model dtype (default: the config's, float32 for the bundled model).
        throughput: forward tokens per second of this model on the target hardware, for the
            time estimate (prompt tokens through one forward pass).
        measure_request: serialize one chunk's NDIF request on a meta model to measure its
            size (remote plans only).
    """
    from atp_nnsight.methods.atp import METHODS
    from atp_nnsight.models import adapter_for_config

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    config = resolve_config(model)
    adapter = adapter_for_config(config)
    parse_kinds(nodes)
    torch_dtype = _dtype_of(config, dtype)
    if pairs is not None:
        from atp_nnsight.methods.common import prepare_pairs

        if getattr(model, "tokenizer", None) is None:
            raise ValueError("plan(pairs=...) needs a loaded model (for its tokenizer)")
        tok = prepare_pairs(model, pairs)
        lengths = sorted(set(tok.lengths))
        seq_len, n_pairs = max(lengths), len(tok)
    if seq_len is None or n_pairs is None:
        raise ValueError("plan needs pairs, or both seq_len and n_pairs")
    if seq_len < 1 or n_pairs < 1:
        raise ValueError(f"seq_len and n_pairs must be positive, got {seq_len}, {n_pairs}")
    layout = NodeLayout.build(adapter, nodes, layers, seq_len if per_position else None)
    qk_bytes = None if qk_chunk_bytes is None else int(qk_chunk_bytes)
    weights = weights_bytes(config, torch_dtype)
    saved = layer_profile(config, seq_len, torch_dtype)[:2]
    memory_of = _memory_model(
        config, adapter, layout, method, seq_len, torch_dtype, qk_bytes, saved
    )

    budget = None
    if max_memory is not None:
        budget = int(max_memory)
    elif pairs_per_chunk is None:
        if remote:
            fraction, extra = NDIF_ACTIVATION_BUDGET
            budget = int(fraction * weights + extra)
        else:
            budget = int(AVAILABLE_FRACTION * max(0, available_memory() - weights))
    name = str(getattr(config, "_name_or_path", "") or config.model_type)
    if pairs_per_chunk is None:
        batch, memory = pairs_per_chunk_for(budget, memory_of, n_pairs, f"{method} on {name}")
    else:
        batch, memory = min(pairs_per_chunk, n_pairs), memory_of(min(pairs_per_chunk, n_pairs))
    graddrop = METHODS[method][1]
    backwards = adapter.n_layers if graddrop else 1
    result = Plan(
        model=name,
        method=method,
        n_nodes=layout.n_nodes,
        n_pairs=n_pairs,
        seq_len=seq_len,
        pairs_per_chunk=batch,
        n_chunks=math.ceil(n_pairs / batch),
        forwards_per_pair=2,
        backwards_per_pair=backwards,
        memory=memory,
        weights_bytes=weights,
        budget_bytes=budget,
        remote=bool(remote),
    )
    if remote:
        outputs = 2 if graddrop else 1
        result.result_bytes = 4 * batch * (outputs * layout.n_nodes + 2)
        if measure_request:
            result.request_bytes = request_bytes(config, layout, method, batch, seq_len)
    if throughput:
        result.seconds = result.cost * seq_len / throughput
    if graddrop:
        result.notes.append(
            f"GradDrop runs {adapter.n_layers} backwards per pair (cost as in the paper); "
            "each dropped backward only walks the layers below the dropped one"
        )
    return result


def request_bytes(config: Any, layout: NodeLayout, method: str, batch: int, seq_len: int) -> int:
    """Size (compressed, as sent) of one chunk's NDIF request, serialized on a meta model."""
    import transformers
    from nnsight.intervention.backends.remote import RemoteBackend

    from atp_nnsight.methods.atp import METHODS, _atp_body
    from atp_nnsight.methods.common import forward_kwargs
    from atp_nnsight.metrics import logit_diff
    from atp_nnsight.models import adapter_for_config
    from atp_nnsight.remote import ship_by_value

    class Meter(RemoteBackend):
        """Serializes the request exactly as the client would POST it; sends nothing."""

        size = 0

        def request(self, request: Any, tracer: Any) -> None:
            Meter.size = len(self._serialize(tracer))

    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    model = nnsight.NNsight(hf)  # token ids are sent, not text: no tokenizer needed
    qk, graddrop = METHODS[method]
    ids = torch.zeros(batch, seq_len, dtype=torch.long)
    targets = torch.zeros(batch, dtype=torch.long)
    chunk = {
        "adapter": adapter_for_config(config),
        "roles": (ids, ids.clone(), targets, targets.clone()),
        "metric": logit_diff,
        "forward": forward_kwargs(logit_diff),
        "kinds": layout.kinds,
        "layers": layout.layers,
        "per_position": layout.per_position,
        "qk": qk,
        "graddrop": graddrop,
        "qk_bytes": None,
    }
    ship_by_value()
    backend = Meter("meter:model", host="http://127.0.0.1:9")
    backend.display.enabled = False
    _measure_session(model, chunk, _atp_body, backend)
    return Meter.size


def _measure_session(model: Any, chunk: dict, body: Any, backend: Any) -> None:
    with model.session(backend=backend):
        out = body(model, chunk)
        out = nnsight.save(out)
