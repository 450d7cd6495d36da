"""Cost of verified recall, IRWRGM and recall at budget on hand-made rankings."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest

from atp_nnsight.evaluation import (
    cost_of_verified_recall,
    curves,
    irwrgm,
    irwrgm_table,
    plot_cost_of_verified_recall,
    recall_at_budget,
)
from atp_nnsight.results import Attribution

matplotlib.use("Agg")


def make(scores, *, cost=0.0, n_pairs=1, kinds=None, order=None) -> Attribution:
    """An Attribution over nodes 0..N-1 (``kinds[i]`` per node), rows permuted by ``order``."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    kinds = kinds or ["neuron"] * n
    idx = np.arange(n) if order is None else np.asarray(order)
    nodes = pd.DataFrame(
        {
            "kind": np.array(kinds, dtype=object)[idx],
            "layer": np.zeros(n, dtype=np.int64),
            "index": idx,
            "position": pd.array([None] * n, dtype="Int64"),
        }
    )
    return Attribution(
        nodes=nodes,
        scores=scores[idx],
        per_pair=np.tile(scores[idx], (n_pairs, 1)),
        mean_effect=scores[idx],
        method="m",
        direction="noising",
        metric="logit-diff",
        model="hand",
        cost=cost,
    )


TRUTH = [5.0, 4.0, 3.0, 2.0, 1.0]


def test_oracle_ranking_costs_method_cost_plus_x():
    truth = make(TRUTH)
    oracle = make([10, 9, 8, 7, 6], cost=12.0, n_pairs=3)  # same order, 4 per pair
    np.testing.assert_array_equal(cost_of_verified_recall(truth, oracle), 4 + np.arange(1, 6))


def test_reversed_ranking_is_the_worst_case():
    truth = make(TRUTH)
    worst = make([1, 2, 3, 4, 5], cost=0.0)
    np.testing.assert_array_equal(cost_of_verified_recall(truth, worst), [5, 5, 5, 5, 5])


def test_hand_ranking_and_node_alignment():
    truth = make(TRUTH)
    # method order: node 1, 0, 4, 2, 3 -> ranks of nodes 0..4 are 2, 1, 4, 5, 3
    method = make([4.0, 5.0, 2.0, 1.0, 3.0], cost=8.0, n_pairs=2)
    expected = 4 + np.array([2, 2, 4, 5, 5])
    np.testing.assert_array_equal(cost_of_verified_recall(truth, method), expected)
    # the same method with its node table in another row order
    shuffled = make([4.0, 5.0, 2.0, 1.0, 3.0], cost=8.0, n_pairs=2, order=[3, 0, 4, 1, 2])
    np.testing.assert_array_equal(cost_of_verified_recall(truth, shuffled), expected)
    np.testing.assert_array_equal(cost_of_verified_recall(truth, method, 3), expected[:3])
    np.testing.assert_array_equal(
        cost_of_verified_recall(truth, method, method_cost=0), expected - 4
    )


def test_default_k_skips_zero_true_effects():
    truth = make([3.0, 0.0, 2.0, 0.0])
    method = make([1.0, 2.0, 3.0, 4.0])
    assert len(cost_of_verified_recall(truth, method)) == 2


def test_mismatched_nodes_are_an_error():
    with pytest.raises(ValueError, match="different nodes"):
        cost_of_verified_recall(make(TRUTH), make([1.0, 2.0, 3.0]))


def test_recall_at_budget():
    truth = make(TRUTH)
    method = make([4.0, 5.0, 2.0, 1.0, 3.0])  # verification order 1, 0, 4, 2, 3
    assert recall_at_budget(truth, method, 2, 2) == 1.0
    assert recall_at_budget(truth, method, 3, 3) == pytest.approx(2 / 3)
    assert recall_at_budget(truth, method, 1, 1) == 0.0
    assert recall_at_budget(truth, method, 5, 5) == 1.0


def test_irwrgm():
    c = np.array([3.0, 4.0, 7.0, 9.0])
    assert irwrgm(c, c) == pytest.approx(1.0)
    assert irwrgm(2 * c, c) == pytest.approx(2.0)
    assert irwrgm(np.arange(1, 5)) == pytest.approx(1.0)  # default reference: oracle x
    # hand value: ratios 4 and 1 with weights 1 and 1/2
    expected = math.exp((1 * math.log(4) + 0.5 * math.log(1)) / 1.5)
    assert irwrgm([4.0, 2.0], [1.0, 2.0]) == pytest.approx(expected)
    with pytest.raises(ValueError):
        irwrgm([1.0, 2.0], [1.0])


def test_curves_table_and_plot():
    kinds = ["q", "q", "q", "neuron", "neuron", "neuron"]
    truth = make([6, 5, 4, 3, 2, 1], kinds=kinds)
    star = make([6, 5, 4, 3, 2, 1], kinds=kinds, cost=6.0, n_pairs=1)
    slow = make([1, 2, 3, 4, 5, 6], kinds=kinds, cost=1.0, n_pairs=1)
    df = curves(truth, {"atp*": star, "slow": slow})
    assert set(df["kind"]) == {"all", "q", "neuron"}
    q_star = df[(df.method == "atp*") & (df.kind == "q")]["cost"].to_numpy()
    np.testing.assert_array_equal(q_star, 6 + np.arange(1, 4))
    q_slow = df[(df.method == "slow") & (df.kind == "q")]["cost"].to_numpy()
    np.testing.assert_array_equal(q_slow, [4, 4, 4])  # method cost 1 + last of 3
    table = irwrgm_table(df)
    one = table[(table.method == "atp*")]["irwrgm"].to_numpy()
    np.testing.assert_allclose(one, 1.0)
    slow_q = table[(table.method == "slow") & (table.kind == "q")]["irwrgm"].item()
    assert slow_q == pytest.approx(irwrgm(q_slow, q_star))
    with pytest.raises(ValueError, match="reference"):
        irwrgm_table(df, reference="nope")
    import matplotlib.pyplot as plt

    fig = plot_cost_of_verified_recall(df)
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["q", "neuron"]
    assert all(ax.get_xscale() == "log" and ax.get_yscale() == "log" for ax in axes)
    assert len(axes[0].get_lines()) == 3  # two methods + the oracle diagonal
    plt.close(fig)
