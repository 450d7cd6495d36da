"""The edge graph of a pre-norm residual transformer: nodes, edges and their flat order.

**Nodes.** *Upstream* nodes write into the residual stream: ``input`` (the token embeddings,
i.e. the residual stream entering layer 0, position embeddings included), every attention
head ``a{l}.h{h}`` (its write ``W_O[:, h] z_h``: the output projection applied to head ``h``'s
slice of its input, the projection's bias excluded) and every MLP ``m{l}`` (its output).
*Downstream* inputs read the residual stream, each through its own copy: per query head the
``q`` input of ``a{l}.h{h}``, per KV head the ``k`` and ``v`` inputs of ``a{l}.kv{g}`` (under
grouped-query attention one key/value input feeds every query head of its group), every MLP's
input ``m{l}`` and the ``logits`` (the final norm's input).

**Edges.** ``u -> v`` exists when ``u`` writes before ``v`` reads: in sequential blocks an MLP
reads its own layer's heads, in parallel blocks (GPT-NeoX with ``use_parallel_residual``,
GPT-J) attention and MLP of a layer both read the layer input, so an MLP reads only earlier
layers. The upstream nodes feeding a downstream input are therefore a prefix of the upstream
order (``input``, then per layer: heads, MLP), and edges are numbered downstream-major: for
each downstream input in forward order (per layer: q heads, k heads, v heads, MLP; then the
logits), its upstream prefix in order.

**What "v's copy" means for each family** (``FAMILY_NORMS``): the copy is the input of the norm
in front of ``v``: the attention's input norm for q/k/v, the MLP's input norm for the MLP and
the final norm for the logits. Families whose residual writes pass through a norm after the
block (Gemma 2/3 sandwich norms, OLMo 2/3 post-norms) are refused: a head's write is not
separable there (the post-norm mixes all heads of the layer), so head-level edges do not
exist. Families with query/key norms (Qwen3 per head, OLMoE over all heads) run the shifted
query/key through their own norm module (:data:`QK_NORMS`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from atp_nnsight.models import Adapter, get_adapter

FAMILY_NORMS: dict[str, tuple[str, str]] = {
    "gpt2": ("ln_1", "ln_2"),
    "gpt_neox": ("input_layernorm", "post_attention_layernorm"),
    "gptj": ("ln_1", "ln_1"),
    "llama": ("input_layernorm", "post_attention_layernorm"),
    "mistral": ("input_layernorm", "post_attention_layernorm"),
    "qwen2": ("input_layernorm", "post_attention_layernorm"),
    "qwen3": ("input_layernorm", "post_attention_layernorm"),
    "phi3": ("input_layernorm", "post_attention_layernorm"),
    "mixtral": ("input_layernorm", "post_attention_layernorm"),
    "qwen2_moe": ("input_layernorm", "post_attention_layernorm"),
    "olmoe": ("input_layernorm", "post_attention_layernorm"),
}
"""``model_type`` → (attention input norm, MLP input norm), attribute names on a decoder layer.
GPT-J's attention and MLP share one input norm."""

QK_NORMS: dict[str, tuple[str, str]] = {
    "qwen3": ("q_norm", "k_norm"),
    "olmoe": ("q_norm", "k_norm"),
}
"""``model_type`` → (query norm, key norm) on the attention module, for families normalising
queries and keys after their projection (Qwen3 per head, OLMoE over all heads)."""

POST_NORM_FAMILIES = ("gemma2", "gemma3_text", "gemma3", "olmo2", "olmo3")

REFUSED_WHY = (
    "its blocks pass each write through a norm after the attention/MLP (sandwich or post-norms), "
    "so a head's write into the residual stream is not separable from the other heads' and "
    "head-level edges are not defined; use node attribution (atp_nnsight.attribute) instead"
)

DOWNSTREAM_KINDS = ("q", "k", "v", "mlp", "logits")
EDGE_COLUMNS = [
    "edge",
    "upstream",
    "downstream",
    "input",
    "upstream_kind",
    "upstream_layer",
    "upstream_index",
    "downstream_layer",
    "downstream_index",
]
"""Columns of the edge table. ``edge`` is the flat edge index; ``input`` is the downstream
input kind (q, k, v, mlp, logits); ``upstream_layer`` is -1 for ``input``,
``downstream_layer`` is the number of layers for the logits; indices are the head (q, head),
the KV head (k, v) or 0."""


class UnsupportedEdgesError(ValueError):
    """The model's family has no edge graph (see the module docstring)."""


def edge_support(model_type: str) -> tuple[str, str]:
    """The (attention, MLP) input norm names of ``model_type``; raises for refused families."""
    if model_type in POST_NORM_FAMILIES:
        raise UnsupportedEdgesError(f"edges are not supported for {model_type!r}: {REFUSED_WHY}")
    if model_type not in FAMILY_NORMS:
        raise UnsupportedEdgesError(
            f"edges are not supported for {model_type!r}; supported model types: "
            f"{', '.join(sorted(FAMILY_NORMS))}"
        )
    return FAMILY_NORMS[model_type]


