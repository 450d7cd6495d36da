"""atp_nnsight: find which components of a language model cause a behaviour, with AtP*.

Four calls cover the common path::

    model = load_model()                                  # bundled SmolLM2-135M (or "org/name")
    pairs = ioi_pairs(16, tokenizer=model.tokenizer)      # or load_pairs("pairs.jsonl")
    result = attribute(model, pairs, "head,q,k,v,neuron", method="atp*")
    truth = patch(model, pairs, "head")                   # exact activation patching

Conventions: noising by default (patch noise activations into the clean run; gradients on the
clean run); effects are ``metric(patched) - metric(unpatched)``, signed; the default metric is
the last-position logit difference ``logit[clean_target] - logit[noise_target]``; AtP methods
rank by ``mean over pairs of |estimate|``; costs are forward-pass equivalents (backward = 2).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "PromptPair": "atp_nnsight.data",
    "factual_pairs": "atp_nnsight.data",
    "ioi_pairs": "atp_nnsight.data",
    "keep_correct": "atp_nnsight.data",
    "load_pairs": "atp_nnsight.data",
    "make_task": "atp_nnsight.data",
    "random_pairs": "atp_nnsight.data",
    "save_pairs": "atp_nnsight.data",
    "tokenize_pairs": "atp_nnsight.data",
    "METHODS": "atp_nnsight.methods.atp",
    "attribute": "atp_nnsight.methods.atp",
    "patch": "atp_nnsight.methods.exact",
    "patch_sets": "atp_nnsight.methods.exact",
    "logit_diff": "atp_nnsight.metrics",
    "logprob": "atp_nnsight.metrics",
    "get_adapter": "atp_nnsight.models",
    "load_model": "atp_nnsight.models.loading",
    "tiny_model": "atp_nnsight.models.tiny",
    "Attribution": "atp_nnsight.results",
    "NODE_KINDS": "atp_nnsight.types",
    "Node": "atp_nnsight.types",
    "Circuit": "atp_nnsight.edges",
    "EdgeAttribution": "atp_nnsight.edges",
    "attribute_edges": "atp_nnsight.edges",
    "evaluate_circuit": "atp_nnsight.edges",
    "patch_edge_sets": "atp_nnsight.edges",
    "patch_edges": "atp_nnsight.edges",
    "prune": "atp_nnsight.edges",
}
"""Public name -> defining module. Imported on first use (module ``__getattr__``), so that
``import atp_nnsight.cli`` stays light: torch, transformers and nnsight load only when needed."""

__all__ = [
    "METHODS",
    "NODE_KINDS",
    "Attribution",
    "Circuit",
    "EdgeAttribution",
    "Node",
    "PromptPair",
    "attribute",
    "attribute_edges",
    "evaluate_circuit",
    "factual_pairs",
    "get_adapter",
    "ioi_pairs",
    "keep_correct",
    "load_model",
    "load_pairs",
    "logit_diff",
    "logprob",
    "make_task",
    "patch",
    "patch_edge_sets",
    "patch_edges",
    "patch_sets",
    "prune",
    "random_pairs",
    "save_pairs",
    "tiny_model",
    "tokenize_pairs",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'atp_nnsight' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from atp_nnsight.data import (
        PromptPair,
        factual_pairs,
        ioi_pairs,
        keep_correct,
        load_pairs,
        make_task,
        random_pairs,
        save_pairs,
        tokenize_pairs,
    )
    from atp_nnsight.edges import (
        Circuit,
        EdgeAttribution,
        attribute_edges,
        evaluate_circuit,
        patch_edge_sets,
        patch_edges,
        prune,
    )
    from atp_nnsight.methods.atp import METHODS, attribute
    from atp_nnsight.methods.exact import patch, patch_sets
    from atp_nnsight.metrics import logit_diff, logprob
    from atp_nnsight.models import get_adapter
    from atp_nnsight.models.loading import load_model
    from atp_nnsight.models.tiny import tiny_model
    from atp_nnsight.results import Attribution
    from atp_nnsight.types import NODE_KINDS, Node
