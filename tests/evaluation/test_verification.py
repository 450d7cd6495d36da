"""Verification in ranked order: exact effects, order, budget and stopping rules."""

from __future__ import annotations

import numpy as np
import pytest
from eval_models import random_pairs

from atp_nnsight import attribute, patch, tiny_model
from atp_nnsight.evaluation import verified_nodes, verified_table, verify

KINDS = "head,q,k,v,neuron"


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama")
    pairs = random_pairs(3, 6, seed=11)
    star = attribute(model, pairs, KINDS, method="atp*", progress=False)
    truth = patch(model, pairs, KINDS, progress=False)
    assert np.abs(truth.mean_effect).max() > 1e-2
    return model, pairs, star, truth


def test_budget_verifies_ranked_nodes_with_exact_effects(setup):
    model, pairs, star, truth = setup
    v = verify(model, pairs, star, budget=12, chunk_size=5, progress=False)
    info = v.metadata["verified"]
    order = np.array(info["order"])
    np.testing.assert_array_equal(order, star.ranking()[:12])
    per_pair = np.array(info["per_pair"])
    assert per_pair.shape == (3, 12)
    np.testing.assert_allclose(per_pair, truth.per_pair[:, order], atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(info["mean_effect"], truth.mean_effect[order], atol=2e-5)
    assert info["stopped_by"] == "budget" and info["direction"] == "noising"
    assert info["metric"] == "logit-diff"
    assert info["cost"] >= 3 * 12  # at least one forward per pair and verified node
    # a copy: the input result is untouched, scores and method cost are kept
    assert "verified" not in star.metadata
    np.testing.assert_array_equal(v.scores, star.scores)
    assert v.cost == star.cost
    table = verified_table(v)
    assert list(table["step"]) == list(range(1, 13))
    assert list(table["rank"]) == list(range(1, 13))
    np.testing.assert_allclose(table["exact"], truth.mean_effect[order], atol=2e-5)
    np.testing.assert_array_equal(verified_nodes(v), order)


def test_one_chunk_equals_many_chunks(setup):
    model, pairs, star, _ = setup
    a = verify(model, pairs, star, budget=7, progress=False).metadata["verified"]
    b = verify(model, pairs, star, budget=7, chunk_size=2, progress=False).metadata["verified"]
    assert a["order"] == b["order"]
    np.testing.assert_allclose(a["per_pair"], b["per_pair"], atol=2e-5)


def _first_run(abs_effects: np.ndarray, k: int, theta: float) -> int:
    below = abs_effects < theta
    for t in range(k - 1, len(below)):
        if below[t - k + 1 : t + 1].all():
            return t
    return -1


def test_consecutive_below_stops_where_it_should(setup):
    model, pairs, star, truth = setup
    in_order = np.abs(truth.mean_effect[star.ranking()])
    k = 2
    theta = float(np.median(in_order[:30]))
    t = _first_run(in_order, k, theta)
    assert 2 <= t < 40  # the rule fires, and not at once
    v = verify(model, pairs, star, stop=("consecutive_below", k, theta), progress=False)
    info = v.metadata["verified"]
    assert len(info["order"]) == t + 1
    assert info["stopped_by"] == "stop"
    assert np.all(np.abs(info["mean_effect"][-k:]) < theta)
    # a budget below the stopping point wins
    short = verify(model, pairs, star, budget=t, stop=("consecutive_below", k, theta))
    assert len(short.metadata["verified"]["order"]) == t
    assert short.metadata["verified"]["stopped_by"] == "budget"


def test_callable_stop_and_resume(setup):
    model, pairs, star, truth = setup

    def five(order, mean_effect):
        assert len(order) == len(mean_effect)
        return len(order) >= 5

    v = verify(model, pairs, star, stop=five, progress=False)
    first = v.metadata["verified"]
    assert len(first["order"]) == 5 and first["stop"] == "five"
    more = verify(model, pairs, v, budget=9, progress=False).metadata["verified"]
    np.testing.assert_array_equal(more["order"], star.ranking()[:9])
    np.testing.assert_allclose(
        more["mean_effect"], truth.mean_effect[star.ranking()[:9]], atol=2e-5
    )
    assert more["cost"] > first["cost"]


def test_bad_inputs(setup):
    model, pairs, star, _ = setup
    with pytest.raises(ValueError, match="stopping rule"):
        verify(model, pairs, star, budget=2, stop=("below", 1.0))
    with pytest.raises(ValueError, match="no verification"):
        verified_table(star)
    v = verify(model, pairs, star, budget=2, progress=False)
    with pytest.raises(ValueError, match="another direction"):
        verify(model, pairs, v, budget=3, direction="denoising", progress=False)
