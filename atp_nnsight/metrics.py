"""Metrics: scalar functions of the logits, one value per prompt (row).

A metric is called as ``metric(logits, clean_target, noise_target)`` with ``logits`` of shape
``[batch, positions, vocab]`` and the targets as ``[batch]`` token ids; it returns ``[batch]``.
Built-ins read the last position and compute in float32. The metric is the same in both
directions: denoising changes which run is patched, not what is measured.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Metric = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def logit_diff(
    logits: torch.Tensor, clean_target: torch.Tensor, noise_target: torch.Tensor
) -> torch.Tensor:
    """``logit[clean_target] - logit[noise_target]`` at the last position (the default)."""
    last = logits[:, -1].float()
    rows = torch.arange(last.shape[0], device=last.device)
    return last[rows, clean_target.to(last.device)] - last[rows, noise_target.to(last.device)]


def logprob(
    logits: torch.Tensor, clean_target: torch.Tensor, noise_target: torch.Tensor
) -> torch.Tensor:
    """Log-probability of the clean target at the last position."""
    last = torch.log_softmax(logits[:, -1].float(), dim=-1)
    rows = torch.arange(last.shape[0], device=last.device)
    return last[rows, clean_target.to(last.device)]


METRICS: dict[str, Metric] = {"logit-diff": logit_diff, "logprob": logprob}


def reads_last_position_only(metric: Metric) -> bool:
    """Whether ``metric`` is a built-in (they read the last position's logits only)."""
    return any(metric is builtin for builtin in METRICS.values())


def resolve_metric(metric: str | Metric) -> tuple[str, Metric]:
    """``(name, function)`` for a built-in metric name or a user callable."""
    if callable(metric):
        return getattr(metric, "__name__", "custom"), metric
    key = metric.replace("_", "-")
    if key not in METRICS:
        raise ValueError(
            f"unknown metric {metric!r}; use one of {', '.join(METRICS)} or a callable"
        )
    return key, METRICS[key]
