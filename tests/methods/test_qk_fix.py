"""Tests of the QK fix (atp_nnsight.methods.qk_fix) against float64 brute force and eager attention.

References here are written independently of the module: explicit bool visibility matrices,
``repeat_interleave`` for grouped-query attention, and one recomputed softmax per patched
position (naive O(T^3)).
"""

from __future__ import annotations

import sys

import pytest
import torch
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from atp_nnsight.methods import qk_fix as qf

B, HQ, HKV, T, D = 2, 4, 2, 7, 8
GROUP = HQ // HKV


# --------------------------------------------------------------------------------------------
# float64 references
# --------------------------------------------------------------------------------------------
def causal(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril()


def window(t: int, w: int) -> torch.Tensor:
    i = torch.arange(t)
    diff = i[:, None] - i[None, :]
    return (diff >= 0) & (diff < w)


def ref_probs(q, k, scaling, visible, bias=None, softcap=None):
    """float64 softmax with explicit visibility; all-masked rows are 0."""
    q = q.double()
    k = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = scaling * (q @ k.transpose(-1, -2))
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.double()
    s = s.masked_fill(~visible, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


def ref_grad(v, grad_z):
    v = v.double().repeat_interleave(grad_z.shape[2] // v.shape[1], dim=1)  # [B, Hq, T, D]
    return torch.einsum("bthd,bhsd->bhts", grad_z.double(), v)


def linear_readout(A, v, grad_z):
    """Per-head metric M_h = sum_t grad_z[t, h] . z[t, h] with z = A V: ``[B, Hq]`` (float64)."""
    v = v.double().repeat_interleave(A.shape[1] // v.shape[1], dim=1)
    z = A.double() @ v  # [B, Hq, T, D]
    return torch.einsum("bhtd,bthd->bh", z, grad_z.double())


def group_sum(x):
    return x.reshape(x.shape[0], HKV, GROUP, *x.shape[2:]).sum(2)


def naive_key_fix(q, k_c, k_n, G, scaling, visible, bias=None, softcap=None):
    """Per key s: patch k[:, :, s] (all KV heads), recompute the whole pattern; [B, Hkv, T]."""
    A = ref_probs(q, k_c, scaling, visible, bias, softcap)
    out = torch.zeros(q.shape[0], k_c.shape[1], k_c.shape[2], dtype=torch.float64)
    for s in range(k_c.shape[2]):
        k_p = k_c.clone()
        k_p[:, :, s] = k_n[:, :, s]
        A_p = ref_probs(q, k_p, scaling, visible, bias, softcap)
        out[:, :, s] = group_sum(((A_p - A) * G.double()).sum((-2, -1)))
    return out


def rel_err(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).abs().max() / ref.abs().max()).item()


# --------------------------------------------------------------------------------------------
# inputs and mask cases
# --------------------------------------------------------------------------------------------
def make_inputs(seed=0, t=T, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    q_c = r(B, HQ, t, D, scale=q_scale)
    k_c = r(B, HKV, t, D)
    return {
        "q_c": q_c,
        "k_c": k_c,
        "v_c": r(B, HKV, t, D),
        "q_n": q_c + r(B, HQ, t, D, scale=q_scale),
        "k_n": k_c + r(B, HKV, t, D, scale=1.5),
        "grad_z": r(B, t, HQ, D),
    }


def mask_case(name, t=T):
    """(mask, sliding_window, softcap, visible [B|1, Hq|1, T, T], bias or None) for a case."""
    cz = causal(t)[None, None]
    if name == "causal":
        return None, None, None, cz, None
    if name == "window_none":
        return None, 3, None, window(t, 3)[None, None], None
    if name == "window_bool_padded":
        vis = window(t, 3)[None, None].repeat(B, 1, 1, 1)
        vis[1, :, :, :2] = False  # batch row 1 left-padded by 2: rows 0, 1 fully masked
        # sliding_window must be ignored when a mask is given
        return vis, 2, None, vis, None
    if name == "float_bias_per_head":
        g = torch.Generator().manual_seed(1)
        bias = torch.randn(B, HQ, t, t, generator=g) * 0.5
        vis = cz.expand(B, HQ, t, t)
        mask = torch.where(vis, bias, torch.finfo(torch.float32).min)
        return mask, None, None, vis, torch.where(vis, bias, 0.0)
    if name == "float_inf":
        mask = torch.zeros(1, 1, t, t).masked_fill(~cz, float("-inf"))
        return mask, None, None, cz, None
    if name == "float16_mask":
        mask = torch.zeros(1, 1, t, t).masked_fill(~cz, torch.finfo(torch.float16).min).half()
        return mask, None, None, cz, None
    if name == "softcap":
        return None, None, 2.0, cz, None
    if name == "softcap_window_float":
        vis = window(t, 4)[None, None]
        mask = torch.zeros(1, 1, t, t).masked_fill(~vis, torch.finfo(torch.float32).min)
        return mask, None, 3.0, vis, None
    raise KeyError(name)


CASES = [
    "causal",
    "window_none",
    "window_bool_padded",
    "float_bias_per_head",
    "float_inf",
    "float16_mask",
    "softcap",
    "softcap_window_float",
]
SCALING = 0.9  # > D**-0.5 so that softcap and saturation matter a little more


# --------------------------------------------------------------------------------------------
# scores, probabilities, gradient
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_probs_match_reference(case):
    x = make_inputs()
    mask, sw, cap, vis, bias = mask_case(case)
    probs = qf.attention_probs(x["q_c"], x["k_c"], SCALING, mask, sw, cap)
    assert probs.dtype == torch.float32 and probs.shape == (B, HQ, T, T)
    ref = ref_probs(x["q_c"], x["k_c"], SCALING, vis, bias, cap)
    assert (probs.double() - ref).abs().max() <= 1e-6
    vis_full = vis.expand(B, HQ, T, T)
    assert (probs[~vis_full] == 0).all()
    rows = vis_full.any(-1)
    assert torch.allclose(probs.sum(-1)[rows], torch.ones(()), atol=1e-6)
    assert (probs.sum(-1)[~rows] == 0).all()
    scores = qf.attention_scores(x["q_c"], x["k_c"], SCALING, mask, sw, cap)
    assert torch.isfinite(scores).all()
    assert (scores[~vis_full] == qf.MASKED).all()


def test_gqa_uses_repeat_interleave():
    x = make_inputs()
    probs = qf.attention_probs(x["q_c"], x["k_c"], SCALING)
    # head 1 reads KV head 0 (1 // 2), not KV head 1 (1 % 2)
    ref0 = ref_probs(x["q_c"][:, 1:2], x["k_c"][:, 0:1], SCALING, causal(T))
    assert (probs[:, 1:2].double() - ref0).abs().max() <= 1e-6
    ref1 = ref_probs(x["q_c"][:, 1:2], x["k_c"][:, 1:2], SCALING, causal(T))
    assert (probs[:, 1:2].double() - ref1).abs().max() > 1e-2


def test_attention_grad():
    x = make_inputs()
    G = qf.attention_grad(x["v_c"], x["grad_z"], HQ)
    assert G.dtype == torch.float32 and G.shape == (B, HQ, T, T)
    assert (G.double() - ref_grad(x["v_c"], x["grad_z"])).abs().max() <= 1e-5
    with pytest.raises(ValueError):
        qf.attention_grad(x["v_c"], x["grad_z"], HQ + 1)


# --------------------------------------------------------------------------------------------
# query fix
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_query_fix_is_exact_when_linear_after_A(case):
    x = make_inputs()
    mask, sw, cap, vis, bias = mask_case(case)
    A = qf.attention_probs(x["q_c"], x["k_c"], SCALING, mask, sw, cap)
    G = qf.attention_grad(x["v_c"], x["grad_z"], HQ)
    got = qf.query_fix(x["q_c"], x["q_n"], x["k_c"], G, A, SCALING, mask, sw, cap)
    assert got.dtype == torch.float32 and got.shape == (B, HQ, T)

    A_ref = ref_probs(x["q_c"], x["k_c"], SCALING, vis, bias, cap)
    M_clean = linear_readout(A_ref, x["v_c"], x["grad_z"])
    G_ref = ref_grad(x["v_c"], x["grad_z"])
    brute = torch.zeros(B, HQ, T, dtype=torch.float64)
    row_loop = torch.zeros(B, HQ, T, dtype=torch.float64)
    for t in range(T):
        # literally patch q at position t (all heads; heads do not interact) and rerun
        q_p = x["q_c"].clone()
        q_p[:, :, t] = x["q_n"][:, :, t]
        A_p = ref_probs(q_p, x["k_c"], SCALING, vis, bias, cap)
        brute[:, :, t] = linear_readout(A_p, x["v_c"], x["grad_z"]) - M_clean
        # recompute row t only
        row = ref_probs(x["q_n"][:, :, t : t + 1], x["k_c"], SCALING, vis[..., t : t + 1, :],
                        None if bias is None else bias[..., t : t + 1, :], cap)  # fmt: skip
        row_loop[:, :, t] = ((row - A_ref[:, :, t : t + 1]) * G_ref[:, :, t : t + 1]).sum((-2, -1))
    assert rel_err(got, brute) <= 1e-5
    assert rel_err(got, row_loop) <= 1e-5
    # all positions patched at once == sum over positions (rows are independent)
    A_all = ref_probs(x["q_n"], x["k_c"], SCALING, vis, bias, cap)
    all_pos = linear_readout(A_all, x["v_c"], x["grad_z"]) - M_clean
    assert rel_err(got.sum(-1), all_pos) <= 1e-5


# --------------------------------------------------------------------------------------------
# key fix
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_key_fix_matches_naive_loop(case):
    x = make_inputs()
    mask, sw, cap, vis, bias = mask_case(case)
    scores = qf.attention_scores(x["q_c"], x["k_c"], SCALING, mask, sw, cap)
    A = qf.attention_probs(x["q_c"], x["k_c"], SCALING, mask, sw, cap)
    G = qf.attention_grad(x["v_c"], x["grad_z"], HQ)
    got = qf.key_fix(x["q_c"], x["k_c"], x["k_n"], G, A, scores, SCALING, mask, sw, cap)
    assert got.dtype == torch.float32 and got.shape == (B, HKV, T)
    ref = naive_key_fix(x["q_c"], x["k_c"], x["k_n"], G, SCALING, vis, bias, cap)
    assert rel_err(got, ref) <= 1e-6
    # the exact effect of patching key s with a linear readout after A is the same number
    M_clean = linear_readout(ref_probs(x["q_c"], x["k_c"], SCALING, vis, bias, cap),
                             x["v_c"], x["grad_z"])  # fmt: skip
    s = 3
    k_p = x["k_c"].clone()
    k_p[:, :, s] = x["k_n"][:, :, s]
    exact = linear_readout(ref_probs(x["q_c"], k_p, SCALING, vis, bias, cap), x["v_c"], x["grad_z"])
    assert rel_err(got[:, :, s], group_sum(exact - M_clean)) <= 1e-5
    # A and scores are optional (recomputed)
    again = qf.key_fix(x["q_c"], x["k_c"], x["k_n"], G, None, None, SCALING, mask, sw, cap)
    assert torch.allclose(again, got, rtol=0, atol=1e-6)


def textbook_key_fix(q, k_c, k_n, G, scaling):
    """The closed form of spec §4.3 evaluated naively in float32 (stable branch for x > 0, but
    ``1 - a`` as row sum minus ``a`` and ``G - Ḡ`` directly): the saturated test must reject it."""
    A = qf.attention_probs(q, k_c, scaling)
    S = qf.attention_scores(q, k_c, scaling)
    vis = causal(q.shape[2])
    x = torch.where(vis, qf.attention_scores(q, k_n, scaling) - S, 0.0)
    loo = A.sum(-1, keepdim=True) - A
    c = G - (A * G).sum(-1, keepdim=True)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    d_pos = A * -torch.expm1(-xp) * c / (A + loo * torch.exp(-xp))
    d_neg = A * torch.expm1(xn) * c / (loo + A * torch.exp(xn))
    d = torch.where(vis, torch.where(x > 0, d_pos, d_neg), 0.0).nan_to_num()
    return group_sum(d.sum(-2))


@pytest.mark.parametrize("mult", [10, 50])
def test_key_fix_saturated_rows(mult):
    """Scores scaled up: some A[t, s] ~ 1 - 1e-7 and, at x50, rows whose other keys underflow in
    float32 (logit gaps > 100) while the patch moves the dominant key by hundreds; compare with
    the float64 brute force."""
    x = make_inputs(seed=3)
    scaling = mult * SCALING
    A_ref = ref_probs(x["q_c"], x["k_c"], scaling, causal(T))
    loo = (A_ref.sum(-1, keepdim=True) - A_ref)[A_ref > 0.5]  # 1 - a in float64
    assert ((loo > 1e-9) & (loo < 1e-6)).any(), "test does not reach the saturated regime"
    G = qf.attention_grad(x["v_c"], x["grad_z"], HQ)
    A = qf.attention_probs(x["q_c"], x["k_c"], scaling)
    scores = qf.attention_scores(x["q_c"], x["k_c"], scaling)
    got = qf.key_fix(x["q_c"], x["k_c"], x["k_n"], G, A, scores, scaling)
    ref = naive_key_fix(x["q_c"], x["k_c"], x["k_n"], G, scaling, causal(T))
    assert torch.isfinite(got).all()

    def err(est):  # per position, relative to the largest effect in the same (batch, KV head)
        return ((est.double() - ref).abs() / ref.abs().amax(-1, keepdim=True)).max().item()

    # float32 logits of magnitude ~100s carry ~1e-5 absolute error, hence the tolerance
    assert err(got) <= 1e-5
    # the check has teeth: the naive float32 evaluation of the same closed form fails it
    assert err(textbook_key_fix(x["q_c"], x["k_c"], x["k_n"], G, scaling)) > 1e-2


def test_key_fix_first_row_and_single_key():
    x = make_inputs()
    G = qf.attention_grad(x["v_c"], x["grad_z"], HQ)
    G_row0 = torch.zeros_like(G)
    G_row0[:, :, 0] = G[:, :, 0]  # only query row 0 matters: one visible key, no effect
    for Gx in (G, G_row0):
        k = qf.key_fix(x["q_c"], x["k_c"], x["k_n"], Gx, None, None, SCALING)
        q = qf.query_fix(x["q_c"], x["q_n"], x["k_c"], Gx, None, SCALING)
        assert torch.isfinite(k).all() and torch.isfinite(q).all()
    assert (qf.key_fix(x["q_c"], x["k_c"], x["k_n"], G_row0, None, None, SCALING) == 0).all()
    assert (qf.query_fix(x["q_c"], x["q_n"], x["k_c"], G_row0, None, SCALING) == 0).all()
    # a single position: every estimate is exactly 0 and finite
    one = {n: (t[:, :, :1] if n != "grad_z" else t[:, :1]) for n, t in x.items()}
    for per_position in (True, False):
        est = qf.qk_estimates(*(one[n] for n in ("q_c", "k_c", "v_c", "q_n", "k_n", "grad_z")),
                              SCALING, per_position=per_position)  # fmt: skip
        assert all((v == 0).all() for v in est.values())
    # a huge logit change at a saturated single-key row stays finite
    big = qf.key_fix(x["q_c"], x["k_c"], x["k_n"] * 1e4, G, None, None, SCALING)
    assert torch.isfinite(big).all()


@pytest.mark.parametrize("case", ["causal", "window_bool_padded", "softcap_window_float"])
def test_key_fix_joint(case):
    x = make_inputs()
    mask, sw, cap, vis, bias = mask_case(case)
    G = qf.attention_grad(x["v_c"], x["grad_z"], HQ)
    got = qf.key_fix_joint(x["q_c"], x["k_c"], x["k_n"], G, None, SCALING, mask, sw, cap)
    assert got.dtype == torch.float32 and got.shape == (B, HKV)
    A = ref_probs(x["q_c"], x["k_c"], SCALING, vis, bias, cap)
    A_all = ref_probs(x["q_c"], x["k_n"], SCALING, vis, bias, cap)
    ref = group_sum(((A_all - A) * G.double()).sum((-2, -1)))
    assert rel_err(got, ref) <= 1e-5
    # the joint node is not the sum of per-key nodes: each row is renormalised once for all
    # changed logits, and the softmax is not additive over separate logit changes
    per_key = qf.key_fix(x["q_c"], x["k_c"], x["k_n"], G, None, None, SCALING, mask, sw, cap)
    assert (per_key.sum(-1) - got).abs().max() > 1e-2 * got.abs().max()


def test_qk_estimates():
    x = make_inputs()
    mask, sw, cap, _, _ = mask_case("softcap_window_float")
    args = [x[n] for n in ("q_c", "k_c", "v_c", "q_n", "k_n", "grad_z")]
    per = qf.qk_estimates(*args, SCALING, mask, sw, cap, per_position=True)
    coarse = qf.qk_estimates(*args, SCALING, mask, sw, cap, per_position=False)
    assert per["q"].shape == (B, HQ, T) and per["k"].shape == (B, HKV, T)
    assert coarse["q"].shape == (B, HQ) and coarse["k"].shape == (B, HKV)
    G = qf.attention_grad(x["v_c"], x["grad_z"], HQ)
    q = qf.query_fix(x["q_c"], x["q_n"], x["k_c"], G, None, SCALING, mask, sw, cap)
    k = qf.key_fix(x["q_c"], x["k_c"], x["k_n"], G, None, None, SCALING, mask, sw, cap)
    kj = qf.key_fix_joint(x["q_c"], x["k_c"], x["k_n"], G, None, SCALING, mask, sw, cap)
    assert torch.allclose(per["q"], q, atol=1e-6) and torch.allclose(per["k"], k, atol=1e-6)
    assert torch.allclose(coarse["q"], q.sum(-1), atol=1e-6)
    assert torch.allclose(coarse["k"], kj, atol=1e-6)


def test_half_precision_inputs_give_float32():
    x = make_inputs()
    h = {n: t.to(torch.bfloat16) for n, t in x.items()}
    args = [h[n] for n in ("q_c", "k_c", "v_c", "q_n", "k_n", "grad_z")]
    est = qf.qk_estimates(*args, SCALING)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in est.values())


# --------------------------------------------------------------------------------------------
# recomputed probabilities == eager attention of real (tiny, random) transformers models
# --------------------------------------------------------------------------------------------
def _configs():
    small = dict(hidden_size=32, intermediate_size=64, vocab_size=50)
    return {
        "llama": transformers.LlamaConfig(
            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, **small
        ),
        "mistral": transformers.MistralConfig(
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=3,
            **small,
        ),  # fmt: skip
        "gpt2": transformers.GPT2Config(n_layer=1, n_head=4, n_embd=32, vocab_size=50),
        "gemma2": transformers.Gemma2Config(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=3,
            attn_logit_softcapping=5.0,
            query_pre_attn_scalar=16,
            **small,
        ),  # fmt: skip
    }


def _record(monkeypatch, model, impl, ids, attention_mask, replay=None):
    """Run ``model`` with attention function ``impl`` wrapped to record its inputs/outputs.

    ``impl``: "eager" (float additive masks), "sdpa" (bool masks) or "nomask" (no mask
    function registered: the call gets ``mask=None`` plus ``sliding_window``, as under flash
    attention). "nomask" returns the outputs of the recorded eager run ``replay`` (eager
    attention with mask None would attend to the future and change the later layers).
    """
    calls = []

    def recorder(module, query, key, value, attention_mask, *args, **kwargs):
        if impl == "sdpa":
            out, w = sdpa_attention_forward(module, query, key, value, attention_mask, *args,
                                            **kwargs)  # fmt: skip
        elif impl == "nomask":
            out, w = replay[len(calls)]["out"], None
        else:
            eager = sys.modules[type(module).__module__].eager_attention_forward
            out, w = eager(module, query, key, value, attention_mask, *args, **kwargs)
        calls.append({"q": query, "k": key, "mask": attention_mask, "kw": kwargs, "w": w})
        calls[-1]["out"] = out
        return out, w

    name = f"atp_qk_test_{impl}"
    monkeypatch.setitem(AttentionInterface._global_mapping, name, recorder)
    if impl != "nomask":
        masks = {"eager": eager_mask, "sdpa": sdpa_mask}
        monkeypatch.setitem(AttentionMaskInterface._global_mapping, name, masks[impl])
    model.set_attn_implementation(name)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention_mask)
    return calls


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2", "gemma2"])
def test_probs_match_eager_attention(monkeypatch, family):
    torch.manual_seed(0)
    config = _configs()[family]
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.eval()
    ids = torch.randint(0, 50, (2, 9))
    padded = torch.ones(2, 9, dtype=torch.long)
    padded[1, :2] = 0  # left padding in batch row 1

    impls = ["eager", "nomask"] + ([] if family == "gemma2" else ["sdpa"])
    for impl in impls:
        am = torch.ones_like(padded) if impl == "nomask" else padded
        eager_calls = _record(monkeypatch, model, "eager", ids, am)
        calls = eager_calls
        if impl != "eager":
            calls = _record(monkeypatch, model, impl, ids, am, replay=eager_calls)
        assert len(calls) == len(eager_calls) == config.num_hidden_layers
        for call, ref in zip(calls, eager_calls, strict=True):
            kw = call["kw"]
            if impl == "nomask":
                assert call["mask"] is None
            elif impl == "sdpa" and call["mask"] is not None:
                assert call["mask"].dtype == torch.bool
            probs = qf.attention_probs(
                call["q"], call["k"], kw["scaling"], call["mask"], kw.get("sliding_window"),
                kw.get("softcap"),
            )  # fmt: skip
            w = ref["w"]
            # rows with no visible key (left padding) are 0 here, uniform in eager attention
            live = am.bool()[:, None, :, None].expand_as(w)
            assert (probs - w)[live].abs().max() <= 1e-6, (family, impl)
            assert (probs.sum(-1)[~live[..., 0]] == 0).all()
            if kw.get("sliding_window") and impl == "eager":
                assert (w[0, :, -1, : -kw["sliding_window"]] == 0).all()  # window really applied
