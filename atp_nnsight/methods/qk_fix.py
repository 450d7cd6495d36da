"""QK fix of AtP* (Kramár et al. 2024, §3.2.1): recompute the attention softmax exactly.

For query and key nodes AtP* replaces the linear approximation *through* the attention softmax
by the exact change of the attention probabilities, and linearises only what comes after them
(spec ``reference/atp-star-paper-spec.md`` §4; ``DESIGN.md`` "QK fix without eager attention").
Nothing here needs eager attention: the probabilities are rebuilt from the post-rotary ``q``/``k``
that reach the attention-interface call, together with that call's ``scaling``, mask,
``sliding_window`` and ``softcap``.

Pure torch (no nnsight, no numpy, no Python loops over positions), so every function also runs
inside an nnsight trace. Every computation is done in float32 (inputs are cast with
``.float()``) on the device of the inputs, and every result is float32. No gradient is needed
through these functions; callers may pass detached tensors.

Conventions (one layer):

* ``q``: ``[B, Hq, T, D]``, ``k``/``v``: ``[B, Hkv, T, D]`` (the layout of the attention call,
  post-rotary). Grouped-query attention: ``Hq = g * Hkv`` and query head ``h`` reads KV head
  ``h // g`` (``repeat_interleave`` along dim 1, as ``repeat_kv`` in transformers).
* ``mask``: ``None`` means plain causal (plus ``sliding_window`` if given: key ``s`` is visible
  from query ``t`` iff ``t - sliding_window < s <= t``); otherwise a tensor broadcastable to
  ``[B, 1 | Hq, T, T]`` that already encodes causality/padding/window, and ``sliding_window``
  is ignored. A bool mask means True = may attend. A float mask is additive (0, or a large
  negative / ``-inf`` for masked entries); an entry counts as masked when it is ``-inf`` or
  ``<= finfo(mask.dtype).min / 2``, other values are added to the logits as a bias. A key
  length longer than ``T`` in the mask is cut to ``T`` (as transformers' eager attention does).
  With ``mask=None`` and fewer queries than keys, queries are aligned to the last keys.
* ``scores = softcap * tanh(scaling * q k^T / softcap)`` (without ``softcap`` if it is None),
  then the mask: bias added, masked entries set to :data:`MASKED` (a finite stand-in for
  ``-inf``, so that ``exp`` gives exactly 0 and no NaN appears). Probabilities of masked entries
  are exactly 0; a query row with no visible key (e.g. a left-padding position) gets an all-zero
  row (eager attention would give a uniform row there) and contributes nothing to any estimate.
* ``grad_z``: ``[B, T, Hq, D]``, gradient of the metric at the per-head attention output before
  the output projection (``Adapter.units("head", ...)`` layout).
* ``G = dM/dA``: ``[B, Hq, T, T]``, ``G[b, h, t, s] = v[b, h // g, s] . grad_z[b, t, h]``
  (``z_t = sum_s A[t, s] v_s``).
* Results per position are indexed by the *patched* position (query ``t`` for query nodes,
  key ``s`` for key nodes); key results are summed over the query heads of each KV group.
"""

from __future__ import annotations

import torch

MASKED = torch.finfo(torch.float32).min
"""Value of masked logits in :func:`attention_scores` (finite stand-in for ``-inf``)."""

__all__ = [
    "MASKED",
    "attention_grad",
    "attention_probs",
    "attention_scores",
    "key_fix",
    "key_fix_joint",
    "qk_estimates",
    "query_fix",
    "visible_keys",
]


