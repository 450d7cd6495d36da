"""Runs compute logits at the last position only when the metric reads nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))
import torch_reference as ref  # noqa: E402

from atp_nnsight import attribute, patch  # noqa: E402
from atp_nnsight.edges import attribute_edges  # noqa: E402
from atp_nnsight.methods.common import forward_kwargs  # noqa: E402
from atp_nnsight.metrics import logit_diff, logprob  # noqa: E402
from atp_nnsight.models.tiny import tiny_model  # noqa: E402

PAIRS = ref.word_pairs(7, (5, 5))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=2, seed=5)


@pytest.mark.parametrize("metric", [logit_diff, logprob])
def test_builtin_metrics_keep_only_the_last_positions_logits(metric):
    assert forward_kwargs(metric) == {"use_cache": False, "logits_to_keep": 1}


def test_custom_metric_sees_every_position():
    def first_position(logits, clean_target, noise_target):
        return logits[:, 0, 0]

    assert forward_kwargs(first_position) == {"use_cache": False}


def recording(seen: list):
    """``logit_diff`` as a custom metric that records the positions it was given."""

    def metric(logits, clean_target, noise_target):
        seen.append(logits.shape[1])
        return logit_diff(logits, clean_target, noise_target)

    return metric


@pytest.mark.parametrize(
    "run",
    [
        lambda m, metric: attribute(m, PAIRS, "head,mlp_out", metric=metric, progress=False),
        lambda m, metric: patch(m, PAIRS, "mlp_out", metric=metric, progress=False),
        lambda m, metric: attribute_edges(m, PAIRS, "eap", metric=metric, progress=False),
    ],
    ids=["attribute", "patch", "attribute_edges"],
)
def test_same_values_with_last_position_logits_as_with_all(model, run):
    seen: list[int] = []
    full = run(model, recording(seen))
    last = run(model, logit_diff)
    assert seen and set(seen) == {5}  # a custom metric gets every position
    assert np.abs(last.per_pair).max() > 1e-3  # not trivially equal
    np.testing.assert_allclose(full.per_pair, last.per_pair, rtol=1e-5, atol=1e-6)
