"""Plumbing shared by all methods: pair preparation, base/source roles, chunk sizing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from atp_nnsight.data import PairGroup, TokenizedPairs, load_pairs, tokenize_pairs
from atp_nnsight.types import NODE_KINDS, check_direction


def prepare_pairs(model: Any, pairs: Any, prepend_bos: bool = False) -> TokenizedPairs:
    """Tokenize (and validate) pairs given in any form :func:`load_pairs` accepts."""
    if isinstance(pairs, TokenizedPairs):
        return pairs
    return tokenize_pairs(load_pairs(pairs), model.tokenizer, prepend_bos=prepend_bos)


def common_length(tok: TokenizedPairs) -> int:
    """The one token length of all pairs; per-position nodes need it."""
    lengths = sorted(set(tok.lengths))
    if len(lengths) != 1:
        raise ValueError(
            f"per-position nodes need every pair to have the same token length, got lengths "
            f"{lengths}; use nodes summed over positions, or pairs of one length"
        )
    return lengths[0]


@dataclass(frozen=True)
class Roles:
    """Which prompt is run (``base``) and which supplies patched activations (``source``)."""

    base: torch.Tensor
    source: torch.Tensor
    clean_target: torch.Tensor
    noise_target: torch.Tensor

    @classmethod
    def of(cls, group: PairGroup, direction: str) -> Roles:
        check_direction(direction)
        base, source = (
            (group.clean, group.noise) if direction == "noising" else (group.noise, group.clean)
        )
        return cls(base, source, group.clean_target, group.noise_target)


def site_order(kind: str, layer: int) -> tuple[int, int]:
    """Sort key putting sites in forward-execution order."""
    return (layer, NODE_KINDS.index(kind))


def model_name(model: Any) -> str:
    config = model._module.config
    return str(config._name_or_path or getattr(model, "repo_id", None) or config.model_type)
