"""The false-negative diagnostic: a planted miss is flagged and bounded; exact predictions
flag nothing; the statistics on synthetic additive effects."""

from __future__ import annotations

import numpy as np
import pytest
from eval_models import linear_after_last_mlp, random_pairs

from atp_nnsight import attribute, patch
from atp_nnsight.evaluation import (
    diagnose,
    should_stop,
    verified_table,
    verify,
    verify_until_bound,
)
from atp_nnsight.evaluation.diagnostic import _statistics

K = 8


@pytest.fixture(scope="module")
def planted_run(planted):
    model, pairs = planted.model, planted.pairs
    star = attribute(model, pairs, "neuron", method="atp*", progress=False)
    truth = patch(model, pairs, "neuron", progress=False)
    return star, truth


def test_atp_star_misses_the_planted_node(planted, planted_run):
    """Precondition of the key test, checked with exact patching."""
    star, truth = planted_run
    j = planted.j
    exact = abs(float(truth.mean_effect[j]))
    assert exact > 1.0
    assert exact >= np.sort(truth.scores)[-2]  # among the largest true effects
    assert star.scores[j] < 0.01 * exact  # AtP* sees ~nothing
    rank = int(np.flatnonzero(star.ranking() == j)[0]) + 1
    assert rank > 4 * K  # far outside the verified top-K
    # the downstream gate neuron itself is found: it is the top AtP* node
    assert star.ranking()[0] == 64 + planted.m


def test_diagnostic_flags_the_planted_false_negative(planted, planted_run):
    star, truth = planted_run
    model, pairs, j = planted.model, planted.pairs, planted.j
    d = diagnose(model, pairs, star, verified=K, n_subsets=200, seed=0, progress=False)
    assert len(d.verified) == K and j not in set(d.verified.tolist())
    assert d.metadata["estimate_source"].startswith("computed (atp+qk)")
    row = d.nodes.set_index("node").loc[j]
    exact = abs(float(truth.mean_effect[j]))
    assert abs(row["estimate"]) < 0.01 * exact  # the prediction misses it too
    assert row["flagged"]
    assert j in d.flagged["node"].tolist()
    assert row["upper"] >= exact and d.bound >= exact
    # the bound covers every unverified node's true effect
    unverified = d.nodes["node"].to_numpy()
    assert d.bound >= np.abs(truth.mean_effect[unverified]).max()
    # every flagged node is a real effect above theta
    flagged = d.flagged["node"].to_numpy()
    assert (np.abs(truth.mean_effect[flagged]) > d.theta).all()
    assert not d.stop and not should_stop(d)
    assert set(d.cost_breakdown) == {"estimate", "verification", "subsets"}
    assert d.cost == pytest.approx(sum(d.cost_breakdown.values()))
    assert d.cost_breakdown["subsets"] >= len(pairs) * (200 - d.metadata["empty_subsets"])
    assert "choices" in d.metadata and "bound" in d.metadata["choices"]
    text = d.summary()
    assert "upper bound" in text and d.nodes.set_index("node").loc[j, "label"] in text
    assert len(d.to_dataframe()) == len(star) - K


def test_plain_subsampling_statistic_matches_a_direct_computation(planted, planted_run):
    """r̂ and se recomputed by hand from the stored subsets and subset effects."""
    star, _ = planted_run
    v = verify(planted.model, planted.pairs, star, budget=K, progress=False)
    d = diagnose(planted.model, planted.pairs, v, n_subsets=40, seed=3, progress=False)
    assert d.cost_breakdown.keys() == {"estimate", "subsets"}  # verification reused
    resid = d.subsets["residual"].to_numpy()
    est = d.nodes.set_index("node")["estimate"]
    for j, mem in enumerate(d.members):
        assert d.subsets["residual"][j] == pytest.approx(
            d.subset_per_pair[:, j].mean() - est.loc[mem].sum(), abs=1e-5
        )
    n = int(d.nodes["node"].iloc[5])
    inside = np.array([n in set(m.tolist()) for m in d.members])
    expected = resid[inside].mean() - resid[~inside].mean()
    row = d.nodes.set_index("node").loc[n]
    assert row["correction"] == pytest.approx(expected, abs=1e-9)
    se = resid.std(ddof=1) * np.sqrt(1 / inside.sum() + 1 / (~inside).sum())
    assert row["se"] == pytest.approx(se, rel=1e-9)