class EdgeGraph:
    """Nodes and edges of one model (see the module docstring); builds the edge table."""

    def __init__(
        self,
        model_type: str,
        n_layers: int,
        n_heads: int,
        n_kv_heads: int,
        parallel: bool,
        adapter: Adapter | None = None,
    ) -> None:
        self.attn_norm, self.mlp_norm = edge_support(model_type)
        self.qk_norms = QK_NORMS.get(model_type)
        self.model_type = model_type
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.parallel = bool(parallel)
        self.adapter = adapter

    @classmethod
    def of(cls, model: Any) -> EdgeGraph:
        """The edge graph of an nnsight-wrapped transformers model."""
        adapter = get_adapter(model)
        return cls(
            model._module.config.model_type,
            adapter.n_layers,
            adapter.n_heads,
            adapter.n_kv_heads,
            adapter.parallel_residual,
            adapter,
        )

    @classmethod
    def from_metadata(cls, metadata: dict) -> EdgeGraph:
        """The graph (shape only, no model) recorded by :meth:`describe` in a result."""
        return cls(
            metadata["model_type"],
            int(metadata["n_layers"]),
            int(metadata["n_heads"]),
            int(metadata["n_kv_heads"]),
            bool(metadata["parallel"]),
        )

    # ---- counts ------------------------------------------------------------------------------
    @property
    def per_layer_upstream(self) -> int:
        """Upstream nodes written by one layer: its heads, then its MLP."""
        return self.n_heads + 1

    @property
    def n_upstream(self) -> int:
        return 1 + self.n_layers * self.per_layer_upstream

    @property
    def attention_inputs(self) -> int:
        """Downstream attention inputs per layer: q per query head, k and v per KV head."""
        return self.n_heads + 2 * self.n_kv_heads

    def feeding_attention(self, layer: int) -> int:
        """Upstream nodes feeding layer ``layer``'s q/k/v inputs (a prefix of the upstream)."""
        return 1 + layer * self.per_layer_upstream

    def feeding_mlp(self, layer: int) -> int:
        """Upstream nodes feeding layer ``layer``'s MLP input."""
        return self.feeding_attention(layer) + (0 if self.parallel else self.n_heads)

    @property
    def feeding_logits(self) -> int:
        return self.n_upstream

    @property
    def n_edges(self) -> int:
        total = self.feeding_logits
        for layer in range(self.n_layers):
            total += self.attention_inputs * self.feeding_attention(layer)
            total += self.feeding_mlp(layer)
        return total

    def layer_offsets(self) -> list[tuple[int, int]]:
        """Per layer, the flat edge offsets of its attention block (``attention_inputs`` rows of
        ``feeding_attention`` edges each) and of its MLP input; the logits follow the last."""
        out, offset = [], 0
        for layer in range(self.n_layers):
            attn = offset
            offset += self.attention_inputs * self.feeding_attention(layer)
            out.append((attn, offset))
            offset += self.feeding_mlp(layer)
        return out

    @property
    def logits_offset(self) -> int:
        return self.n_edges - self.feeding_logits

    # ---- names ---------------------------------------------------------------------------------
    def upstream_table(self) -> pd.DataFrame:
        """One row per upstream node: ``name, kind, layer, index`` in upstream order."""
        names, kinds, layers, index = ["input"], ["input"], [-1], [0]
        for layer in range(self.n_layers):
            for h in range(self.n_heads):
                names.append(f"a{layer}.h{h}")
                kinds.append("head")
                layers.append(layer)
                index.append(h)
            names.append(f"m{layer}")
            kinds.append("mlp")
            layers.append(layer)
            index.append(0)
        return pd.DataFrame({"name": names, "kind": kinds, "layer": layers, "index": index})

    def downstream_table(self) -> pd.DataFrame:
        """One row per downstream input: ``name, input, layer, index, n_upstream``."""
        rows = []
        for layer in range(self.n_layers):
            feed = self.feeding_attention(layer)
            for h in range(self.n_heads):
                rows.append((f"a{layer}.h{h}", "q", layer, h, feed))
            for kind in ("k", "v"):
                for g in range(self.n_kv_heads):
                    rows.append((f"a{layer}.kv{g}", kind, layer, g, feed))
            rows.append((f"m{layer}", "mlp", layer, 0, self.feeding_mlp(layer)))
        rows.append(("logits", "logits", self.n_layers, 0, self.feeding_logits))
        return pd.DataFrame(rows, columns=["name", "input", "layer", "index", "n_upstream"])

    def edge_table(self) -> pd.DataFrame:
        """One row per edge, in flat edge order (see :data:`EDGE_COLUMNS`)."""
        up = self.upstream_table()
        down = self.downstream_table()
        up_idx, down_idx = self.edge_ends()
        return pd.DataFrame(
            {
                "edge": np.arange(len(up_idx)),
                "upstream": up["name"].to_numpy()[up_idx],
                "downstream": down["name"].to_numpy()[down_idx],
                "input": down["input"].to_numpy()[down_idx],
                "upstream_kind": up["kind"].to_numpy()[up_idx],
                "upstream_layer": up["layer"].to_numpy()[up_idx],
                "upstream_index": up["index"].to_numpy()[up_idx],
                "downstream_layer": down["layer"].to_numpy()[down_idx],
                "downstream_index": down["index"].to_numpy()[down_idx],
            }
        )

    def edge_ends(self) -> tuple[np.ndarray, np.ndarray]:
        """Per edge, the index of its upstream node and of its downstream input (in the order
        of :meth:`upstream_table` / :meth:`downstream_table`)."""
        counts = self.downstream_table()["n_upstream"].to_numpy()
        up_idx = np.concatenate([np.arange(n) for n in counts])
        down_idx = np.repeat(np.arange(len(counts)), counts)
        return up_idx, down_idx

    def chunk_info(self) -> dict:
        """What the shipped bodies need to know about the graph: plain values only."""
        return {
            "attn_norm": self.attn_norm,
            "mlp_norm": self.mlp_norm,
            "shared_norm": self.attn_norm == self.mlp_norm,
            "qk_norms": self.qk_norms,
            "parallel": self.parallel,
        }

    def describe(self) -> dict:
        """The graph's shape, for result metadata (rebuilt by :meth:`from_metadata`)."""
        return {
            "model_type": self.model_type,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "parallel": self.parallel,
        }
