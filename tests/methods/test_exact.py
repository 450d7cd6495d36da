"""Exact activation patching (atp_nnsight.methods.exact) against a one-patch-per-forward loop and
the plain-PyTorch reference in ``tests/torch_reference.py``, for every tiny model family."""

from __future__ import annotations

import functools
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch_reference as ref  # noqa: E402

from atp_nnsight.methods.exact import FORWARDS_PER_SESSION, patch, patch_sets  # noqa: E402
from atp_nnsight.models.tiny import TINY_FAMILIES, tiny_hf_model, tiny_model  # noqa: E402
from atp_nnsight.types import Node  # noqa: E402

KINDS = ("resid", "q", "k", "v", "head", "attn_out", "neuron", "mlp_out")
NON_NEURON = tuple(k for k in KINDS if k != "neuron")
DIRECTIONS = ("noising", "denoising")
SEED = 3
N_LAYERS = 2
LOOP_TOL = 1e-5  # batched vs one patch per forward (same code, different batch composition)
REF_TOL = 1e-4  # nnsight vs plain PyTorch


@functools.cache
def nn_model(family: str):
    return tiny_model(family, n_layers=N_LAYERS, seed=SEED)


@functools.cache
def hf_model(family: str):
    return tiny_hf_model(family, n_layers=N_LAYERS, seed=SEED)


def pairs_for(family: str, lengths: tuple[int, ...], salt: int = 0) -> list[tuple[str, ...]]:
    return ref.word_pairs(1000 * TINY_FAMILIES.index(family) + salt, lengths)


@functools.cache
def batched(family: str, direction: str, per_position: bool):
    """``patch`` of every node kind, many patches per forward, and the pairs it ran on."""
    pairs = pairs_for(family, (6, 6) if per_position else (6, 5, 6))
    result = patch(
        nn_model(family),
        pairs,
        list(KINDS),
        per_position=per_position,
        direction=direction,
        batch_size=64,
        progress=False,
    )
    return result, pairs


def nodes_of(result) -> list[Node]:
    return [result.node(i) for i in range(len(result))]


def reference_effects(family, pairs, node_sets, direction) -> np.ndarray:
    """``[pairs, sets]`` exact effects from the plain-PyTorch reference."""
    hf = hf_model(family)
    return np.array([ref.exact_effects(hf, *ref.pair_ids(p), node_sets, direction) for p in pairs])


def sample_nodes(nodes: list[Node], per_kind: int, seed: int, kinds=KINDS) -> list[int]:
    """Indices of ``per_kind`` random nodes of each kind (all of them if fewer)."""
    rng = random.Random(seed)
    out = []
    for kind in kinds:
        idx = [i for i, n in enumerate(nodes) if n.kind == kind]
        out.extend(sorted(rng.sample(idx, min(per_kind, len(idx)))))
    return out


