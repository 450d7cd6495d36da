"""AtP, GradDrop and AtP* (atp_nnsight.methods.atp) against the plain-PyTorch reference in
``tests/torch_reference.py``, for every tiny model family, node kind and direction."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch_reference as ref  # noqa: E402

from atp_nnsight.methods.atp import attribute  # noqa: E402
from atp_nnsight.models.tiny import TINY_FAMILIES, tiny_hf_model, tiny_model  # noqa: E402
from atp_nnsight.types import Node  # noqa: E402

KINDS = ("resid", "q", "k", "v", "head", "attn_out", "neuron", "mlp_out")
QK = ("q", "k")
DIRECTIONS = ("noising", "denoising")
SEED = 5
N_LAYERS = 3
SUMMED_LENGTHS = (6, 5, 6, 6)  # two token lengths; with pairs_per_chunk=2: three chunks
PER_POSITION_LENGTHS = (6, 6, 6)


@functools.cache
def nn_model(family: str):
    return tiny_model(family, n_layers=N_LAYERS, seed=SEED)


@functools.cache
def hf_model(family: str):
    return tiny_hf_model(family, n_layers=N_LAYERS, seed=SEED)


def pairs_for(family: str, per_position: bool) -> list[tuple[str, ...]]:
    lengths = PER_POSITION_LENGTHS if per_position else SUMMED_LENGTHS
    return ref.word_pairs(100 + TINY_FAMILIES.index(family), lengths)


@functools.cache
def run(family: str, method: str, direction: str, per_position: bool):
    return attribute(
        nn_model(family),
        pairs_for(family, per_position),
        list(KINDS),
        method=method,
        per_position=per_position,
        direction=direction,
        pairs_per_chunk=2,
        progress=False,
    )


def nodes_of(result) -> list[Node]:
    return [result.node(i) for i in range(len(result))]


@functools.cache
def reference_atp(family: str, direction: str, per_position: bool) -> torch.Tensor:
    """``[pairs, nodes]`` plain-PyTorch AtP estimates (float64), nodes in the library's order."""
    nodes = nodes_of(run(family, "atp", direction, per_position))
    hf = hf_model(family)
    return torch.stack(
        [
            ref.atp_estimate(hf, *ref.pair_ids(p), nodes, direction)
            for p in pairs_for(family, per_position)
        ]
    )


@functools.cache
def reference_terms(family: str, direction: str, per_position: bool) -> torch.Tensor:
    """``[pairs, layers, nodes]`` plain-PyTorch GradDrop terms ``Î_ℓ`` (float64)."""
    nodes = nodes_of(run(family, "atp", direction, per_position))
    hf = hf_model(family)
    return torch.stack(
        [
            ref.graddrop_terms(hf, *ref.pair_ids(p), nodes, direction)
            for p in pairs_for(family, per_position)
        ]
    )


def columns(result, kinds) -> list[int]:
    return [i for i, n in enumerate(nodes_of(result)) if n.kind in kinds]


def close(actual, expected, rtol=1e-4, atol=1e-5, msg=""):
    torch.testing.assert_close(
        torch.as_tensor(np.asarray(actual), dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{msg}\n{m}",
    )


PARAMS = [
    pytest.param(f, d, pp, id=f"{f}-{d}-{'per_position' if pp else 'summed'}")
    for f in TINY_FAMILIES
    for d in DIRECTIONS
    for pp in (False, True)
]


# --------------------------------------------------------------------------------------------
# AtP
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "direction", "per_position"), PARAMS)
def test_atp_equals_torch_reference(family, direction, per_position):
    result = run(family, "atp", direction, per_position)
    pairs = pairs_for(family, per_position)
    units = ref.sizes(hf_model(family))
    n_pos = 6 if per_position else 1
    assert len(result) == N_LAYERS * n_pos * sum(units.values())
    assert result.per_pair.shape == (len(pairs), len(result))
    expected = reference_atp(family, direction, per_position)
    for kind in KINDS:
        cols = columns(result, (kind,))
        close(result.per_pair[:, cols], expected[:, cols], msg=f"{kind} ({family} {direction})")
        assert expected[:, cols].abs().max() > 1e-2, kind  # non-trivial values
    np.testing.assert_allclose(result.mean_effect, result.per_pair.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.scores, np.abs(result.per_pair).mean(0), rtol=1e-5, atol=1e-7)
    assert result.cost == 4 * len(pairs)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_summed_atp_is_the_sum_of_per_position_atp(family, direction):
    """Per-position reference values sum to the summed ones (checks the reference itself)."""
    hf = hf_model(family)
    pair = ref.pair_ids(pairs_for(family, True)[0])
    units = ref.sizes(hf)
    summed = [Node(k, 1, min(1, units[k] - 1)) for k in KINDS]
    per_pos = [Node(n.kind, n.layer, n.index, p) for n in summed for p in range(6)]
    a = ref.atp_estimate(hf, *pair, summed, direction)
    b = ref.atp_estimate(hf, *pair, per_pos, direction).reshape(len(summed), 6).sum(1)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------
