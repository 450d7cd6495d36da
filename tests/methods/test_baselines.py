"""Baselines (atp_nnsight.methods.baselines): the statistics on a synthetic set-effect oracle
(additive effects, per-pair variation, noise, pairwise interactions), then the model-backed
methods on a tiny llama against exact patching."""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch_reference as ref  # noqa: E402

from atp_nnsight.methods import baselines as bl  # noqa: E402
from atp_nnsight.methods.exact import patch, patch_sets  # noqa: E402
from atp_nnsight.models import get_adapter  # noqa: E402
from atp_nnsight.models.tiny import tiny_model  # noqa: E402
from atp_nnsight.nodes import NodeLayout  # noqa: E402
from atp_nnsight.results import Attribution  # noqa: E402

N = 200
N_PAIRS = 4
PLANTED = {17: 2.0, 63: -1.5, 101: 1.2, 150: -1.0, 188: 0.9}
Z = 4.5  # tolerance in standard errors (200 nodes tested at once)


# ---------------------------------------------------------------------------------------------
# synthetic effect model
# ---------------------------------------------------------------------------------------------


class SyntheticOracle:
    """``I_d(η) = Σ_{n∈η} I_d(n) + Σ_{{n,n'}⊂η} J(n,n') + ε``, ``ε ~ N(0, σ²)`` iid."""

    def __init__(self, effects: np.ndarray, sigma: float = 0.0, J=None, seed: int = 0):
        self.effects = effects  # [pairs, nodes]
        self.sigma = sigma
        self.J = J
        self.rng = np.random.default_rng(seed)
        self.calls = 0
        self.patches = 0
        self.sizes: list[int] = []  # sets per call

    def __call__(self, sets: list[np.ndarray]) -> np.ndarray:
        assert len(sets) > 0 and all(len(s) > 0 for s in sets)
        X = np.zeros((len(sets), self.effects.shape[1]))
        for i, s in enumerate(sets):
            X[i, s] = 1.0
        out = self.effects @ X.T
        if self.J is not None:  # Σ over unordered pairs {n, n'} ⊂ η
            a, b = np.nonzero(np.triu(self.J, 1))
            out = out + (X[:, a] * X[:, b] * self.J[a, b]).sum(1)[None]
        if self.sigma:
            out = out + self.sigma * self.rng.normal(size=out.shape)
        self.calls += 1
        self.patches += len(sets)
        self.sizes.append(len(sets))
        return out