def expected_cost(pairs, n_sets: int, batch_size: int) -> float:
    """Patched forwards plus the two unpatched forwards per pair in every session."""
    lengths = [len(p[0].split()) for p in pairs]
    cost = 0
    for length in set(lengths):
        n = lengths.count(length)
        sessions = -(-n_sets // max(1, batch_size * FORWARDS_PER_SESSION // n))
        cost += n * n_sets + 2 * n * sessions
    return float(cost)


def assert_max_abs(actual, expected, tol, what=""):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = np.abs(actual - expected)
    worst = np.unravel_index(np.argmax(diff), diff.shape) if diff.size else None
    assert diff.max(initial=0.0) <= tol, (
        f"{what}: max abs diff {diff.max():.3g} at {worst} "
        f"(actual {actual[worst]:.6g}, expected {expected[worst]:.6g})"
    )


# --------------------------------------------------------------------------------------------
# the layout itself and non-triviality (so that the parity tests below can fail)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_node_table_and_effects_are_non_trivial(family):
    hf = hf_model(family)
    units = ref.sizes(hf)
    result, pairs = batched(family, "noising", False)
    expected = [(k, layer, i) for k in KINDS for layer in range(N_LAYERS) for i in range(units[k])]
    got = [(n.kind, n.layer, n.index) for n in nodes_of(result)]
    assert got == expected
    assert result.nodes["position"].isna().all()
    assert result.per_pair.shape == (len(pairs), len(expected))
    np.testing.assert_allclose(result.mean_effect, result.per_pair.mean(0), rtol=1e-6)
    np.testing.assert_allclose(result.scores, np.abs(result.mean_effect), rtol=1e-6)
    # Effects are far from zero for every kind, so agreement below is meaningful.
    for kind in KINDS:
        cols = [i for i, n in enumerate(nodes_of(result)) if n.kind == kind]
        assert np.abs(result.per_pair[:, cols]).max() > 0.05, kind

    per_pos, _ = batched(family, "noising", True)
    table = per_pos.nodes
    assert len(per_pos) == 6 * len(expected)
    assert sorted(set(table["position"].astype(int))) == list(range(6))


# --------------------------------------------------------------------------------------------
# nodes summed over positions (pairs of two token lengths in one call)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_summed_batched_equals_one_patch_per_forward(family, direction):
    result, pairs = batched(family, direction, False)
    nodes = nodes_of(result)
    column = {n: i for i, n in enumerate(nodes)}
    loop = patch(
        nn_model(family),
        pairs,
        list(NON_NEURON),
        direction=direction,
        batch_size=1,
        progress=False,
    )
    cols = [column[n] for n in nodes_of(loop)]
    assert_max_abs(result.per_pair[:, cols], loop.per_pair, LOOP_TOL, "patch batch_size=1")
    # Neurons (the bulk of the nodes): a random sample, one patch per forward.
    neurons = [nodes[i] for i in sample_nodes(nodes, 10, SEED, kinds=("neuron",))]
    effects, cost = patch_sets(
        nn_model(family), pairs, [[n] for n in neurons], direction=direction, batch_size=1,
        progress=False,
    )  # fmt: skip
    assert cost == expected_cost(pairs, len(neurons), batch_size=1)
    expected = result.per_pair[:, [column[n] for n in neurons]]
    assert_max_abs(effects, expected, LOOP_TOL, "patch_sets batch_size=1")


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_summed_equals_torch_reference(family, direction):
    result, pairs = batched(family, direction, False)
    nodes = nodes_of(result)
    idx = sample_nodes(nodes, 8, SEED + 1, kinds=("neuron",))
    idx += [i for i, n in enumerate(nodes) if n.kind != "neuron"]
    expected = reference_effects(family, pairs, [[nodes[i]] for i in idx], direction)
    assert_max_abs(result.per_pair[:, idx], expected, REF_TOL, f"{family} {direction}")
    # the unpatched metric
    hf = hf_model(family)
    base = []
    for p in pairs:
        clean, noise, ct, nt = ref.pair_ids(p)
        ids = clean if direction == "noising" else noise
        base.append(float(ref.metric_logit_diff(ref.run(hf, ids), ct, nt)))
    assert_max_abs(result.metadata["base_metric"], base, REF_TOL, "base metric")


# --------------------------------------------------------------------------------------------
# per-position nodes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_per_position_equals_torch_reference(family, direction):
    result, pairs = batched(family, direction, True)
    nodes = nodes_of(result)
    idx = sample_nodes(nodes, 4, SEED + 2)
    # the last position of the last layer and the first position of layer 0 always
    extra = [Node("head", N_LAYERS - 1, 1, 5), Node("resid", 0, 0, 0), Node("k", 0, 1, 2)]
    idx += [nodes.index(n) for n in extra]
    expected = reference_effects(family, pairs, [[nodes[i]] for i in idx], direction)
    assert_max_abs(result.per_pair[:, idx], expected, REF_TOL, f"{family} {direction}")
    assert np.abs(expected).max() > 0.05


@pytest.mark.parametrize(
    ("family", "direction"),
    [(f, "noising") for f in TINY_FAMILIES] + [("mistral", "denoising")],
)
def test_per_position_batched_equals_one_patch_per_forward(family, direction):
    result, pairs = batched(family, direction, True)
    column = {n: i for i, n in enumerate(nodes_of(result))}
    last = N_LAYERS - 1
    loop = patch(
        nn_model(family),
        pairs,
        list(NON_NEURON),
        layers=[last],
        per_position=True,
        direction=direction,
        batch_size=1,
        progress=False,
    )
    assert set(loop.nodes["layer"]) == {last}
    cols = [column[n] for n in nodes_of(loop)]
    assert_max_abs(result.per_pair[:, cols], loop.per_pair, LOOP_TOL, "patch batch_size=1")
    rng = random.Random(SEED)
    sets = [[Node("neuron", rng.randrange(N_LAYERS), rng.randrange(64), p)] for p in range(6)]
    sets += [[Node("q", 0, rng.randrange(4), p)] for p in (0, 3, 5)]
    effects, _ = patch_sets(
        nn_model(family), pairs, sets, direction=direction, batch_size=1, progress=False
    )
    expected = result.per_pair[:, [column[s[0]] for s in sets]]
    assert_max_abs(effects, expected, LOOP_TOL, "patch_sets batch_size=1")


# --------------------------------------------------------------------------------------------
# node sets
# --------------------------------------------------------------------------------------------
def mixed_sets(family: str) -> list[list[Node]]:
    kv = ref.sizes(hf_model(family))["k"]
    return [
        [Node("resid", 0, 0, 2), Node("head", 1, 3)],
        [Node("q", 0, 1), Node("k", 1, kv - 1, 4), Node("neuron", 0, 10, 4)],
        [
            Node("v", 0, 0, 1),
            Node("v", 0, kv - 1, 1),
            Node("attn_out", 1),
            Node("mlp_out", 0, 0, 3),
        ],
        [Node("head", 0, h) for h in range(4)],
        [Node("resid", 1), Node("q", 1, 0, 4), Node("mlp_out", 1, 0, 0)],
        [Node("neuron", 0, i, p) for i, p in ((3, 0), (3, 1), (40, 4), (63, 2))],
        [Node("mlp_out", 0), Node("mlp_out", 0, 0, 1)],  # overlapping entries
        [Node("k", 0, 0, 3)],
    ]


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_patch_sets_equals_torch_reference(family, direction):
    pairs = pairs_for(family, (6, 5, 6), salt=1)
    sets = mixed_sets(family)
    effects, cost = patch_sets(
        nn_model(family), pairs, sets, direction=direction, batch_size=64, progress=False
    )
    assert effects.shape == (len(pairs), len(sets))
    assert cost == expected_cost(pairs, len(sets), batch_size=64)
    expected = reference_effects(family, pairs, sets, direction)
    assert_max_abs(effects, expected, REF_TOL, f"{family} {direction}")
    assert (np.abs(expected) > 1e-3).mean() > 0.8  # the sets matter
    # a set is not the sum of its parts (so the sets really are patched together)
    singles = reference_effects(family, pairs[:1], [[n] for n in sets[1]], direction)
    assert abs(singles.sum() - expected[0, 1]) > 1e-3


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_patching_all_of_resid0_reproduces_the_source_run(family, direction):
    pairs = pairs_for(family, (6, 5), salt=2)
    hf = hf_model(family)
    expected = []
    for p in pairs:
        clean, noise, ct, nt = ref.pair_ids(p)
        m_clean = float(ref.metric_logit_diff(ref.run(hf, clean), ct, nt))
        m_noise = float(ref.metric_logit_diff(ref.run(hf, noise), ct, nt))
        expected.append(m_noise - m_clean if direction == "noising" else m_clean - m_noise)
    result = patch(
        nn_model(family), pairs, "resid", layers=[0], direction=direction, progress=False
    )
    assert len(result) == 1
    assert_max_abs(result.per_pair[:, 0], expected, REF_TOL, "resid L0 summed")
    # the same through per-position nodes: every position of resid L0 as one set
    every = [Node("resid", 0, 0, p) for p in range(5)]
    effects, _ = patch_sets(nn_model(family), pairs[1:], [every], direction=direction,
                            progress=False)  # fmt: skip
    assert_max_abs(effects[:, 0], expected[1:], REF_TOL, "resid L0 every position")
    assert max(abs(e) for e in expected) > 0.05


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    return nn_model("llama")


@pytest.mark.parametrize(
    "node",
    [
        Node("head", 0, 4),  # 4 query heads
        Node("q", 1, 7, 2),
        Node("k", 0, 2),  # llama has 2 KV heads
        Node("v", 1, 2, 0),
        Node("neuron", 0, 64),
        Node("resid", 0, 1),
        Node("head", 2, 0),  # 2 layers
        Node("mlp_out", -1, 0),
        Node("resid", 0, 0, -1),
    ],
    ids=str,
)
def test_out_of_range_node_raises_naming_the_node(llama, node):
    pairs = pairs_for("llama", (6,))
    with pytest.raises(ValueError, match=re.escape(str(node))):
        patch_sets(llama, pairs, [[Node("head", 0, 0)], [Node("resid", 1), node]], progress=False)


def test_position_beyond_the_prompt_raises(llama):
    pairs = pairs_for("llama", (6, 5))
    with pytest.raises(ValueError, match="position 5"):
        patch_sets(llama, pairs, [[Node("resid", 0, 0, 5)]], progress=False)


def test_unknown_kind_in_a_node_set_raises_naming_it(llama):
    pairs = pairs_for("llama", (6,))
    with pytest.raises(ValueError, match="attn_pattern"):
        patch_sets(llama, pairs, [[Node("attn_pattern", 0, 0)]], progress=False)


def test_per_position_with_pairs_of_different_lengths_raises(llama):
    pairs = pairs_for("llama", (6, 5))
    with pytest.raises(ValueError, match="same token length"):
        patch(llama, pairs, "head", per_position=True, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"nodes": "heads"}, "heads"),
        ({"nodes": ["head", "mlp"]}, "mlp"),
        ({"direction": "sideways"}, "sideways"),
        ({"metric": "logit-ratio"}, "logit-ratio"),
        ({"layers": [0, 2]}, "2"),
    ],
)
def test_bad_arguments_raise_naming_the_value(llama, kwargs, bad):
    pairs = pairs_for("llama", (6,))
    with pytest.raises(ValueError, match=re.escape(bad)):
        patch(llama, pairs, progress=False, **kwargs)


def test_bad_direction_and_metric_in_patch_sets(llama):
    pairs = pairs_for("llama", (6,))
    with pytest.raises(ValueError, match="backwards"):
        patch_sets(llama, pairs, [[Node("head", 0, 0)]], direction="backwards", progress=False)
    with pytest.raises(ValueError, match="prob-diff"):
        patch_sets(llama, pairs, [[Node("head", 0, 0)]], metric="prob-diff", progress=False)