# GradDrop
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "direction", "per_position"), PARAMS)
def test_graddrop_equals_torch_reference(family, direction, per_position):
    result = run(family, "atp+gd", direction, per_position)
    nodes = nodes_of(result)
    assert nodes == nodes_of(run(family, "atp", direction, per_position))
    terms = reference_terms(family, direction, per_position)
    expected = torch.stack([ref.graddrop_score(t, nodes) for t in terms])
    for kind in KINDS:
        cols = columns(result, (kind,))
        close(result.per_pair[:, cols], expected[:, cols], msg=f"{kind} ({family} {direction})")
    assert result.mean_effect is None
    np.testing.assert_allclose(result.scores, result.per_pair.mean(0), rtol=1e-5, atol=1e-7)
    assert result.cost == (2 + 2 * N_LAYERS) * len(terms)
    # GradDrop is not plain |AtP| (else the parity above would say little about the drops).
    atp = reference_atp(family, direction, per_position)
    differs = (expected - atp.abs()).abs() > 1e-3 * (1 + atp.abs())
    assert differs.float().mean() > 0.2


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_reference_graddrop_structure(family, direction):
    """In the reference itself: a block node's own-layer term is zero, and drops of layers
    above a node leave its AtP unchanged (they are downstream of nothing it feeds but the
    skip); so the GradDrop normalisation (L - 1 vs L) is the right one."""
    nodes = nodes_of(run(family, "atp", direction, False))
    terms = reference_terms(family, direction, False)  # [pairs, L, nodes]
    atp = reference_atp(family, direction, False)
    for j, n in enumerate(nodes):
        own = terms[:, n.layer, j]
        if n.kind == "resid":
            assert own.abs().max() > 0, n  # the skip path still carries a gradient
        else:
            assert own.abs().max() == 0, n
        for drop in range(n.layer):  # upstream drops (float32 rounding of the drop hook only)
            torch.testing.assert_close(terms[:, drop, j], atp[:, j], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_graddrop_of_last_layer_nodes_is_abs_atp(family, direction):
    for per_position in (False, True):
        gd = run(family, "atp+gd", direction, per_position)
        atp = run(family, "atp", direction, per_position)
        last = [
            i for i, n in enumerate(nodes_of(gd)) if n.layer == N_LAYERS - 1 and n.kind != "resid"
        ]
        assert len(last) > 0
        close(gd.per_pair[:, last], np.abs(atp.per_pair[:, last]), rtol=1e-6, atol=1e-7)
        # resid of the last layer has a genuine own-layer term: not |AtP|
        resid = [i for i, n in enumerate(nodes_of(gd)) if n.layer == N_LAYERS - 1]
        resid = [i for i in resid if gd.node(i).kind == "resid"]
        assert not np.allclose(gd.per_pair[:, resid], np.abs(atp.per_pair[:, resid]))


# --------------------------------------------------------------------------------------------
# QK fix and AtP*: only q and k change
# --------------------------------------------------------------------------------------------
OTHER = tuple(k for k in KINDS if k not in QK)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_qk_fix_changes_q_and_k_only(family, direction):
    for per_position in (False, True):
        atp = run(family, "atp", direction, per_position)
        qk = run(family, "atp+qk", direction, per_position)
        assert nodes_of(qk) == nodes_of(atp)
        other, qk_cols = columns(atp, OTHER), columns(atp, QK)
        close(qk.per_pair[:, other], atp.per_pair[:, other], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(qk.mean_effect, qk.per_pair.mean(0), rtol=1e-5, atol=1e-7)
        a, b = atp.per_pair[:, qk_cols], qk.per_pair[:, qk_cols]
        differs = np.abs(a - b) > 1e-3 * (1 + np.abs(a))
        assert differs.mean() > 0.2, f"QK fix changed only {differs.mean():.0%} of q/k values"


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_atp_star_equals_graddrop_outside_q_and_k(family, direction):
    for per_position in (False, True):
        gd = run(family, "atp+gd", direction, per_position)
        star = run(family, "atp*", direction, per_position)
        assert nodes_of(star) == nodes_of(gd)
        other, qk_cols = columns(gd, OTHER), columns(gd, QK)
        close(star.per_pair[:, other], gd.per_pair[:, other], rtol=1e-6, atol=1e-7)
        assert star.mean_effect is None
        a, b = gd.per_pair[:, qk_cols], star.per_pair[:, qk_cols]
        differs = np.abs(a - b) > 1e-3 * (1 + np.abs(a))
        assert differs.mean() > 0.2
        assert (b >= 0).all()


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
def test_attribute_errors_name_the_bad_value():
    model = nn_model("llama")
    pairs = pairs_for("llama", False)
    with pytest.raises(ValueError, match="'atp\\+\\+'"):
        attribute(model, pairs, "head", method="atp++", progress=False)
    with pytest.raises(ValueError, match="'upwards'"):
        attribute(model, pairs, "head", method="atp", direction="upwards", progress=False)
    with pytest.raises(ValueError, match="'attention'"):
        attribute(model, pairs, "head,attention", method="atp", progress=False)
    with pytest.raises(ValueError, match="same token length"):
        attribute(model, pairs, "head", method="atp", per_position=True, progress=False)
    with pytest.raises(ValueError, match="'kl'"):
        attribute(model, pairs, "head", method="atp", metric="kl", progress=False)


# --------------------------------------------------------------------------------------------
# QK fix against patched attention patterns (written-out attention in the reference)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_reference_eager_attention_matches_the_model(family):
    hf = hf_model(family)
    ids = ref.pair_ids(pairs_for(family, True)[0])[0]
    patterns = {}

    def record(kind, layer, x):
        if kind == "pattern":
            patterns[layer] = x

    eager = ref.run(hf, ids, record, eager=True)
    torch.testing.assert_close(eager, ref.run(hf, ids), rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(eager, hf(input_ids=ids[None]).logits, rtol=1e-5, atol=1e-4)
    assert sorted(patterns) == list(range(N_LAYERS))
    t = torch.arange(6)
    visible = t[:, None] >= t[None, :]
    if family == "mistral":  # sliding window 4
        visible &= t[:, None] - t[None, :] < 4
    for a in patterns.values():
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
        assert (a[..., ~visible] == 0).all()


def qk_sample(result, per_position: bool) -> list[int]:
    """All summed q/k nodes; per position a fixed spread of them (one forward each)."""
    cols = columns(result, QK)
    if not per_position:
        return cols
    return cols[:: max(1, len(cols) // 24)]


@pytest.mark.parametrize(("family", "direction", "per_position"), PARAMS)
def test_qk_fix_equals_torch_reference(family, direction, per_position):
    result = run(family, "atp+qk", direction, per_position)
    idx = qk_sample(result, per_position)
    nodes = [result.node(i) for i in idx]
    hf = hf_model(family)
    expected = torch.stack(
        [
            ref.qk_fix_estimates(hf, *ref.pair_ids(p), nodes, direction)[0]
            for p in pairs_for(family, per_position)
        ]
    )
    close(result.per_pair[:, idx], expected, msg=f"q/k ({family} {direction})")
    assert expected.abs().max() > 1e-2


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_atp_star_qk_equals_torch_reference(family, direction):
    for per_position in (False, True):
        result = run(family, "atp*", direction, per_position)
        idx = qk_sample(result, per_position)[::2]
        nodes = [result.node(i) for i in idx]
        hf = hf_model(family)
        scores = []
        for p in pairs_for(family, per_position):
            terms = ref.qk_fix_estimates(
                hf, *ref.pair_ids(p), nodes, direction, drop_layers=range(N_LAYERS)
            )
            scores.append(ref.graddrop_score(terms, nodes))
        close(result.per_pair[:, idx], torch.stack(scores), msg=f"q/k ({family} {direction})")
