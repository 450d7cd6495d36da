"""Every family of ``MORE_TINY_FAMILIES`` (Gemma 2/3, Qwen3, OLMo 2/3, Phi-3, GPT-J, MoE) against
the plain-PyTorch reference in ``tests/torch_reference.py``, whose written-out layers implement
each family's norms, q/k norms, softcap, rotary, windows and MLPs themselves.

Per family: the reference reproduces the model; the adapter's residual writes add up to the
layer output and equal the reference's (post-norm) definitions; exact patching, AtP, the QK fix
(query, key per position, key joint) and GradDrop equal the reference in both directions,
summed and per position; eager attention and the default implementation give the same
results; the QK fix is exact when everything after the softmax is linear; and AtP* finds the
heads planted to dominate a linearised model.
"""

from __future__ import annotations

import functools
import random
import sys
from pathlib import Path

import nnsight
import numpy as np
import pytest
import torch
from nnsight.modeling.transformers import TransformersModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch_reference as ref  # noqa: E402

from atp_nnsight.methods.atp import attribute  # noqa: E402
from atp_nnsight.methods.exact import patch, patch_sets  # noqa: E402
from atp_nnsight.models import get_adapter  # noqa: E402
from atp_nnsight.models.tiny import (  # noqa: E402
    MORE_TINY_FAMILIES,
    tiny_hf_model,
    tiny_model,
    tiny_tokenizer,
)
from atp_nnsight.types import Node  # noqa: E402

FAMILIES = MORE_TINY_FAMILIES
MOE = ("mixtral", "qwen2_moe", "olmoe")
DIRECTIONS = ("noising", "denoising")
SEED = 11
N_LAYERS = 2
SUMMED_LENGTHS = (6, 5, 6)  # two token lengths: two chunks
PER_POSITION_LENGTHS = (6, 6)
TOL = {"rtol": 1e-4, "atol": 1e-5}


def family_params(*extra: tuple) -> list:
    """``family`` parameters (crossed with ``extra``)."""
    return [(f, *e) for f in FAMILIES for e in (extra or [()])]


@functools.cache
def nn_model(family: str, attn_implementation: str | None = None):
    """The library's model: transformers' default attention, or ``attn_implementation``."""
    return tiny_model(family, n_layers=N_LAYERS, seed=SEED, attn_implementation=attn_implementation)


@functools.cache
def hf_model(family: str):
    return tiny_hf_model(family, n_layers=N_LAYERS, seed=SEED)


def kinds_of(family: str) -> tuple[str, ...]:
    return tuple(ref.sizes(hf_model(family)))


def pairs_for(family: str, per_position: bool) -> list[tuple[str, ...]]:
    lengths = PER_POSITION_LENGTHS if per_position else SUMMED_LENGTHS
    return ref.word_pairs(300 + FAMILIES.index(family), lengths)


@functools.cache
def attributed(family, method, direction, per_position, attn_implementation=None):
    return attribute(
        nn_model(family, attn_implementation),
        pairs_for(family, per_position),
        list(kinds_of(family)),
        method=method,
        per_position=per_position,
        direction=direction,
        pairs_per_chunk=2,
        progress=False,
    )


@functools.cache
def patched(family, direction, per_position, attn_implementation=None):
    return patch(
        nn_model(family, attn_implementation),
        pairs_for(family, per_position),
        list(kinds_of(family)),
        per_position=per_position,
        direction=direction,
        progress=False,
    )


def nodes_of(result) -> list[Node]:
    return [result.node(i) for i in range(len(result))]


def sample(nodes: list[Node], per_kind: int, seed: int, kinds=None) -> list[int]:
    """Indices of up to ``per_kind`` random nodes of each kind."""
    rng = random.Random(seed)
    out = []
    for kind in kinds or dict.fromkeys(n.kind for n in nodes):
        idx = [i for i, n in enumerate(nodes) if n.kind == kind]
        out.extend(sorted(rng.sample(idx, min(per_kind, len(idx)))))
    return out


