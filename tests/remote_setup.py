"""Shared setup of the remote tests: tiny client models, their emulated servers, comparisons.

**Comparing with the server's numerics.** The emulated server runs bf16 weights under autocast
(like NDIF), the client fp32, so results agree in rank, not to 1e-6. Measured on the tiny random
models (large weights on purpose, :mod:`atp_nnsight.models.tiny`), 3 pairs, all node kinds:
the AtP family gives Spearman 0.995–0.999 with the same top 10 and score differences up to 6 %
of the top score; exact patching gives Spearman 0.91–0.97 and differences up to 5 %: its score
``|mean over pairs of signed effects|`` cancels to near zero for many nodes, and those are
ordered by bf16 noise (the base metric itself moves by up to 0.2 on qwen2). So
:func:`assert_rank_agreement` checks, per node score:

* ``|remote - local| <= rel_tol * max|local|`` (default 10 %);
* Spearman ``>= spearman`` (0.99 for the AtP family; 0.9 for exact patching and the
  patching-based baselines);
* the same top 10 up to near-ties: a node in only one of the two top 10s scores within
  ``rel_tol * max|local|`` of the 10th local score.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atp_nnsight.data import PromptPair
from atp_nnsight.models.tiny import tiny_hf_model, tiny_model, tiny_tokenizer

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # works with or without tests/__init__.py
    sys.path.insert(0, _HERE)

from ndif_emulator import EXACT, STRICT, InProcessNDIFBackend, make_server_model  # noqa: E402

SEED = 11
ALL_KINDS = ["head", "q", "k", "v", "neuron", "resid", "attn_out", "mlp_out"]
PAIRS = [
    PromptPair("w1 w2 w3 w4 w5 w6", "w1 w9 w3 w4 w5 w6", " w5", " w9"),
    PromptPair("w7 w8 w2 w4 w1 w3", "w7 w8 w11 w4 w1 w3", " w2", " w11"),
    PromptPair("w20 w21 w22 w23 w24 w25", "w20 w30 w22 w23 w24 w25", " w22", " w30"),
]
ATOL = 1e-6
"""Exact-number comparisons (fp32 server): local, dry run and emulated runs."""


@dataclass
class Setup:
    """A client model and two emulated servers: fp32 (``exact_server``) and bf16 (``server``)."""

    family: str
    client: Any
    exact_server: Any
    server: Any
    calls: Counter

    def backend(self, **kwargs: Any) -> InProcessNDIFBackend:
        """The strict emulator: allowlists, builtins, bf16 numerics."""
        return InProcessNDIFBackend(self.server, self.client, policy=STRICT, **kwargs)

    def exact_backend(self, **kwargs: Any) -> InProcessNDIFBackend:
        """The server's allowlists and builtins with fp32 numerics."""
        kwargs.setdefault("policy", EXACT)
        return InProcessNDIFBackend(self.exact_server, self.client, **kwargs)


def _count_calls(model: Any, calls: Counter, name: str) -> None:
    def hook(*_: Any) -> None:
        calls[name] += 1

    model._module.register_forward_hook(hook)


def build_setup(family: str, n_layers: int = 2) -> Setup:
    client = tiny_model(family, seed=SEED, n_layers=n_layers)
    tok = tiny_tokenizer()
    exact_server = make_server_model(
        tiny_hf_model(family, seed=SEED, n_layers=n_layers), tok, bf16=False
    )
    server = make_server_model(tiny_hf_model(family, seed=SEED, n_layers=n_layers), tok, bf16=True)
    assert exact_server._module is not client._module
    calls: Counter = Counter()
    _count_calls(client, calls, "client")
    _count_calls(exact_server, calls, "server")
    _count_calls(server, calls, "server")
    return Setup(family, client, exact_server, server, calls)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def assert_rank_agreement(
    local: np.ndarray,
    remote: np.ndarray,
    *,
    min_spearman: float = 0.99,
    rel_tol: float = 0.1,
    top: int = 10,
) -> None:
    """Scores of a bf16 server against local fp32 ones (see the module docstring)."""
    local, remote = np.asarray(local, dtype=np.float64), np.asarray(remote, dtype=np.float64)
    assert local.shape == remote.shape
    scale = np.abs(local).max()
    assert scale > 1e-2, "the comparison would be vacuous"
    tol = rel_tol * scale
    worst = np.abs(remote - local).max()
    assert worst <= tol, f"a score moved by {worst:.4g} > {tol:.4g} ({rel_tol:.0%} of the top)"
    rho = spearman(local, remote)
    assert rho >= min_spearman, f"Spearman {rho:.4f} < {min_spearman}"
    k = min(top, len(local))
    top_local = set(np.argsort(-local, kind="stable")[:k])
    top_remote = set(np.argsort(-remote, kind="stable")[:k])
    tenth = np.sort(local)[::-1][k - 1]
    for node in top_local ^ top_remote:
        assert abs(local[node] - tenth) <= tol, (
            f"node {node} is in only one top {k} and not a near-tie "
            f"(score {local[node]:.4g}, 10th {tenth:.4g})"
        )