def synthetic_effects(seed: int = 0, small: float = 0.03, pair_sd: float = 0.02) -> np.ndarray:
    """``[pairs, N]``: planted large effects, many small ones, per-pair variation."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, small, N)
    for n, v in PLANTED.items():
        base[n] = v
    return base + rng.normal(0.0, pair_sd, (N_PAIRS, N))


def inverse_count_mean(m: int, p: float) -> float:
    """``E[1/n_in + 1/n_out]`` for ``n_in ~ Binomial(m, p)`` given ``0 < n_in < m``."""
    k = np.arange(1, m)
    log_comb = np.array(
        [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) for i in k]
    )
    logpmf = log_comb + k * math.log(p) + (m - k) * math.log(1 - p)
    w = np.exp(logpmf)
    return float((w * (1 / k + 1 / (m - k))).sum() / w.sum())


def subsampling_replicates(oracle, p: float, m: int, reps: int) -> np.ndarray:
    return np.stack(
        [
            bl.subsampling_scores(oracle, N, p=p, n_subsets=m, rng=np.random.default_rng(r)).signed
            for r in range(reps)
        ]
    )


# ---------------------------------------------------------------------------------------------
# Subsampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_subsampling_unbiased_with_predicted_variance(p):
    effects = synthetic_effects()
    sigma = 0.5
    oracle = SyntheticOracle(effects, sigma=sigma, seed=1)
    m, reps = 300, 250
    est = subsampling_replicates(oracle, p, m, reps)
    true = effects.mean(0)
    # Var(signed) = [p(1-p) Σ_{n'≠n} Ī(n')² + σ²/pairs] · E[1/n_in + 1/n_out]
    others = (true**2).sum() - true**2
    var = (p * (1 - p) * others + sigma**2 / N_PAIRS) * inverse_count_mean(m, p)
    se = np.sqrt(var / reps)
    z = np.abs(est.mean(0) - true) / se
    assert z.max() < Z, (z.max(), int(z.argmax()))
    ratio = est.var(0, ddof=1).mean() / var.mean()
    assert 0.85 < ratio < 1.15, ratio
    # the tolerance is tight enough to catch a wrong statistic: the included mean alone (biased
    # by + p Σ_{n'≠n} Ī(n')) or a 10 % scale error
    assert (np.abs(p * (true.sum() - true)) / se).max() > 1.2 * Z
    assert (0.1 * np.abs(true) / se).max() > 2 * Z
    assert oracle.patches <= m * reps and oracle.calls == reps


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_subsampling_interaction_bias_is_p_times_sum_J(p):
    effects = synthetic_effects(seed=2)
    J = np.zeros((N, N))
    for a, b, v in [(17, 40, 1.5), (63, 101, -1.2), (5, 6, 2.0), (150, 5, 1.5)]:
        J[a, b] = J[b, a] = v
    oracle = SyntheticOracle(effects, sigma=0.2, J=J, seed=3)
    m, reps = 300, 250
    est = subsampling_replicates(oracle, p, m, reps)
    expected = effects.mean(0) + p * J.sum(1)
    se = est.std(0, ddof=1) / np.sqrt(reps)
    z = np.abs(est.mean(0) - expected) / se
    assert z.max() < Z, (z.max(), int(z.argmax()))
    # the bias is resolved: without the p·ΣJ term these nodes would fail
    touched = np.flatnonzero(J.sum(1))
    assert np.all(np.abs(p * J.sum(1)[touched]) > 8 * se[touched])


def test_subsampling_per_pair_aggregation_and_bookkeeping():
    effects = synthetic_effects(seed=4)
    oracle = SyntheticOracle(effects)
    out = bl.subsampling_scores(oracle, N, p=0.02, n_subsets=40, rng=np.random.default_rng(0))
    scores, signed, per_pair, n_patches = out
    assert per_pair.shape == (N_PAIRS, N)
    np.testing.assert_allclose(signed, per_pair.mean(0))
    np.testing.assert_allclose(scores, np.abs(signed))
    assert n_patches == oracle.patches == 40 - out.info["empty_subsets"]
    # p·N·M = 160 draws over 200 nodes: some nodes are never in a subset
    never = out.info["never_sampled"]
    assert 0 < never < N
    assert (scores == 0).sum() >= never
    # default p gives ~10 nodes per subset
    assert bl.default_inclusion_rate(N) * N == pytest.approx(10)
    assert bl.default_inclusion_rate(8) == 0.5


def test_subsampling_statistic_by_hand():
    """Tiny case: the included-minus-excluded means, per pair, checked against a direct loop."""
    effects = np.random.default_rng(5).normal(size=(2, 6))
    oracle = SyntheticOracle(effects, J=np.ones((6, 6)) - np.eye(6))
    rng = np.random.default_rng(9)
    sets = bl.random_subsets(6, 0.4, 12, np.random.default_rng(9))
    out = bl.subsampling_scores(oracle, 6, p=0.4, n_subsets=12, rng=rng)
    values = SyntheticOracle(effects, J=np.ones((6, 6)) - np.eye(6))(
        [s if len(s) else np.array([0]) for s in sets]
    )
    values[:, [len(s) == 0 for s in sets]] = 0.0
    for n in range(6):
        inside = np.array([n in s for s in sets])
        if inside.all() or not inside.any():
            assert np.all(out.per_pair[:, n] == 0)
            continue
        stat = values[:, inside].mean(1) - values[:, ~inside].mean(1)
        np.testing.assert_allclose(out.per_pair[:, n], stat)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [7, 10, 16])
def test_blocks_find_planted_effects(block_size):
    effects = synthetic_effects(seed=6)
    oracle = SyntheticOracle(effects, sigma=0.01, seed=7)
    out = bl.blocks_scores(oracle, N, block_size=block_size)
    n_blocks = math.ceil(N / block_size)
    assert out.n_set_patches == oracle.patches == n_blocks and oracle.calls == 1
    planted_blocks = {n // block_size for n in PLANTED}
    block_scores = out.scores[::block_size]
    top_blocks = set(np.argsort(-block_scores, kind="stable")[: len(planted_blocks)].tolist())
    assert top_blocks == planted_blocks
    ranking = np.argsort(-out.scores, kind="stable")
    top = set(ranking[: len(planted_blocks) * block_size].tolist())
    assert set(PLANTED) <= top
    # scores constant within a block (ties broken by node order in the ranking)
    for b in range(n_blocks):
        chunk = out.scores[b * block_size : (b + 1) * block_size]
        assert np.all(chunk == chunk[0])
        np.testing.assert_allclose(chunk[0], abs(out.signed[b * block_size]))


def test_blocks_of_one_is_exact_patching():
    effects = synthetic_effects(seed=8)
    scores, signed, per_pair, n = bl.blocks_scores(SyntheticOracle(effects), N, block_size=1)
    np.testing.assert_allclose(per_pair, effects)
    np.testing.assert_allclose(scores, np.abs(effects.mean(0)))
    assert n == N


# ---------------------------------------------------------------------------------------------
# Hierarchical
# ---------------------------------------------------------------------------------------------


def toy_levels() -> np.ndarray:
    """Structure keys of 2 kinds × 4 layers × 25 units = 200 nodes (kind, layer, unit)."""
    kind = np.repeat([0, 1], 100)
    layer = np.tile(np.repeat(np.arange(4), 25), 2)
    unit = np.tile(np.arange(25), 8)
    return np.stack([kind, layer, unit])


def full_tree(n: int, levels, branching: int) -> list[tuple[int, int]]:
    out, todo = [], [(0, n)]
    while todo:
        g = todo.pop()
        out.append(g)
        if g[1] - g[0] > 1:
            todo.extend(bl.split_group(*g, levels, branching))
    return out


@pytest.mark.parametrize("branching", [2, 3, 5])
def test_hierarchy_follows_structure(branching):
    levels = toy_levels()
    tree = full_tree(N, levels, branching)
    leaves = sorted(g for g in tree if g[1] - g[0] == 1)
    assert leaves == [(i, i + 1) for i in range(N)]
    for lo, hi in tree:
        if hi - lo < 2:
            continue
        children = bl.split_group(lo, hi, levels, branching)
        assert 2 <= len(children) <= branching
        assert children[0][0] == lo and children[-1][1] == hi
        assert all(a[1] == b[0] for a, b in zip(children[:-1], children[1:], strict=True))
        varying = next((k for k in levels if len(set(k[lo:hi])) > 1), None)
        for c_lo, _ in children[1:]:  # every cut falls on a run boundary of that level
            if varying is not None:
                assert varying[c_lo] != varying[c_lo - 1]
        sizes = [b - a for a, b in children]
        if varying is levels[-1]:  # unit groups: near-equal sizes
            assert max(sizes) - min(sizes) <= 1
    # the root splits into the two kinds, each kind into layers
    assert bl.split_group(0, N, levels, 3) == [(0, 100), (100, 200)]
    assert bl.split_group(0, 100, levels, 3) == [(0, 50), (50, 75), (75, 100)]


def planted_effects(seed: int) -> np.ndarray:
    """Planted large effects of one sign, all other effects tiny: group effects do not cancel
    (the assumption Hierarchical rests on)."""
    effects = synthetic_effects(seed=seed, small=0.004, pair_sd=0.003)
    planted = list(PLANTED)
    effects[:, planted] = np.abs(effects[:, planted])
    return effects


@pytest.mark.parametrize("levels", [None, "toy"])
def test_hierarchical_threshold_finds_planted(levels):
    levels = toy_levels() if levels == "toy" else None
    effects = planted_effects(10)
    oracle = SyntheticOracle(effects, sigma=0.001, seed=11)
    out = bl.hierarchical_scores(oracle, N, levels=levels, threshold=0.5)
    verified = set(out.info["verified"])
    assert set(PLANTED) <= verified
    assert out.n_set_patches == oracle.patches == out.info["n_groups"]
    assert oracle.calls == out.info["depth"]  # one oracle call per depth
    assert out.n_set_patches < N / 2
    true = effects.mean(0)
    ranking = np.argsort(-out.scores, kind="stable")
    expected = sorted(PLANTED, key=lambda n: -abs(true[n]))
    assert ranking[: len(PLANTED)].tolist() == expected
    # verified leaves carry their own (noisy) single-node effect
    v = np.array(sorted(verified))
    np.testing.assert_allclose(out.signed[v], true[v], atol=0.002)
    np.testing.assert_allclose(out.scores[v], np.abs(out.signed[v]))


@pytest.mark.parametrize("expand_per_round", [1, 8])
def test_hierarchical_best_first_finds_planted_within_budget(expand_per_round):
    effects = planted_effects(12)
    oracle = SyntheticOracle(effects, sigma=0.001, seed=13)
    out = bl.hierarchical_scores(oracle, N, levels=toy_levels(), expand_per_round=expand_per_round)
    assert out.info["budget"] == N
    assert out.n_set_patches == oracle.patches <= N
    assert set(PLANTED) <= set(out.info["verified"])
    true = effects.mean(0)
    ranking = np.argsort(-out.scores, kind="stable")
    assert ranking[: len(PLANTED)].tolist() == sorted(PLANTED, key=lambda n: -abs(true[n]))
    if expand_per_round == 1:  # strict best-first: one group (≤ 3 children) per call
        assert max(oracle.sizes[1:]) <= 3
    else:  # rounds of several groups in one call
        assert max(oracle.sizes[1:]) > 3
    # a small budget is respected and stops the search
    small = SyntheticOracle(effects, seed=13)
    out = bl.hierarchical_scores(small, N, levels=toy_levels(), budget=20)
    assert out.n_set_patches == small.patches <= 20
    assert out.info["stopped_by_budget"]
    with pytest.raises(ValueError, match="budget"):
        bl.hierarchical_scores(small, N, levels=toy_levels(), budget=1)


def test_hierarchical_misses_cancelling_effects():
    """The documented failure mode: opposite effects in one group cancel and stay hidden."""
    effects = np.zeros((1, 27))
    effects[0, 3], effects[0, 4], effects[0, 20] = 1.0, -1.0, 0.6
    out = bl.hierarchical_scores(SyntheticOracle(effects), 27, threshold=0.5)
    assert 20 in out.info["verified"]
    assert not {3, 4} & set(out.info["verified"])
    assert out.scores[3] < out.scores[20] and out.scores[4] < out.scores[20]


def test_hierarchical_scores_rule():
    """9 nodes, branching 3, threshold 0.8: group [0,3) is expanded, [3,6) and [6,9) are not.
    Leaves score |I|; other nodes score just below their group's |I|, so a leaf with the same
    |I| as a group ranks first."""
    single = np.array([[0.5, 0.3, 0.2, 0.2, 0.2, 0.1, 0.0, 0.05, -0.05]])
    oracle = SyntheticOracle(single)
    out = bl.hierarchical_scores(oracle, 9, threshold=0.8)
    assert out.info["verified"] == [0, 1, 2]
    assert oracle.patches == out.n_set_patches == 6 and oracle.calls == 2
    np.testing.assert_allclose(out.scores[:3], [0.5, 0.3, 0.2])
    assert np.all(out.scores[3:6] < 0.5) and np.allclose(out.scores[3:6], 0.5)
    assert np.all(out.scores[6:] < 0) and np.allclose(out.scores[6:], 0.0)
    assert np.argsort(-out.scores, kind="stable").tolist() == [0, 3, 4, 5, 1, 2, 6, 7, 8]
    np.testing.assert_allclose(out.signed, [0.5, 0.3, 0.2] + [0.5] * 3 + [0.0] * 3, atol=1e-12)
    # threshold 0: the whole tree is patched and every node is verified (= exact patching)
    oracle = SyntheticOracle(single)
    out = bl.hierarchical_scores(oracle, 9, threshold=0.0)
    assert out.info["verified"] == list(range(9)) and out.n_set_patches == 3 + 9
    np.testing.assert_allclose(out.scores, np.abs(single[0]))


# ---------------------------------------------------------------------------------------------
# brute force
# ---------------------------------------------------------------------------------------------


def test_brute_force_order_and_expected_cost():
    first = bl.brute_force_scores(None, N, rng=np.random.default_rng(0))
    again = bl.brute_force_scores(None, N, rng=np.random.default_rng(0))
    other = bl.brute_force_scores(None, N, rng=np.random.default_rng(1))
    assert first.n_set_patches == 0 and first.signed is None
    np.testing.assert_array_equal(first.scores, again.scores)
    assert not np.array_equal(first.scores, other.scores)
    assert sorted(np.argsort(-first.scores)) == list(range(N))
    # cost to find the top x (a fixed set of x nodes) ≈ |N| x / (x + 1)
    x, reps = 5, 2000
    top = np.arange(x)
    costs = []
    for r in range(reps):
        s = bl.brute_force_scores(None, N, rng=np.random.default_rng(r)).scores
        rank = np.empty(N, dtype=int)
        rank[np.argsort(-s, kind="stable")] = np.arange(1, N + 1)
        costs.append(rank[top].max())
    costs = np.array(costs)
    se = costs.std(ddof=1) / np.sqrt(reps)
    assert abs(costs.mean() - x * (N + 1) / (x + 1)) < 4 * se
    assert abs(costs.mean() - N * x / (x + 1)) < 0.01 * N


# ---------------------------------------------------------------------------------------------
# integration: tiny llama vs exact patching
# ---------------------------------------------------------------------------------------------

KINDS = ["head", "neuron"]
BATCH = 64  # 3 pairs: 170 sets per patching session, more than any call below


@functools.cache
def model():
    return tiny_model("llama", n_layers=2, seed=3)


@functools.cache
def pairs():
    return ref.word_pairs(4242, (6, 6, 6))


@functools.cache
def exact(direction: str = "noising", per_position: bool = False):
    kinds = ["head"] if per_position else KINDS
    return patch(
        model(),
        pairs(),
        kinds,
        direction=direction,
        per_position=per_position,
        batch_size=BATCH,
        progress=False,
    )


METHODS = {
    "subsampling": (bl.subsampling, {"n_subsets": 40, "p": 0.1}),
    "blocks": (bl.blocks, {"block_size": 8}),
    "hierarchical": (bl.hierarchical, {}),
    "brute-force": (bl.brute_force, {}),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_methods_well_formed(name, tmp_path):
    fn, options = METHODS[name]
    res = fn(model(), pairs(), KINDS, batch_size=BATCH, progress=False, **options)
    ex = exact()
    assert isinstance(res, Attribution) and res.method == name
    pd.testing.assert_frame_equal(res.nodes, ex.nodes)
    n = len(ex)
    assert res.scores.shape == (n,) and np.isfinite(res.scores).all()
    assert res.per_pair.shape == (3, n)
    assert (res.direction, res.metric, res.model) == (ex.direction, ex.metric, ex.model)
    meta = res.metadata
    assert meta["kinds"] == KINDS and meta["layers"] == [0, 1] and meta["seq_len"] is None
    assert NodeLayout.of_result(get_adapter(model()), res).n_nodes == n
    assert meta["reconstructed"] and meta["seed"] == 0
    for key in options:
        assert meta[key] == options[key]
    # cost: one forward per patched set per pair, + 2 unpatched per pair per session
    if name == "brute-force":
        assert res.cost == 0 and meta["set_patches"] == 0 and res.mean_effect is None
    else:
        assert res.cost == 3 * (meta["set_patches"] + 2 * meta["oracle_calls"])
    if name == "blocks":
        assert meta["set_patches"] == math.ceil(n / 8) and meta["oracle_calls"] == 1
    if name == "subsampling":
        assert meta["oracle_calls"] == 1 and meta["set_patches"] <= 40
        np.testing.assert_allclose(res.scores, np.abs(res.mean_effect))
    loaded = Attribution.load(res.save(tmp_path / name))
    np.testing.assert_array_equal(loaded.scores, res.scores)
    assert loaded.cost == res.cost


def test_blocks_of_one_equal_exact_patching():
    res = bl.blocks(model(), pairs(), KINDS, block_size=1, batch_size=BATCH, progress=False)
    ex = exact()
    np.testing.assert_allclose(res.per_pair, ex.per_pair, atol=1e-5)
    np.testing.assert_allclose(res.scores, ex.scores, atol=1e-5)
    assert res.cost == ex.cost


@pytest.mark.parametrize(
    "direction,per_position", [("noising", False), ("denoising", False), ("noising", True)]
)
def test_hierarchical_leaves_equal_exact_patching(direction, per_position):
    kinds = ["head"] if per_position else KINDS
    ex = exact(direction, per_position)
    res = bl.hierarchical(
        model(),
        pairs(),
        kinds,
        direction=direction,
        per_position=per_position,
        budget=len(ex) // 2,
        batch_size=BATCH,
        progress=False,
    )
    pd.testing.assert_frame_equal(res.nodes, ex.nodes)
    leaves = np.array(res.metadata["verified"])
    assert len(leaves) > 0 and res.metadata["set_patches"] <= len(ex) // 2
    np.testing.assert_allclose(res.per_pair[:, leaves], ex.per_pair[:, leaves], atol=1e-5)
    np.testing.assert_allclose(res.scores[leaves], ex.scores[leaves], atol=1e-5)
    assert res.cost == 3 * (res.metadata["set_patches"] + 2 * res.metadata["oracle_calls"])
    if per_position:
        assert res.metadata["seq_len"] == 6 and res.nodes["position"].notna().all()
    # threshold 0: the whole tree is expanded and the result is exact patching
    full = bl.hierarchical(
        model(),
        pairs(),
        kinds,
        direction=direction,
        per_position=per_position,
        threshold=0.0,
        batch_size=BATCH,
        progress=False,
    )
    assert full.metadata["verified"] == list(range(len(ex)))
    np.testing.assert_allclose(full.scores, ex.scores, atol=1e-5)


def test_subsampling_wiring_matches_core_on_patch_sets():
    """The method is the core statistic with exact set patching as the oracle."""
    res = bl.subsampling(
        model(), pairs(), KINDS, n_subsets=30, seed=5, batch_size=BATCH, progress=False
    )
    layout = NodeLayout.build(get_adapter(model()), KINDS)

    def oracle(sets):
        return patch_sets(model(), pairs(), sets, layout=layout, batch_size=BATCH, progress=False)[
            0
        ]

    core = bl.subsampling_scores(oracle, len(res), n_subsets=30, rng=np.random.default_rng(5))
    np.testing.assert_allclose(res.per_pair, core.per_pair, atol=1e-5)
    assert res.metadata["p"] == pytest.approx(10 / len(res))
    assert res.metadata["never_sampled"] == core.info["never_sampled"]