def close(actual, expected, msg: str) -> None:
    torch.testing.assert_close(
        torch.as_tensor(np.asarray(actual), dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        **TOL,
        msg=lambda m: f"{msg}\n{m}",
    )


# --------------------------------------------------------------------------------------------
# the reference and the adapter's sites
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_reference_reproduces_the_model(family):
    """The written-out layers give the model's logits (under both attention implementations)
    and report every site of every layer."""
    ids = ref.pair_ids(pairs_for(family, True)[0])[0]
    for impl in (None, "eager"):
        hf = tiny_hf_model(family, n_layers=N_LAYERS, seed=SEED, attn_implementation=impl)
        seen = set()

        def record(kind, layer, x, seen=seen):
            seen.add((kind, layer))

        logits = ref.run(hf, ids, record)
        with torch.no_grad():
            expected = hf(input_ids=ids[None]).logits
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        kinds = {*kinds_of(family), "pattern"}
        assert seen == {(k, layer) for k in kinds for layer in range(N_LAYERS)}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_attention_implementation(family):
    """Gemma 2 defaults to eager (transformers refuses sdpa: it cannot softcap); the others
    to sdpa, so the default runs below exercise fused attention."""
    expected = "eager" if family == "gemma2" else "sdpa"
    assert nn_model(family)._module.config._attn_implementation == expected
    assert nn_model(family, "eager")._module.config._attn_implementation == "eager"


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_writes_add_up_to_the_layer_output(family):
    """``attn_out`` and ``mlp_out`` are what the layer adds to its input (after post-norms),
    and equal the reference's sites; q/k/v and the other sites equal the reference's too."""
    model, hf = nn_model(family), hf_model(family)
    adapter = get_adapter(model)
    kinds = kinds_of(family)
    ids = ref.pair_ids(pairs_for(family, True)[0])[0]
    with model.trace(ids[None], use_cache=False):
        got = nnsight.save([])
        for layer in range(N_LAYERS):
            raws, _ = adapter.read_layer(model, layer, kinds)
            out = adapter.layer(model, layer).output
            got.append({"out": out.detach().clone(), **{k: v.detach() for k, v in raws.items()}})
    expected = ref.cache_sites(hf, ids, {(k, layer) for k in kinds for layer in range(N_LAYERS)})
    for layer, sites in enumerate(got):
        total = sites["resid"] + sites["attn_out"] + sites["mlp_out"]
        torch.testing.assert_close(sites["out"], total, rtol=1e-5, atol=1e-5)
        for kind in kinds:
            torch.testing.assert_close(
                sites[kind], expected[(kind, layer)], rtol=1e-5, atol=1e-5, msg=kind
            )
    if family in ("gemma2", "gemma3_text", "gemma3", "olmo2", "olmo3"):
        with model.trace(ids[None], use_cache=False):
            pre_norm = adapter.layer(model, 0).self_attn.output[0].save()
        assert (pre_norm - got[0]["attn_out"]).abs().max() > 0.1  # the post-norm matters


# --------------------------------------------------------------------------------------------
# parity with the reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "direction"), family_params(*[(d,) for d in DIRECTIONS]))
def test_exact_patching_equals_reference(family, direction):
    hf = hf_model(family)
    for per_position in (False, True):
        result = patched(family, direction, per_position)
        nodes = nodes_of(result)
        idx = sample(nodes, 4 if per_position else 12, SEED)
        pairs = pairs_for(family, per_position)
        expected = [
            ref.exact_effects(hf, *ref.pair_ids(p), [[nodes[i]] for i in idx], direction)
            for p in pairs
        ]
        close(result.per_pair[:, idx], expected, f"{family} {direction} {per_position}")
        assert np.abs(expected).max() > 0.05


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_atp_equals_reference(family, direction):
    hf = hf_model(family)
    for per_position in (False, True):
        result = attributed(family, "atp", direction, per_position)
        nodes = nodes_of(result)
        expected = torch.stack(
            [
                ref.atp_estimate(hf, *ref.pair_ids(p), nodes, direction)
                for p in pairs_for(family, per_position)
            ]
        )
        for kind in kinds_of(family):
            cols = [i for i, n in enumerate(nodes) if n.kind == kind]
            close(result.per_pair[:, cols], expected[:, cols], f"{kind} {family} {direction}")
            assert expected[:, cols].abs().max() > 1e-2, kind


def qk_columns(result, per_position: bool) -> list[int]:
    """Every summed q/k node (k summed = the joint key node); per position a spread."""
    cols = [i for i, n in enumerate(nodes_of(result)) if n.kind in ("q", "k")]
    return cols if not per_position else cols[:: max(1, len(cols) // 20)]


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_qk_fix_equals_reference(family, direction):
    """Query nodes, key nodes per position and joint key nodes (all positions of a KV head)
    against patched attention patterns in the reference."""
    hf = hf_model(family)
    for per_position in (False, True):
        result = attributed(family, "atp+qk", direction, per_position)
        idx = qk_columns(result, per_position)
        nodes = [result.node(i) for i in idx]
        assert {n.kind for n in nodes} == {"q", "k"}
        expected = torch.stack(
            [
                ref.qk_fix_estimates(hf, *ref.pair_ids(p), nodes, direction)[0]
                for p in pairs_for(family, per_position)
            ]
        )
        close(result.per_pair[:, idx], expected, f"q/k {family} {direction} {per_position}")
        assert expected.abs().max() > 1e-2
        atp = attributed(family, "atp", direction, per_position)
        assert np.abs(atp.per_pair[:, idx] - result.per_pair[:, idx]).max() > 1e-3


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_graddrop_equals_reference(family, direction):
    hf = hf_model(family)
    for per_position in (False, True):
        result = attributed(family, "atp+gd", direction, per_position)
        nodes = nodes_of(result)
        pairs = pairs_for(family, per_position)
        terms = [ref.graddrop_terms(hf, *ref.pair_ids(p), nodes, direction) for p in pairs]
        expected = torch.stack([ref.graddrop_score(t, nodes) for t in terms])
        close(result.per_pair, expected, f"{family} {direction} {per_position}")
        atp = attributed(family, "atp", direction, per_position).per_pair
        assert np.abs(np.abs(atp) - result.per_pair).max() > 1e-3  # not plain |AtP|


@pytest.mark.parametrize("family", FAMILIES)
def test_atp_star_equals_reference(family):
    """QK fix under GradDrop (each dropped gradient feeds the fix); other kinds as GradDrop."""
    hf = hf_model(family)
    for direction, per_position in (("noising", True), ("denoising", False)):
        result = attributed(family, "atp*", direction, per_position)
        gd = attributed(family, "atp+gd", direction, per_position)
        idx = qk_columns(result, per_position)
        other = [i for i, n in enumerate(nodes_of(result)) if n.kind not in ("q", "k")]
        close(result.per_pair[:, other], gd.per_pair[:, other], f"{family} non-q/k")
        nodes = [result.node(i) for i in idx]
        scores = []
        for p in pairs_for(family, per_position):
            terms = ref.qk_fix_estimates(
                hf, *ref.pair_ids(p), nodes, direction, drop_layers=range(N_LAYERS)
            )
            scores.append(ref.graddrop_score(terms, nodes))
        close(result.per_pair[:, idx], torch.stack(scores), f"q/k {family} {direction}")


# --------------------------------------------------------------------------------------------
# eager attention and the default implementation agree
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_eager_and_default_attention_agree_for_atp_star(family):
    for direction, per_position in (("noising", True), ("denoising", False)):
        default = attributed(family, "atp*", direction, per_position)
        eager = attributed(family, "atp*", direction, per_position, "eager")
        close(eager.per_pair, default.per_pair, f"atp* {family} {direction}")


@pytest.mark.parametrize(("family",), family_params())
def test_eager_and_default_attention_agree_for_exact_patching(family):
    for direction, per_position in (("noising", False), ("denoising", True)):
        default = patched(family, direction, per_position)
        eager = patched(family, direction, per_position, "eager")
        close(eager.per_pair, default.per_pair, f"patch {family} {direction}")


# --------------------------------------------------------------------------------------------
# exactness on a linearised model, and planted heads
# --------------------------------------------------------------------------------------------
def linear_after_last_softmax(family: str, seed: int) -> torch.nn.Module:
    """A ``family`` model in which everything after the last layer's attention probabilities
    is linear: no final norm, no final logit softcap, no post-norms in the last layer, and a
    last MLP (every expert, the shared one too) whose output projection is zero."""
    hf = tiny_hf_model(family, n_layers=N_LAYERS, seed=seed)
    spec = ref.WRITTEN[family]
    config = hf.config.get_text_config()
    if getattr(config, "final_logit_softcapping", None) is not None:
        config.final_logit_softcapping = None
    base = hf.transformer if spec.block == "parallel" else hf.model
    base = getattr(base, "language_model", base)
    if spec.block == "parallel":
        base.ln_f = torch.nn.Identity()
    else:
        base.norm = torch.nn.Identity()
    last = ref.decoder_layers(hf)[-1]
    with torch.no_grad():
        for name, param in last.mlp.named_parameters():
            if "down_proj" in name or "fc_out" in name:
                param.zero_()
    if spec.block in ("sandwich", "post"):
        last.post_attention_layernorm = torch.nn.Identity()
        last.post_feedforward_layernorm = torch.nn.Identity()
    return hf


def wrap(hf: torch.nn.Module) -> TransformersModel:
    return TransformersModel(hf, tokenizer=tiny_tokenizer())


@pytest.mark.parametrize("family", FAMILIES)
def test_qk_fix_is_exact_when_linear_after_the_softmax(family):
    """Single query nodes, single key nodes and joint key nodes of the last layer: the QK fix
    equals exact patching (computed by the reference) when all that follows is linear, while
    plain AtP does not."""
    hf = linear_after_last_softmax(family, SEED + 1)
    model = wrap(hf)
    pairs = ref.word_pairs(17, (7, 7))
    last = [N_LAYERS - 1]
    for per_position in (False, True):
        args = dict(layers=last, per_position=per_position, progress=False)
        fixed = attribute(model, pairs, "q,k", method="atp+qk", **args)
        plain = attribute(model, pairs, "q,k", method="atp", **args)
        nodes = nodes_of(fixed)
        truth = [ref.exact_effects(hf, *ref.pair_ids(p), [[n] for n in nodes]) for p in pairs]
        assert np.abs(truth).max() > 1e-2
        np.testing.assert_allclose(fixed.per_pair, truth, rtol=1e-4, atol=2e-5)
        assert np.abs(plain.per_pair - np.asarray(truth)).max() > 1e-3


class Scaled(torch.nn.Module):
    """``factor`` times the output of ``module``."""

    def __init__(self, module: torch.nn.Module, factor: float) -> None:
        super().__init__()
        self.module, self.factor = module, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) * self.factor


LOUD = 20.0
"""How much louder the planted heads write (and how much quieter everything else)."""


def planted_heads(family: str) -> tuple[torch.nn.Module, set[int]]:
    """A linearised model (``linear_after_last_softmax``) where two heads of the last layer,
    chosen at random per family (from different KV groups where there are several), write to
    the residual stream ``LOUD``× louder, and the other heads of the last layer and all earlier
    attention and MLP writes ``LOUD``× quieter (scaled after the post-norm where there is one)."""
    hf = linear_after_last_softmax(family, SEED + 2)
    n_heads, n_kv = ref.sizes(hf)["head"], ref.sizes(hf)["k"]
    group = n_heads // n_kv
    rng = random.Random(family)
    first = rng.randrange(n_heads)
    others = [h for h in range(n_heads) if h != first]
    if n_kv > 1:
        others = [h for h in others if h // group != first // group]
    planted = {first, rng.choice(others)}
    *earlier, last = ref.decoder_layers(hf)
    post_norms = ref.WRITTEN[family].block in ("sandwich", "post")
    with torch.no_grad():
        out_proj = last.attn.out_proj if family == "gptj" else last.self_attn.o_proj
        width = out_proj.in_features // n_heads
        for h in range(n_heads):
            out_proj.weight[:, h * width : (h + 1) * width] *= LOUD if h in planted else 1 / LOUD
        for block in earlier:
            if post_norms:
                for name in ("post_attention_layernorm", "post_feedforward_layernorm"):
                    setattr(block, name, Scaled(getattr(block, name), 1 / LOUD))
                continue
            out_proj = block.attn.out_proj if family == "gptj" else block.self_attn.o_proj
            out_proj.weight /= LOUD
            for name, param in block.mlp.named_parameters():
                if "down_proj" in name or "fc_out" in name:
                    param /= LOUD
    return hf, planted


@pytest.mark.parametrize("family", FAMILIES)
def test_atp_star_top_10_contains_the_planted_heads(family):
    """Nodes: every head and MLP neuron (none in MoE models) of every layer at every position
    (800+ nodes; 48 for MoE). The planted heads at the last position, where the metric reads,
    are the top two heads by exact patching (mean |effect| over pairs, checked with the
    reference, so the construction is sound). AtP* must put both in its top 10 and rank them
    as its top two heads: a wrong head slice, position order, KV mapping, post-norm or
    GradDrop term would not."""
    hf, planted = planted_heads(family)
    model = wrap(hf)
    pairs = ref.word_pairs(23, (6, 6, 6))
    last, final = N_LAYERS - 1, 5
    kinds = [k for k in ("head", "neuron") if k in kinds_of(family)]
    result = attribute(model, pairs, kinds, method="atp*", per_position=True, progress=False)
    heads = [i for i, n in enumerate(nodes_of(result)) if n.kind == "head"]
    effects = [
        ref.exact_effects(hf, *ref.pair_ids(p), [[result.node(i)] for i in heads]) for p in pairs
    ]
    truth = np.abs(effects).mean(0)  # mean |effect| over pairs, as AtP* scores
    wanted = {Node("head", last, h, final) for h in planted}
    assert {result.node(heads[i]) for i in np.argsort(-truth)[:2]} == wanted
    top = [result.node(i) for i in np.argsort(-result.scores)[:10]]
    assert wanted <= set(top), top
    best_heads = sorted(heads, key=lambda i: -result.scores[i])[:2]
    assert {result.node(i) for i in best_heads} == wanted


# --------------------------------------------------------------------------------------------
# mixture of experts: neurons are refused with a message naming what is supported
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", MOE)
def test_moe_refuses_expert_neurons(family):
    model = nn_model(family)
    pairs = pairs_for(family, False)
    message = r"'neuron' nodes are not supported .*resid, q, k, v, head, attn_out, mlp_out"
    with pytest.raises(ValueError, match=message):
        attribute(model, pairs, "head,neuron", method="atp", progress=False)
    with pytest.raises(ValueError, match=message):
        patch(model, pairs, "neuron", progress=False)
    with pytest.raises(ValueError, match=message):
        patch_sets(model, pairs, [[Node("neuron", 0, 0)]], progress=False)
