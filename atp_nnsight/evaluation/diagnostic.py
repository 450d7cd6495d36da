"""The false-negative diagnostic: bound the effects AtP* may have missed (paper §3.3; spec §9).

**Reconstructed procedure.** The paper's exact statistic and confidence level could not be
read; this module implements the procedure of spec §9, which is consistent with what is known
(the diagnostic "patches random subsets outside the top-ranked set" and reuses the Algorithm-1
included/excluded subset statistic). Every choice below is also recorded in
``Diagnosis.metadata["choices"]``.

Inputs: a ranking result (AtP* or any AtP-family result), the verified set ``Vf`` (its top
nodes, verified with exact patching) and the unverified set ``U = N \\ Vf``.

1. **Prediction.** ``Î(n)`` = a *signed* estimate, mean over pairs. AtP* (GradDrop) scores are
   unsigned, so by default the signed AtP+QK-fix estimate is used: taken from ``result`` if
   it is signed (``result.mean_effect`` is not ``None``), else computed with
   ``attribute(..., method="atp+qk")`` on the same nodes and pairs (cost: 2 forwards + 1
   backward = 4 forward-pass equivalents per pair), or given as ``estimate=``.
2. **Subsets.** ``M`` subsets ``η_j ⊂ U``, each node included independently with probability
   ``p`` (uniform ``p``; seeded). Each non-empty subset is patched as a whole once per pair
   (:func:`~atp_nnsight.methods.exact.patch_sets`: one forward per pair, plus two unpatched
   forwards per pair per session). Empty subsets have ``I(∅) = 0`` and cost nothing.
3. **Residuals.** ``R_j = I(η_j) − Σ_{n∈η_j} Î(n)`` with ``I`` and ``Î`` averaged over pairs
   (the ground truth ranks by ``|mean_pairs I(n)|``). By linearity this equals the pair-mean
   of the per-pair residuals.
4. **Per-node statistic** (Algorithm 1 on residuals):
   ``r̂(n) = mean_{j∋n} R_j − mean_{j∌n} R_j``; under the additive model
   ``I(η) = Σ_{n∈η} I(n) + ε`` its expectation is ``I(n) − Î(n)``, so ``Ĩ(n) = Î(n) + r̂(n)``
   estimates ``I(n)``. ``se(n) = sd(R) · sqrt(1/|{j∋n}| + 1/|{j∌n}|)`` with ``sd`` the
   sample standard deviation (ddof 1) of all ``R_j`` (pooled, so conservative: it includes the
   node's own contribution), and ``se = ∞`` for a node that is in no subset or in all.
5. **Decision.** Normal approximation, two-sided, Bonferroni over ``U``:
   ``z = Φ⁻¹(1 − δ / (2|U|))``. Flag ``n`` (suspected false negative) if
   ``|Ĩ(n)| − z·se(n) > θ``. Upper bound on the largest remaining effect, at simultaneous
   confidence ``1 − δ``: ``θ_max = max_{n∈U} |Ĩ(n)| + z·se(n)``. Stopping rule for
   verification: stop once ``θ_max < θ`` (:func:`should_stop`).
6. **Residual error summary**: mean, standard deviation and mean ``|R|``; the fraction of the
   subset-effect variance the prediction explains; ``Σ_{n∈U} (I(n) − Î(n))² ≈ Var(R) /
   (p(1 − p))`` (additive model) and its per-node RMS; the least-squares slope of ``|R_j|``
   against subset size (interactions make it grow faster than ``sqrt(size)``).

Defaults (engineering choices, not the paper's): ``n_subsets = 200``; ``p = min(0.5, 20 / M)``
(under the additive model ``se² ≈ Σ_U (I − Î)² / M`` whatever ``p``, while interaction bias
grows with ``p`` — spec §7.2 — so ``p`` is as small as keeps each node in ~20 subsets);
``θ = 0.1 · max |exact effect|`` over the verified nodes (no missed node with a tenth of the
strongest verified effect). Caveats (spec §12.2): interactions bias ``r̂`` by about
``p · Σ_{n'} J(n, n')``; only single-node effects are bounded; power is limited by
``z · sd(R) / sqrt(M p (1 − p))``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from atp_nnsight.methods.atp import attribute
from atp_nnsight.methods.common import prepare_pairs
from atp_nnsight.methods.exact import patch_sets
from atp_nnsight.metrics import Metric
from atp_nnsight.remote import Remote
from atp_nnsight.results import NODE_COLUMNS, Attribution
from atp_nnsight.types import check_direction

from .recall import align
from .verify import resolve_result_metric, result_layout, verify

DEFAULT_SUBSETS = 200
MEAN_INCLUSIONS = 20
"""Default ``p = min(0.5, MEAN_INCLUSIONS / n_subsets)``: each node in ~20 subsets."""
THETA_FRACTION = 0.1
"""Default ``θ = THETA_FRACTION · max |exact effect|`` over the verified nodes."""
ESTIMATE_METHOD = "atp+qk"

CHOICES = {
    "procedure": "spec §9 reconstruction (paper §3.3; exact statistic not verified)",
    "prediction": "signed estimate Î(n), mean over pairs (atp+qk unless the result is signed)",
    "sampling": "η_j: each unverified node independently with probability p (uniform), seeded",
    "residual": "R_j = mean_pairs I(η_j) − Σ_{n∈η_j} mean_pairs Î(n) (= mean of per-pair R_j)",
    "statistic": "r̂(n) = mean_{j∋n} R_j − mean_{j∌n} R_j; corrected Ĩ(n) = Î(n) + r̂(n)",
    "standard_error": "se(n) = sd(R, ddof=1) · sqrt(1/n_in + 1/n_out); inf if n_in or n_out = 0",
    "z": "z = Φ⁻¹(1 − δ/(2|U|)): normal approximation, two-sided, Bonferroni over U",
    "flag": "|Ĩ(n)| − z·se(n) > θ",
    "bound": "max_U |Ĩ(n)| + z·se(n), simultaneous confidence 1 − δ under the additive model",
    "stopping_rule": "stop verifying once bound < θ",
    "p_default": f"min(0.5, {MEAN_INCLUSIONS} / n_subsets)",
    "theta_default": f"{THETA_FRACTION} · max |exact mean effect| over the verified nodes",
    "ground_truth": "|mean over pairs of the exact effect|",
    "assumptions": "additive model I(η) = Σ I(n) + ε; pairwise interactions bias r̂ by "
    "≈ p·Σ J(n, n'); joint-only effects are not bounded",
}


@dataclass
class Diagnosis:
    """Outcome of :func:`diagnose`.

    ``nodes`` has one row per unverified node: ``node`` (row of the result's node table),
    ``kind, layer, index, position``, ``label``, the method's ``rank`` and ``score``, the
    signed ``estimate`` ``Î``, the ``correction`` ``r̂``, ``corrected = Î + r̂``, ``se``,
    ``n_in`` / ``n_out`` (subsets containing / not containing the node), ``lower`` / ``upper``
    (``|corrected| ∓ z·se``) and ``flagged``. ``subsets`` has one row per subset: ``size``,
    ``effect`` (exact, mean over pairs), ``predicted`` and ``residual``. ``members[j]`` lists
    subset ``j``'s nodes; ``subset_per_pair[p, j]`` is its exact effect on pair ``p``.
    ``cost`` is in forward-pass equivalents, summed over pairs.
    """

    nodes: pd.DataFrame
    bound: float
    theta: float
    delta: float
    z: float
    p: float
    n_subsets: int
    subsets: pd.DataFrame
    residual: dict[str, float]
    cost: float
    cost_breakdown: dict[str, float]
    verified: np.ndarray
    members: list[np.ndarray] = field(repr=False)
    subset_per_pair: np.ndarray = field(repr=False)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def flagged(self) -> pd.DataFrame:
        """Suspected false negatives, most certain first (descending ``lower``)."""
        return self.nodes[self.nodes["flagged"]].sort_values("lower", ascending=False)

    @property
    def stop(self) -> bool:
        """The stopping rule: ``bound < theta``."""
        return should_stop(self)

    @property
    def bound_node(self) -> int | None:
        """The node attaining the bound (row of the result's node table)."""
        if len(self.nodes) == 0:
            return None
        return int(self.nodes["node"].iloc[int(np.argmax(self.nodes["upper"].to_numpy()))])

    def to_dataframe(self) -> pd.DataFrame:
        """The per-node table (a copy), ranked by the method's order."""
        return self.nodes.sort_values("rank").reset_index(drop=True)

    def with_threshold(self, theta: float | None = None, delta: float | None = None) -> Diagnosis:
        """The same subsets re-evaluated with another ``θ`` and/or ``δ`` (no new forwards)."""
        theta = self.theta if theta is None else float(theta)
        delta = self.delta if delta is None else float(delta)
        stats = _statistics(
            self.nodes["estimate"].to_numpy(dtype=np.float64),
            self.nodes["node"].to_numpy(),
            self.members,
            self.subsets["effect"].to_numpy(dtype=np.float64),
            delta,
            theta,
        )
        nodes = self.nodes.copy()
        for key in ("correction", "corrected", "se", "lower", "upper", "flagged"):
            nodes[key] = stats[key]
        meta = {**self.metadata, "theta": theta, "delta": delta}
        return replace(
            self,
            nodes=nodes,
            theta=theta,
            delta=delta,
            z=stats["z"],
            bound=stats["bound"],
            metadata=meta,
        )

    def summary(self, max_rows: int = 10) -> str:
        """A human-readable report: bound, decision, flagged nodes, residuals, cost."""
        n_u = len(self.nodes)
        lines = [
            f"false-negative diagnostic (spec §9 reconstruction): |U| = {n_u} unverified "
            f"nodes ({len(self.verified)} verified), M = {self.n_subsets} subsets, "
            f"p = {self.p:.4g}, delta = {self.delta:g} (z = {self.z:.3f})",
        ]
        bn = self.bound_node
        where = "" if bn is None else f" (node {self.nodes.set_index('node').loc[bn, 'label']})"
        lines.append(
            f"upper bound on the largest unverified |effect| at confidence "
            f"{1 - self.delta:.0%}: {self.bound:.4g}{where}"
        )
        decision = "stop verifying" if self.stop else "keep verifying"
        rel = "<" if self.stop else ">="
        lines.append(f"threshold theta = {self.theta:.4g}: bound {rel} theta -> {decision}")
        flagged = self.flagged
        lines.append(f"suspected false negatives (flagged): {len(flagged)}")
        for _, row in flagged.head(max_rows).iterrows():
            lines.append(
                f"  {row['label']:<24} rank {int(row['rank']):>6}  estimate "
                f"{row['estimate']:+.4g}  corrected {row['corrected']:+.4g} ± "
                f"{self.z * row['se']:.3g} (lower {row['lower']:.4g})"
            )
        if len(flagged) > max_rows:
            lines.append(f"  ... and {len(flagged) - max_rows} more")
        r = self.residual
        lines.append(
            f"residuals: mean {r['mean']:+.4g}, sd {r['sd']:.4g}, mean |R| {r['mean_abs']:.4g}, "
            f"explained {r['explained']:.3g}; est. sum_U (I - Î)^2 = {r['total_sq_error']:.4g} "
            f"(rms per node {r['rms_node_error']:.3g})"
        )
        parts = ", ".join(f"{k} {v:g}" for k, v in self.cost_breakdown.items())
        lines.append(f"cost: {self.cost:g} forward passes ({parts})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Diagnosis(unverified={len(self.nodes)}, flagged={int(self.nodes['flagged'].sum())}, "
            f"bound={self.bound:.4g}, theta={self.theta:.4g}, stop={self.stop}, "
            f"cost={self.cost:g})"
        )


def should_stop(diagnosis: Diagnosis, theta: float | None = None) -> bool:
    """Stopping rule for verification: ``diagnosis.bound < theta`` (default its own ``θ``)."""
    theta = diagnosis.theta if theta is None else float(theta)
    return bool(diagnosis.bound < theta)


def _z(delta: float, n: int) -> float:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return NormalDist().inv_cdf(1 - delta / (2 * max(1, n)))


def _statistics(
    estimate: np.ndarray,
    unverified: np.ndarray,
    members: Sequence[np.ndarray],
    effects: np.ndarray,
    delta: float,
    theta: float,
) -> dict[str, Any]:
    """Residuals, per-node corrections, standard errors, flags and the bound (steps 3–5)."""
    n_u, m = len(unverified), len(members)
    local = np.full(int(unverified.max()) + 1 if n_u else 0, -1, dtype=np.int64)
    local[unverified] = np.arange(n_u)
    loc = [local[np.asarray(mem, dtype=np.int64)] for mem in members]
    sizes = np.array([len(x) for x in loc], dtype=np.int64)
    predicted = np.array([estimate[x].sum() for x in loc], dtype=np.float64)
    resid = effects - predicted
    flat = np.concatenate(loc) if loc else np.zeros(0, dtype=np.int64)
    n_in = np.bincount(flat, minlength=n_u).astype(np.float64)
    n_out = m - n_in
    sum_in = np.bincount(flat, weights=np.repeat(resid, sizes), minlength=n_u)
    sd = float(resid.std(ddof=1)) if m > 1 else float("inf")
    ok = (n_in > 0) & (n_out > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r_hat = np.where(ok, sum_in / n_in - (resid.sum() - sum_in) / n_out, 0.0)
        se = np.where(ok, sd * np.sqrt(1 / n_in + 1 / n_out), np.inf)
    z = _z(delta, n_u)
    corrected = estimate + r_hat
    lower = np.abs(corrected) - z * se
    upper = np.abs(corrected) + z * se
    return {
        "sizes": sizes,
        "predicted": predicted,
        "residual": resid,
        "n_in": n_in.astype(np.int64),
        "n_out": n_out.astype(np.int64),
        "correction": r_hat,
        "corrected": corrected,
        "se": se,
        "lower": lower,
        "upper": upper,
        "flagged": lower > theta,
        "z": z,
        "sd": sd,
        "bound": float(upper.max()) if n_u else 0.0,
    }


def _residual_summary(
    sizes: np.ndarray, effects: np.ndarray, resid: np.ndarray, p: float, n_u: int
) -> dict[str, float]:
    var_r = float(resid.var(ddof=1)) if len(resid) > 1 else float("nan")
    var_i = float(effects.var(ddof=1)) if len(effects) > 1 else float("nan")
    total = var_r / (p * (1 - p)) if 0 < p < 1 else float("nan")
    if len(sizes) > 1 and sizes.std() > 0:
        slope = float(np.polyfit(sizes.astype(np.float64), np.abs(resid), 1)[0])
    else:
        slope = float("nan")
    return {
        "mean": float(resid.mean()) if len(resid) else float("nan"),
        "sd": float(np.sqrt(var_r)),
        "var": var_r,
        "mean_abs": float(np.abs(resid).mean()) if len(resid) else float("nan"),
        "explained": 1 - var_r / var_i if var_i > 0 else float("nan"),
        "total_sq_error": total,
        "rms_node_error": float(np.sqrt(total / n_u)) if n_u else float("nan"),
        "abs_residual_per_node_slope": slope,
        "mean_subset_size": float(sizes.mean()) if len(sizes) else 0.0,
    }


def _same_nodes(a: Attribution, b: Attribution, what: str) -> None:
    if len(a) != len(b) or not np.array_equal(align(a, b), np.arange(len(a))):
        raise ValueError(f"{what} must cover the result's nodes in the same order")


def diagnose(
    model: Any,
    pairs: Any,
    result: Attribution,
    *,
    verified: int | Attribution | None = None,
    n_subsets: int = DEFAULT_SUBSETS,
    p: float | None = None,
    theta: float | None = None,
    delta: float = 0.05,
    seed: int = 0,
    estimate: Attribution | None = None,
    batch_size: int | None = None,
    remote: Remote = False,
    api_key: str | None = None,
    progress: bool = True,
    direction: str | None = None,
    metric: str | Metric | None = None,
    prepend_bos: bool = False,
    memory_gb: float = 2.0,
    checkpoint_dir: str | Path | None = None,
) -> Diagnosis:
    """Look for large effects among ``result``'s unverified nodes (spec §9; module docstring).

    Args:
        pairs: the prompt pairs (``None``: those stored in ``result``).
        result: the ranking result (AtP*, or any AtP-family result) whose top nodes are
            verified.
        verified: ``K`` (verify the top ``K`` nodes first with :func:`verify`, reusing a
            verification already in ``result.metadata``), a result returned by
            :func:`verify`, or ``None`` (whatever ``result.metadata["verified"]`` holds;
            nothing otherwise).
        n_subsets: ``M``, patched subsets (one forward per pair each).
        p: inclusion probability (default ``min(0.5, 20 / M)``).
        theta: effect size that matters (default ``0.1 · max |verified exact effect|``).
        delta: ``1 − δ`` is the simultaneous confidence of the bound and the flags.
        seed: seed of the subset sampling.
        estimate: a signed AtP-family result to use as the prediction ``Î`` (default: the
            result itself if signed, else ``attribute(..., method="atp+qk")``).
        direction, metric: default to the result's own.
        checkpoint_dir: keep finished chunks there (subfolders ``verify``, ``estimate``,
            ``subsets``); rerunning the same call resumes from them.
    """
    direction = check_direction(direction or result.direction)

    def step(name: str) -> Path | None:
        return None if checkpoint_dir is None else Path(checkpoint_dir) / name

    metric_name, metric_fn = resolve_result_metric(result, metric)
    layout = result_layout(model, result)
    if pairs is None:
        if not result.pairs:
            raise ValueError("no pairs given and the result stores none")
        pairs = result.pairs
    tok = prepare_pairs(model, pairs, prepend_bos)
    if n_subsets < 2:
        raise ValueError(f"n_subsets must be >= 2, got {n_subsets}")
    common = dict(
        direction=direction, metric=metric_fn, remote=remote, api_key=api_key, progress=progress
    )
    breakdown: dict[str, float] = {}

    # -- the verified set ---------------------------------------------------------------------
    if isinstance(verified, Attribution):
        _same_nodes(result, verified, "the verified result")
        info = verified.metadata.get("verified")
        if not info:
            raise ValueError("verified= holds no verification; pass the output of verify()")
    else:
        info = result.metadata.get("verified")
        if verified is not None:
            k = int(verified)
            if not info or len(info["order"]) < k:
                done = verify(
                    model,
                    tok,
                    result,
                    budget=k,
                    batch_size=batch_size,
                    memory_gb=memory_gb,
                    checkpoint_dir=step("verify"),
                    **common,
                )
                before = float(info["cost"]) if info else 0.0
                info = done.metadata["verified"]
                breakdown["verification"] = float(info["cost"]) - before
            info = {**info, "order": info["order"][:k], "mean_effect": info["mean_effect"][:k]}
    order = np.asarray(info["order"] if info else [], dtype=np.int64)
    exact_verified = np.asarray(info["mean_effect"] if info else [], dtype=np.float64)

    # -- threshold ------------------------------------------------------------------------------
    if theta is None:
        if len(exact_verified) == 0 or not np.abs(exact_verified).max() > 0:
            raise ValueError(
                "theta is needed: no verified node with a non-zero effect to derive it from"
            )
        theta = THETA_FRACTION * float(np.abs(exact_verified).max())
        theta_source = "default"
    else:
        theta = float(theta)
        theta_source = "given"

    # -- the signed prediction ----------------------------------------------------------------
    if estimate is not None:
        _same_nodes(result, estimate, "estimate=")
        if estimate.mean_effect is None:
            raise ValueError(f"estimate= must be signed; {estimate.method} results are not")
        est_res, est_source = estimate, f"given ({estimate.method})"
    elif result.mean_effect is not None:
        est_res, est_source = result, f"the result itself ({result.method})"
    else:
        est_res = attribute(
            model,
            tok,
            list(layout.kinds),
            method=ESTIMATE_METHOD,
            layers=list(layout.layers),
            per_position=layout.per_position,
            checkpoint_dir=step("estimate"),
            **common,
        )
        est_source = f"computed ({ESTIMATE_METHOD})"
        breakdown["estimate"] = float(est_res.cost)
    est_mean = est_res.per_pair.mean(0).astype(np.float64)

    # -- subsets of the unverified nodes ----------------------------------------------------------
    unverified = np.setdiff1d(np.arange(len(result)), order)
    n_u = len(unverified)
    if n_u == 0:
        raise ValueError("every node is verified: nothing to diagnose")
    if p is None:
        p = min(0.5, MEAN_INCLUSIONS / n_subsets)
        p_source = "default"
    else:
        p_source = "given"
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    rng = np.random.default_rng(seed)
    members = []
    for _ in range(n_subsets):
        size = rng.binomial(n_u, p)
        members.append(np.sort(unverified[rng.choice(n_u, size=size, replace=False)]))
    nonempty = [j for j, mem in enumerate(members) if len(mem)]
    per_pair = np.zeros((len(tok), n_subsets), dtype=np.float32)
    if nonempty:
        eff, c = patch_sets(
            model,
            tok,
            [members[j].tolist() for j in nonempty],
            layout=layout,
            batch_size=batch_size,
            memory_gb=memory_gb,
            checkpoint_dir=step("subsets"),
            **common,
        )
        per_pair[:, nonempty] = eff
        breakdown["subsets"] = float(c)
    effects = per_pair.mean(0).astype(np.float64)

    stats = _statistics(est_mean[unverified], unverified, members, effects, delta, theta)
    if (stats["n_in"] == 0).any():
        warnings.warn(
            f"{int((stats['n_in'] == 0).sum())} unverified nodes are in no subset: their "
            "bound is infinite; raise n_subsets or p",
            stacklevel=2,
        )

    table = result.to_dataframe().iloc[unverified].reset_index(drop=True)
    nodes = table[NODE_COLUMNS].copy()
    nodes.insert(0, "node", unverified)
    nodes["label"] = [str(result.node(int(i))) for i in unverified]
    nodes["rank"] = table["rank"].to_numpy()
    nodes["score"] = table["score"].to_numpy()
    nodes["estimate"] = est_mean[unverified]
    for key in ("correction", "corrected", "se", "n_in", "n_out", "lower", "upper", "flagged"):
        nodes[key] = stats[key]
    subsets = pd.DataFrame(
        {
            "size": stats["sizes"],
            "effect": effects,
            "predicted": stats["predicted"],
            "residual": stats["residual"],
        }
    )
    residual = _residual_summary(stats["sizes"], effects, stats["residual"], p, n_u)
    metadata = {
        "choices": dict(CHOICES),
        "estimate_source": est_source,
        "theta": theta,
        "theta_source": theta_source,
        "p_source": p_source,
        "delta": delta,
        "seed": seed,
        "direction": direction,
        "metric": metric_name,
        "n_pairs": len(tok),
        "method": result.method,
        "model": result.model,
        "verified_exact_mean_effect": exact_verified.tolist(),
        "empty_subsets": n_subsets - len(nonempty),
    }
    return Diagnosis(
        nodes=nodes,
        bound=stats["bound"],
        theta=theta,
        delta=delta,
        z=stats["z"],
        p=float(p),
        n_subsets=n_subsets,
        subsets=subsets,
        residual=residual,
        cost=float(sum(breakdown.values())),
        cost_breakdown=breakdown,
        verified=order,
        members=members,
        subset_per_pair=per_pair,
        metadata=metadata,
    )


def verify_until_bound(
    model: Any,
    pairs: Any,
    result: Attribution,
    *,
    theta: float,
    step: int = 10,
    max_budget: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[Attribution, Diagnosis]:
    """Verify in ranked order, ``step`` nodes at a time, until the diagnostic says stop.

    After each round :func:`diagnose` runs on the remaining nodes (fresh subsets, seed
    ``seed + round``); the loop ends when ``bound < theta``, ``max_budget`` nodes are verified
    or every node but one is. Returns the verified result and the last diagnosis (its
    ``metadata["rounds"]`` lists ``(verified, bound)`` per round). Checking the bound after
    every round is a sequential test: the ``1 − δ`` guarantee holds per round, not for the
    whole loop.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    keys = ("direction", "metric", "remote", "api_key", "progress", "prepend_bos", "batch_size")
    vkw = {k: kwargs[k] for k in keys if k in kwargs}
    estimate = kwargs.pop("estimate", None)
    if estimate is None and result.mean_effect is None:
        if pairs is None:
            pairs = result.pairs
        layout = result_layout(model, result)
        akw = {
            k: kwargs[k]
            for k in ("direction", "metric", "remote", "api_key", "progress")
            if k in kwargs
        }
        akw.setdefault("direction", result.direction)
        if "metric" not in akw:
            akw["metric"] = resolve_result_metric(result, None)[1]
        estimate = attribute(
            model,
            prepare_pairs(model, pairs, kwargs.get("prepend_bos", False)),
            list(layout.kinds),
            method=ESTIMATE_METHOD,
            layers=list(layout.layers),
            per_position=layout.per_position,
            **akw,
        )
    limit = len(result) - 1 if max_budget is None else min(int(max_budget), len(result) - 1)
    rounds: list[tuple[int, float]] = []
    current, budget, round_ = result, 0, 0
    while True:
        budget = min(budget + step, limit)
        current = verify(model, pairs, current, budget=budget, **vkw)
        diag = diagnose(
            model,
            pairs,
            result,
            verified=current,
            theta=theta,
            seed=seed + round_,
            estimate=estimate,
            **kwargs,
        )
        rounds.append((budget, diag.bound))
        round_ += 1
        if diag.stop or budget >= limit:
            break
    diag.metadata["rounds"] = rounds
    if estimate is not None and result.mean_effect is None:
        diag.metadata["estimate_cost"] = float(estimate.cost)
    return current, diag