# --------------------------------------------------------------------------------------------
# masks and scores
# --------------------------------------------------------------------------------------------
def _mask_parts(
    mask: torch.Tensor | None,
    sliding_window: int | None,
    t_q: int,
    t_k: int,
    device: torch.device,
    q_offset: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(visible, bias)``: bool visibility and float32 additive bias (or None), broadcastable
    to ``[B, Hq, t_q, t_k]``. ``q_offset``: position of the first query (default: queries
    aligned to the last keys); a tensor ``mask`` must already hold just these query rows."""
    if mask is None:
        first = t_k - t_q if q_offset is None else q_offset
        q_pos = torch.arange(t_q, device=device) + first
        k_pos = torch.arange(t_k, device=device)
        diff = q_pos[:, None] - k_pos[None, :]
        visible = diff >= 0
        if sliding_window is not None:
            visible = visible & (diff < sliding_window)
        return visible, None
    mask = mask.to(device)
    if mask.shape[-1] > t_k:
        mask = mask[..., :t_k]
    if mask.dtype == torch.bool:
        return mask, None
    threshold = torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else -(2**30)
    visible = mask > threshold
    bias = torch.where(visible, mask.float(), torch.zeros((), device=device))
    return visible, bias


def visible_keys(
    mask: torch.Tensor | None,
    t_q: int,
    t_k: int | None = None,
    sliding_window: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool ``[..., t_q, t_k]`` (broadcastable to ``[B, Hq, t_q, t_k]``): True where query ``t``
    may attend to key ``s`` under the conventions of this module (see the module docstring)."""
    t_k = t_q if t_k is None else t_k
    if device is None:
        device = mask.device if mask is not None else "cpu"
    return _mask_parts(mask, sliding_window, t_q, t_k, torch.device(device))[0]


def _raw_scores(
    q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None
) -> torch.Tensor:
    """``[B, Hq, Tq, Tk]`` float32 logits before masking (GQA without repeating k)."""
    q = q.float()
    k = k.float()
    b, n_q, t_q, d = q.shape
    n_kv, t_k = k.shape[1], k.shape[2]
    if n_q % n_kv != 0:
        raise ValueError(f"query heads ({n_q}) must be a multiple of KV heads ({n_kv})")
    g = n_q // n_kv
    # query head h = kv * g + j reads KV head kv: rows of the same group stacked along dim 2
    s = torch.matmul(q.reshape(b, n_kv, g * t_q, d), k.transpose(-1, -2))
    s = s.reshape(b, n_q, t_q, t_k) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    return s


def _scores_visible(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None,
    sliding_window: int | None,
    softcap: float | None,
    q_offset: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    s = _raw_scores(q, k, scaling, softcap)
    t_q, t_k = s.shape[-2], s.shape[-1]
    visible, bias = _mask_parts(mask, sliding_window, t_q, t_k, s.device, q_offset)
    if bias is not None:
        s = s + bias
    s = torch.where(visible, s, torch.full((), MASKED, device=s.device))
    return s, visible


def _probs_from_scores(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    # masked logits are MASKED, so exp underflows to exactly 0 unless the whole row is masked;
    # the multiplication zeroes such rows (softmax would make them uniform)
    return torch.softmax(scores, dim=-1) * visible


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Masked attention logits ``[B, Hq, T, T]`` (float32).

    ``q``: ``[B, Hq, T, D]`` post-rotary, ``k``: ``[B, Hkv, T, D]`` post-rotary (GQA: query head
    ``h`` uses KV head ``h // (Hq // Hkv)``). Logits are ``scaling * q . k``, soft-capped as
    ``softcap * tanh(x / softcap)`` if ``softcap`` is given, then the mask is applied: a float
    mask's bias is added, masked entries are set to :data:`MASKED` (finite, so that ``exp`` of
    them is exactly 0 and nothing becomes NaN). See the module docstring for ``mask`` and
    ``sliding_window``.
    """
    return _scores_visible(q, k, scaling, mask, sliding_window, softcap)[0]


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention probabilities ``A = softmax(attention_scores(...))``: ``[B, Hq, T, T]`` float32.

    Masked entries are exactly 0; a query row without any visible key is all zeros.
    """
    return _probs_from_scores(*_scores_visible(q, k, scaling, mask, sliding_window, softcap))


def attention_grad(v: torch.Tensor, grad_z: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Gradient of the metric w.r.t. the attention probabilities: ``G`` ``[B, Hq, T, T]`` float32.

    ``v``: ``[B, Hkv, T, D]`` (value at the attention call), ``grad_z``: ``[B, T, Hq, D]`` (gradient
    at the per-head output before the output projection), ``n_heads = Hq``.
    ``G[b, h, t, s] = v[b, h // g, s, :] . grad_z[b, t, h, :]`` with ``g = Hq // Hkv``, because
    ``z[b, t, h] = sum_s A[b, h, t, s] v[b, h // g, s]``.
    """
    v = v.float()
    grad_z = grad_z.float()
    b, t_q, n_q, d = grad_z.shape
    n_kv, t_k = v.shape[1], v.shape[2]
    if n_q != n_heads or n_heads % n_kv != 0:
        raise ValueError(
            f"grad_z has {n_q} heads, expected n_heads={n_heads}, a multiple of {n_kv} KV heads"
        )
    g = n_heads // n_kv
    gz = grad_z.permute(0, 2, 1, 3).reshape(b, n_kv, g * t_q, d)
    return torch.matmul(gz, v.transpose(-1, -2)).reshape(b, n_heads, t_q, t_k)


def _group_sum(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Sum ``[B, Hq, ...]`` over the query heads of each KV group -> ``[B, Hkv, ...]``."""
    return x.reshape(x.shape[0], n_kv, x.shape[1] // n_kv, *x.shape[2:]).sum(2)


# --------------------------------------------------------------------------------------------
# query nodes
# --------------------------------------------------------------------------------------------
def query_fix(
    q_clean: torch.Tensor,
    q_noise: torch.Tensor,
    k_clean: torch.Tensor,
    G: torch.Tensor,
    A: torch.Tensor | None,
    scaling: float,
    mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """QK-fixed estimate for every query node (head ``h``, position ``t``): ``[B, Hq, T]`` float32.

    ``Î_Q[t] = sum_s (A'[t, s] - A[t, s]) G[t, s]`` with ``A' = softmax(scores(q_noise, k_clean))``
    (spec §4.1). Row ``t`` of ``A'`` depends on ``q_noise[t]`` only, so one recomputed pattern
    gives every single-position query node; and since patching all query positions of a head
    changes each row exactly as patching that position alone does, ``sum over t`` of the result
    is exactly the all-positions query node of the head.

    ``q_clean``/``q_noise``: ``[B, Hq, T, D]``, ``k_clean``: ``[B, Hkv, T, D]``, ``G``: from
    :func:`attention_grad`, ``A``: clean probabilities (recomputed from ``q_clean`` if None).
    """
    if A is None:
        A = attention_probs(q_clean, k_clean, scaling, mask, sliding_window, softcap)
    A_new = attention_probs(q_noise, k_clean, scaling, mask, sliding_window, softcap)
    return ((A_new - A.float()) * G.float()).sum(-1)


# --------------------------------------------------------------------------------------------
# key nodes
# --------------------------------------------------------------------------------------------
def _leave_one_out_weights(scores: torch.Tensor, visible: torch.Tensor) -> dict[str, torch.Tensor]:
    """The G-independent half of the key fix's leave-one-out algebra, per ``(t, s)``.

    ``log_a = log A[t, s]``; ``log_loo = log L[t, s]`` with ``L = sum_{s' != s} A[t, s']`` (the
    leave-one-out mass, ``1 - a`` without cancellation); ``w1``/``w2``, ``is_max`` and ``mass``
    let :func:`_centred` form ``G[t, s] - Ḡ_{-s}[t]`` (``Ḡ_{-s}``: the mean of ``G[t, s']`` over
    ``s' != s`` weighted by ``A[t, s']``) for any ``G``.

    No cancellation and no underflow, even when one key holds almost all of the row: for ``s``
    not the row maximum, the other keys include the maximum, so their mass relative to
    ``exp(max)`` is at least 1 and removing key ``s`` (at most 1) from the row sum cancels
    nothing; for ``s`` the row maximum, the other keys are summed relative to the second largest
    logit instead, so a tiny ``L`` is kept in ``log L``. ``log L = -inf`` and the centred
    gradient is 0 where no other key is visible.
    """
    zero = torch.zeros((), device=scores.device)
    masked = torch.full((), MASKED, device=scores.device)
    m1, j = scores.max(dim=-1, keepdim=True)
    is_max = torch.arange(scores.shape[-1], device=scores.device) == j
    s_ex = torch.where(is_max, masked, scores)
    m2 = s_ex.max(dim=-1, keepdim=True).values
    w1 = torch.where(visible, torch.exp(scores - m1), zero)
    w2 = torch.where(visible & ~is_max, torch.exp(s_ex - m2), zero)
    del s_ex
    sum1 = w1.sum(-1, keepdim=True)
    # unnormalised mass of the other keys, relative to exp(m2) for the maximum, else exp(m1)
    mass = torch.where(is_max, w2.sum(-1, keepdim=True), sum1 - w1)
    ref = torch.where(is_max, m2, m1)
    has_rows = sum1 > 0
    lse = torch.where(has_rows, m1 + torch.log(torch.where(has_rows, sum1, 1.0)), zero)
    log_a = torch.where(visible, scores - lse, masked)
    log_loo = torch.log(mass) + (ref - lse)  # -inf where no other key
    return {"log_a": log_a, "log_loo": log_loo, "w1": w1, "w2": w2, "is_max": is_max, "mass": mass}


def _centred(G: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """``G[t, s] - Ḡ_{-s}[t]`` (0 where no other key is visible); see
    :func:`_leave_one_out_weights`."""
    w1, w2, is_max, mass = weights["w1"], weights["w2"], weights["is_max"], weights["mass"]
    g_sum1 = (w1 * G).sum(-1, keepdim=True)
    g_mass = torch.where(is_max, (w2 * G).sum(-1, keepdim=True), g_sum1 - w1 * G)
    has_others = mass > 0
    zero = torch.zeros((), device=G.device)
    return torch.where(has_others, G - g_mass / torch.where(has_others, mass, 1.0), zero)


def _key_coefficient(
    scores: torch.Tensor,
    scores_new: torch.Tensor,
    visible: torch.Tensor,
    weights: dict[str, torch.Tensor],
) -> torch.Tensor:
    """``Δ(t, s) / (G[t, s] - Ḡ_{-s}[t])`` of :func:`key_fix` (0 where masked), stably."""
    zero = torch.zeros((), device=scores.device)
    log_a, log_loo = weights["log_a"], weights["log_loo"]
    x = torch.where(visible, scores_new - scores, zero)
    pos = x > 0
    x_pos = torch.where(pos, x, zero)
    x_neg = torch.where(pos, zero, x)
    w_pos = -torch.expm1(-x_pos) * torch.exp(log_loo) * torch.sigmoid(log_a + x_pos - log_loo)
    w_neg = torch.expm1(x_neg) * torch.exp(log_a) * torch.sigmoid(log_loo - log_a - x_neg)
    return torch.where(visible, torch.where(pos, w_pos, w_neg), zero)


def key_fix(
    q_clean: torch.Tensor,
    k_clean: torch.Tensor,
    k_noise: torch.Tensor,
    G: torch.Tensor,
    A: torch.Tensor | None,
    scores: torch.Tensor | None,
    scaling: float,
    mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """QK-fixed estimate for every single-position key node: ``[B, Hkv, T]`` float32.

    Key node ``(kv, s)``: only ``k[kv, s]`` is patched to its noise value. Every query row ``t``
    that can see key ``s`` (given by the mask: ``t >= s`` when causal, fewer with a sliding
    window or padding) is renormalised; the estimate is
    ``sum_t sum_s' (A'_(s)[t, s'] - A[t, s']) G[t, s']`` summed over the query heads of the group
    (spec §4.2, Eqs. 9-10). Computed in ``O(T^2)`` per head with the closed form of spec §4.3:
    with ``a = A[t, s]``, ``x = S'[t, s] - S[t, s]`` (``S' = scores(q_clean, k_noise)``),
    ``L = 1 - a`` and ``Ḡ_t = sum_s' A[t, s'] G[t, s']``::

        Δ(t, s) = (a' - a) (G[t, s] - Ḡ_t) / (L + a'),    a' = a e^x.

    Evaluation (stable for ``a -> 1`` and for rows where the other keys underflow in float32,
    i.e. logit gaps beyond ~90, where a patch that lowers the dominant key has an O(1) effect):
    write ``G[t, s] - Ḡ_t = L c`` with ``c = G[t, s] - Ḡ_{-s}`` (``Ḡ_{-s}``: the A-weighted mean
    of G over the other keys) and use logs ``log a = S - logsumexp``, ``log L`` (leave-one-out
    mass, computed without cancellation; see ``_leave_one_out_weights``)::

        x > 0:   Δ = c (1 - e^-x) L sigmoid(log a + x - log L)   # spec: a(1-e^-x)(G-Ḡ)/(a+Le^-x)
        x <= 0:  Δ = c (e^x - 1) a sigmoid(log L - log a - x)    # spec: direct form

    Masked ``(t, s)`` contribute 0, and so does a row with a single visible key (``Δ = 0``, e.g.
    the first row under a causal mask).

    ``q_clean``: ``[B, Hq, T, D]``, ``k_clean``/``k_noise``: ``[B, Hkv, T, D]``, ``G``:
    ``[B, Hq, T, T]``; ``scores``: clean masked logits (:func:`attention_scores`; recomputed if
    None). ``A`` (clean probabilities) is accepted for symmetry with the other fixes but not
    used: the closed form is evaluated from the logits. No ``[B, H, T, T, D]`` tensor is formed.
    """
    del A  # evaluated from the logits (log space), see the docstring
    if scores is None:
        scores = attention_scores(q_clean, k_clean, scaling, mask, sliding_window, softcap)
    scores = scores.float()
    s_new, visible = _scores_visible(q_clean, k_noise, scaling, mask, sliding_window, softcap)
    weights = _leave_one_out_weights(scores, visible)
    delta = _key_coefficient(scores, s_new, visible, weights) * _centred(G.float(), weights)
    return _group_sum(delta.sum(-2), k_clean.shape[1])


def key_fix_joint(
    q_clean: torch.Tensor,
    k_clean: torch.Tensor,
    k_noise: torch.Tensor,
    G: torch.Tensor,
    A: torch.Tensor | None,
    scaling: float,
    mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """QK-fixed estimate for the all-positions key node of each KV head: ``[B, Hkv]`` float32.

    Every key of the head is patched at once: ``sum_t sum_s (softmax(S'')[t, s] - A[t, s]) G[t, s]``
    with ``S'' = scores(q_clean, k_noise)``, summed over the group's query heads. This is *not*
    the sum of the per-position values of :func:`key_fix`: a query row sees all of its keys
    change together and is renormalised once, and the softmax is not additive over separate
    changes to its logits (only to first order in the changes do the two agree). Conversely a
    per-key value cannot be obtained from this joint pattern (spec §4.2).
    """
    if A is None:
        A = attention_probs(q_clean, k_clean, scaling, mask, sliding_window, softcap)
    A_new = attention_probs(q_clean, k_noise, scaling, mask, sliding_window, softcap)
    per_head = ((A_new - A.float()) * G.float()).sum((-2, -1))
    return _group_sum(per_head, k_clean.shape[1])


def qk_estimates(
    q_c: torch.Tensor,
    k_c: torch.Tensor,
    v_c: torch.Tensor,
    q_n: torch.Tensor,
    k_n: torch.Tensor,
    grad_z: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    per_position: bool = True,
) -> dict[str, torch.Tensor]:
    """QK-fixed estimates of one layer's query and key nodes (clean run, noise patched in).

    Inputs as in the module docstring (``*_c`` clean, ``*_n`` noise; ``grad_z`` on the clean
    run). Returns ``{"q": [B, Hq, T], "k": [B, Hkv, T]}`` with ``per_position=True``, else
    ``{"q": [B, Hq], "k": [B, Hkv]}`` for the all-positions nodes (``q`` summed over positions,
    which is exact; ``k`` from :func:`key_fix_joint`). All float32.
    """
    scores, visible = _scores_visible(q_c, k_c, scaling, mask, sliding_window, softcap)
    A = _probs_from_scores(scores, visible)
    G = attention_grad(v_c, grad_z, q_c.shape[1])
    q_est = query_fix(q_c, q_n, k_c, G, A, scaling, mask, sliding_window, softcap)
    if per_position:
        k_est = key_fix(q_c, k_c, k_n, G, A, scores, scaling, mask, sliding_window, softcap)
        return {"q": q_est, "k": k_est}
    k_est = key_fix_joint(q_c, k_c, k_n, G, A, scaling, mask, sliding_window, softcap)
    return {"q": q_est.sum(-1), "k": k_est}


# --------------------------------------------------------------------------------------------
# one layer, many gradients, bounded memory (used by the AtP* engine)
# --------------------------------------------------------------------------------------------
QK_TEMPORARIES = {"key_per_position": 16, "other": 6}
"""float32 ``[rows, keys]`` temporaries per (batch row, query head) that :func:`layer_estimates`
holds at once: the per-position key fix, or the query / joint key fixes alone."""

QK_CHUNK_BYTES = (2**20, 2**28)
"""Bounds (bytes) of the default memory budget of :func:`layer_estimates`' temporaries."""


def default_chunk_bytes(batch: int, seq_len: int, width: int) -> int:
    """Memory budget of the QK fix's temporaries for one layer: four float32 tensors of the
    attention output's size (``batch × seq_len × width``, width = query heads × head_dim), so
    the fix never dominates a layer's own activations; clamped to :data:`QK_CHUNK_BYTES`."""
    low, high = QK_CHUNK_BYTES
    return int(min(high, max(low, 4 * 4 * batch * seq_len * width)))


def _attend(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``probs @ v`` under grouped-query attention: ``[B, Hq, Tq, Tk] × [B, Hkv, Tk, D]`` →
    ``[B, Hq, Tq, D]`` (query head ``h`` reads KV head ``h // g``)."""
    b, n_q, t_q, t_k = probs.shape
    n_kv = v.shape[1]
    out = torch.matmul(probs.reshape(b, n_kv, (n_q // n_kv) * t_q, t_k), v)
    return out.reshape(b, n_q, t_q, v.shape[-1])


def _rows_of_mask(mask: torch.Tensor | None, heads: slice, rows: slice) -> torch.Tensor | None:
    """A tensor mask restricted to query ``rows`` (and ``heads`` if it is per head)."""
    if mask is None:
        return None
    if mask.dim() == 4 and mask.shape[1] > 1:
        mask = mask[:, heads]
    return mask[..., rows, :] if mask.shape[-2] > 1 else mask


def chunk_sizes(
    batch: int, n_kv: int, group: int, t_q: int, t_k: int, max_bytes: int, temporaries: int
) -> tuple[int, int]:
    """``(KV heads per chunk, query rows per chunk)`` keeping ``temporaries`` float32
    ``[batch, heads, rows, t_k]`` tensors under ``max_bytes``."""
    per_row_head = batch * t_k * 4 * temporaries
    row_heads = max(1, max_bytes // per_row_head)
    kv_chunk = max(1, min(n_kv, row_heads // (group * t_q)))
    rows = t_q if kv_chunk * group * t_q <= row_heads else max(1, row_heads // group)
    return kv_chunk, min(rows, t_q)


def layer_estimates(
    call: dict,
    q_source: torch.Tensor | None,
    k_source: torch.Tensor | None,
    grads_z: list[torch.Tensor],
    per_position: bool,
    max_bytes: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """QK-fixed estimates of one layer's query and/or key nodes for several gradients.

    ``call``: the attention call of the base run (dict with ``q``, ``k``, ``v``, ``mask``,
    ``scaling``, ``sliding_window``, ``softcap``; see ``Adapter.iter_layer``); ``q_source`` /
    ``k_source``: the source run's post-rotary q (``[B, Hq, T, D]``) / k (``[B, Hkv, T, D]``), or
    None when that kind is not wanted; ``grads_z``: gradients at the per-head output
    ``[B, T, Hq, D]`` (one per backward, e.g. GradDrop's). The clean scores are computed once
    per chunk for all gradients; chunks of KV heads × query rows keep the temporaries under
    ``max_bytes``. Returns, per gradient, ``{"q": [B, P, Hq], "k": [B, P, Hkv]}`` float32 with
    ``P = T`` per position, else ``P = 1`` (all-positions nodes: q summed, k joint).

    The query and joint key fixes are linear in ``G = v · ∂M/∂z``, so they reduce to
    ``Σ_t ∂M/∂z_t · Δz_t`` with ``Δz = (A' - A) v`` computed once; the per-position key fix
    evaluates :func:`key_fix`'s closed form per gradient from shared weights.
    """
    q, k, v = call["q"], call["k"], call["v"]
    scaling, window, softcap = call["scaling"], call["sliding_window"], call["softcap"]
    mask = call["mask"]
    b, n_q, t_q, _ = q.shape
    n_kv, t_k = k.shape[1], k.shape[2]
    group = n_q // n_kv
    zeros = q.new_zeros
    out = []
    for _ in grads_z:
        est = {}
        if q_source is not None:
            est["q"] = zeros((b, n_q, t_q), dtype=torch.float32)
        if k_source is not None:
            est["k"] = zeros((b, n_kv, t_k if per_position else 1), dtype=torch.float32)
        out.append(est)
    if max_bytes is None:
        max_bytes = default_chunk_bytes(b, t_q, n_q * q.shape[-1])
    kind = "key_per_position" if k_source is not None and per_position else "other"
    kv_chunk, rows = chunk_sizes(b, n_kv, group, t_q, t_k, max_bytes, QK_TEMPORARIES[kind])
    for h0 in range(0, n_kv, kv_chunk):
        kv = slice(h0, min(n_kv, h0 + kv_chunk))
        hq = slice(kv.start * group, kv.stop * group)
        k_c, v_c = k[:, kv], v[:, kv].float()
        for r0 in range(0, t_q, rows):
            r = slice(r0, min(t_q, r0 + rows))
            offset = r0 + (t_k - t_q)
            m = _rows_of_mask(mask, hq, r)
            q_c = q[:, hq, r]
            scores, visible = _scores_visible(q_c, k_c, scaling, m, window, softcap, offset)
            probs = _probs_from_scores(scores, visible)
            gz = [g[:, r, hq].float().transpose(1, 2) for g in grads_z]  # [B, hq, rows, D]
            if q_source is not None:
                s_new, _ = _scores_visible(
                    q_source[:, hq, r], k_c, scaling, m, window, softcap, offset
                )
                dz = _attend(_probs_from_scores(s_new, visible) - probs, v_c)
                del s_new
                for est, g in zip(out, gz, strict=True):
                    est["q"][:, hq, r] = (dz * g).sum(-1)
            if k_source is not None:
                s_new, _ = _scores_visible(
                    q_c, k_source[:, kv], scaling, m, window, softcap, offset
                )
                if per_position:
                    weights = _leave_one_out_weights(scores, visible)
                    coef = _key_coefficient(scores, s_new, visible, weights)
                    del s_new
                    for est, g in zip(out, gz, strict=True):
                        G = _attend_grad(g, v_c)
                        delta = coef * _centred(G, weights)
                        est["k"][:, kv] += _group_sum(delta.sum(-2), kv.stop - kv.start)
                else:
                    dz = _attend(_probs_from_scores(s_new, visible) - probs, v_c)
                    del s_new
                    for est, g in zip(out, gz, strict=True):
                        per_head = (dz * g).sum((-2, -1))  # [B, hq]
                        est["k"][:, kv, 0] += _group_sum(per_head, kv.stop - kv.start)
    for est in out:
        if "q" in est:
            q_est = est["q"].transpose(1, 2)  # [B, T, Hq]
            est["q"] = q_est if per_position else q_est.sum(1, keepdim=True)
        if "k" in est:
            est["k"] = est["k"].transpose(1, 2)  # [B, P, Hkv]
    return out


def _attend_grad(grad_z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``G[b, h, t, s] = grad_z[b, h, t] · v[b, h // g, s]``: ``[B, Hq, Tq, D]`` and
    ``[B, Hkv, Tk, D]`` → ``[B, Hq, Tq, Tk]`` (:func:`attention_grad` with ``grad_z``
    transposed)."""
    b, n_q, t_q, d = grad_z.shape
    n_kv = v.shape[1]
    g = torch.matmul(grad_z.reshape(b, n_kv, (n_q // n_kv) * t_q, d), v.transpose(-1, -2))
    return g.reshape(b, n_q, t_q, v.shape[2])
