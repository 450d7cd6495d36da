"""Parity with the independent split-copy reference (``edge_reference.py``): EAP on a tiny model
of every supported family, EAP-IG, the QK fix, GradDrop and exact edge patching on families
that exercise their code paths (GQA, parallel blocks, a shared norm, query/key norms)."""

from __future__ import annotations

import edge_reference as er
import numpy as np
import pytest
import torch_reference as ref
from edge_support import assert_close, client, raw, reference_values

from atp_nnsight.edges import attribute_edges
from atp_nnsight.edges.exact import patch_edges
from atp_nnsight.edges.graph import FAMILY_NORMS

SUPPORTED = sorted(FAMILY_NORMS)
PAIR = ref.word_pairs(7, [5])


@pytest.mark.parametrize("family", SUPPORTED)
def test_eap_matches_reference(family):
    result = attribute_edges(client(family), PAIR, "eap", progress=False)
    expected = reference_values(result, er.edge_values(raw(family), PAIR[0]))
    assert_close(result.per_pair[0], expected)
    np.testing.assert_allclose(result.mean_effect, result.per_pair[0])


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "qwen3"])
def test_eap_ig_matches_reference(family):
    result = attribute_edges(client(family), PAIR, "eap-ig", ig_steps=3, progress=False)
    expected = reference_values(result, er.edge_values(raw(family), PAIR[0], steps=3))
    assert_close(result.per_pair[0], expected)
    eap = attribute_edges(client(family), PAIR, "eap", progress=False)
    assert np.abs(result.per_pair - eap.per_pair).max() > 1e-3, "EAP-IG reduced to EAP"


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "qwen3"])
def test_qk_fix_matches_reference(family):
    result = attribute_edges(client(family), PAIR, "eap+qk", progress=False)
    expected = reference_values(result, er.edge_values(raw(family), PAIR[0], qk=True))
    assert_close(result.per_pair[0], expected)
    qk = result.edges["input"].isin(["q", "k"]).to_numpy()
    eap = attribute_edges(client(family), PAIR, "eap", progress=False)
    assert np.abs(result.per_pair[0, qk] - eap.per_pair[0, qk]).max() > 1e-3
    np.testing.assert_allclose(result.per_pair[0, ~qk], eap.per_pair[0, ~qk], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("family", "method"), [("llama", "eap+gd"), ("gptj", "eap*"), ("gpt2", "eap*")]
)
def test_graddrop_matches_reference(family, method):
    model = client(family, n_layers=3)
    result = attribute_edges(model, PAIR, method, progress=False)
    values = er.graddrop_values(raw(family, n_layers=3), PAIR[0], qk=method == "eap*")
    assert_close(result.per_pair[0], reference_values(result, values))
    assert result.mean_effect is None


@pytest.mark.parametrize("family", ["gpt2", "llama", "gptj", "qwen3"])
def test_exact_edge_patching_matches_reference(family):
    model = client(family)
    n_edges = len(attribute_edges(model, PAIR, "eap", progress=False).edges)
    chosen = np.random.default_rng(1).choice(n_edges, 10, replace=False)
    result = patch_edges(model, PAIR, chosen, progress=False)
    e = result.edges
    np.testing.assert_array_equal(e["edge"], chosen)
    edges = list(zip(e.upstream, e.downstream, e.input, strict=True))
    expected = np.array(er.patched_effects(raw(family), PAIR[0], edges))
    assert_close(result.per_pair[0], expected)


def test_denoising_swaps_the_roles():
    """Denoising: gradients on the noise prompt, the clean prompt's writes patched in (the
    reference with the two prompts exchanged and the same targets)."""
    family = "llama"
    result = attribute_edges(client(family), PAIR, "eap", direction="denoising", progress=False)
    clean, noise, ct, nt = PAIR[0]
    expected = reference_values(result, er.edge_values(raw(family), (noise, clean, ct, nt)))
    assert_close(result.per_pair[0], expected)
