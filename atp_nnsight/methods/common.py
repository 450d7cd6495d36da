"""Plumbing shared by all methods: pair preparation, base/source roles, metric calls.

What runs on the NDIF server (:func:`metric_values`, and the roles tuple) is plain,
source-backed Python over torch: no dataclasses, no other imports.
"""

from __future__ import annotations

from typing import Any

import torch

from atp_nnsight.checks import check_metric, check_metric_shape, check_model
from atp_nnsight.data import PairGroup, TokenizedPairs, load_pairs, tokenize_pairs
from atp_nnsight.metrics import reads_last_position_only, resolve_metric
from atp_nnsight.types import NODE_KINDS, check_direction


def prepare_pairs(model: Any, pairs: Any, prepend_bos: bool = False) -> TokenizedPairs:
    """Tokenize (and validate) pairs given in any form :func:`load_pairs` accepts."""
    if isinstance(pairs, TokenizedPairs):
        return pairs
    return tokenize_pairs(load_pairs(pairs), model.tokenizer, prepend_bos=prepend_bos)


def prepare_run(
    model: Any, pairs: Any, metric: Any, prepend_bos: bool = False
) -> tuple[TokenizedPairs, str, Any]:
    """Check the model and metric arguments, tokenize the pairs: ``(pairs, metric name,
    metric function)``. Every method starts here, before any model computation."""
    check_model(model)
    check_metric(metric)
    metric_name, metric_fn = resolve_metric(metric)
    return prepare_pairs(model, pairs, prepend_bos), metric_name, metric_fn


def forward_kwargs(metric: Any) -> dict[str, Any]:
    """Keyword arguments of a run's traced forwards (put in each chunk as ``"forward"``): no
    KV cache and, for a built-in metric, logits at the last position only
    (``logits_to_keep=1``), so neither the ``[B, T, vocab]`` logits nor their gradient exist."""
    kwargs: dict[str, Any] = {"use_cache": False}
    if reads_last_position_only(metric):
        kwargs["logits_to_keep"] = 1
    return kwargs


def common_length(tok: TokenizedPairs) -> int:
    """The one token length of all pairs; per-position nodes need it."""
    lengths = sorted(set(tok.lengths))
    if len(lengths) != 1:
        raise ValueError(
            f"per-position nodes need every pair to have the same token length, got lengths "
            f"{lengths}; use nodes summed over positions, or pairs of one length"
        )
    return lengths[0]


def roles_of(group: PairGroup, direction: str) -> tuple[torch.Tensor, ...]:
    """``(base, source, clean_target, noise_target)`` token tensors of a group of pairs.

    ``base`` is the run that is patched (and differentiated), ``source`` supplies the patched
    activations: clean/noise for noising, noise/clean for denoising.
    """
    check_direction(direction)
    base, source = (
        (group.clean, group.noise) if direction == "noising" else (group.noise, group.clean)
    )
    return (base, source, group.clean_target, group.noise_target)


def metric_values(
    metric: Any, logits: torch.Tensor, clean_target: torch.Tensor, noise_target: torch.Tensor
) -> torch.Tensor:
    """``metric(logits, clean_target, noise_target)`` as float32 ``[batch]``, shape-checked."""
    value = metric(logits, clean_target, noise_target)
    check_metric_shape(value, logits.shape[0], getattr(metric, "__name__", "metric"))
    return value.float()


def site_order(kind: str, layer: int) -> tuple[int, int]:
    """Sort key putting sites in forward-execution order."""
    return (layer, NODE_KINDS.index(kind))


def model_name(model: Any) -> str:
    config = model._module.config
    return str(config._name_or_path or getattr(model, "repo_id", None) or config.model_type)