@pytest.fixture(scope="module")
def exact_case():
    model = linear_after_last_mlp()
    pairs = random_pairs(3, 5, seed=4)
    star = attribute(model, pairs, "neuron", method="atp*", layers=[2], progress=False)
    truth = patch(model, pairs, "neuron", layers=[2], progress=False)
    verified = verify(model, pairs, star, budget=K, progress=False)
    return model, pairs, star, truth, verified


def test_negative_control_exact_predictions_flag_nothing(exact_case):
    model, pairs, star, truth, verified = exact_case
    unverified = np.setdiff1d(np.arange(len(star)), verified_table(verified)["node"])
    remaining = float(np.abs(truth.mean_effect[unverified]).max())
    assert remaining > 0.1  # the remaining nodes are not trivially zero
    theta = 1.05 * remaining
    d = diagnose(model, pairs, star, verified=verified, theta=theta, n_subsets=60, progress=False)
    assert d.residual["sd"] < 1e-4  # the prediction is exact and additive
    assert not d.nodes["flagged"].any()
    assert remaining - 1e-4 <= d.bound <= remaining + 1e-3  # tight, and still valid
    assert should_stop(d) and d.stop
    # the computed signed estimate is AtP(+QK) itself
    atp = attribute(model, pairs, "neuron", method="atp", layers=[2], progress=False)
    np.testing.assert_allclose(d.nodes["estimate"], atp.mean_effect[unverified], atol=1e-5)
    # a lower threshold flags exactly the unverified nodes whose true effect exceeds it
    low = d.with_threshold(theta=0.5 * remaining)
    expected = unverified[np.abs(truth.mean_effect[unverified]) > 0.5 * remaining]
    assert sorted(low.flagged["node"]) == sorted(expected.tolist())
    assert not should_stop(low)


def test_signed_result_is_used_as_its_own_prediction(exact_case):
    model, pairs, _, _, _ = exact_case
    atp = attribute(model, pairs, "neuron", method="atp", layers=[2], progress=False)
    d = diagnose(model, pairs, atp, verified=4, n_subsets=20, progress=False)
    assert "estimate" not in d.cost_breakdown
    assert d.metadata["estimate_source"].startswith("the result itself")
    assert d.theta == pytest.approx(0.1 * np.abs(d.metadata["verified_exact_mean_effect"]).max())


def test_verify_until_bound_stops_when_the_bound_falls(exact_case):
    model, pairs, star, truth, _ = exact_case
    in_order = np.abs(truth.mean_effect[star.ranking()])
    # after 4 nodes the remaining maximum is above theta, after 8 below
    theta = 0.5 * (in_order[4:].max() + in_order[8:].max())
    assert in_order[4:].max() > theta > in_order[8:].max()
    v, d = verify_until_bound(model, pairs, star, theta=theta, step=4, n_subsets=30, progress=False)
    assert [r[0] for r in d.metadata["rounds"]] == [4, 8]
    assert len(v.metadata["verified"]["order"]) == 8 and d.stop


def test_statistics_on_synthetic_additive_effects():
    """Additive subset effects with one node the prediction misses entirely."""
    rng = np.random.default_rng(0)
    n_u, m, p = 50, 400, 0.2
    true = rng.normal(0, 0.3, n_u)
    pred = true + rng.normal(0, 0.05, n_u)  # small errors everywhere ...
    true[7], pred[7] = 4.0, 0.0  # ... and one large miss
    nodes = np.arange(100, 100 + n_u)
    members = [nodes[rng.random(n_u) < p] for _ in range(m)]
    effects = np.array([true[mem - 100].sum() for mem in members]) + rng.normal(0, 0.01, m)
    s = _statistics(pred, nodes, members, effects, delta=0.05, theta=1.0)
    assert np.flatnonzero(s["flagged"]).tolist() == [7]
    assert s["corrected"][7] == pytest.approx(4.0, abs=0.6)
    assert s["bound"] >= 4.0
    assert s["bound"] >= np.abs(true).max()
    wide = s["bound"] - 4.0
    # once the prediction has the node, the residuals shrink and the bound tightens
    pred[7] = true[7]
    s = _statistics(pred, nodes, members, effects, delta=0.05, theta=1.0)
    assert s["sd"] < 0.2
    assert np.flatnonzero(s["flagged"]).tolist() == [7]  # still a real effect above theta
    assert 4.0 <= s["bound"] < 4.0 + wide / 3
