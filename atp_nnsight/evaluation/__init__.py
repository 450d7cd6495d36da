"""Evaluation: verification in ranked order, cost of verified recall, the false-negative
diagnostic (paper §3.3 and §4; spec §8–9).

* :func:`verify` — exact patching of a result's nodes in ranked order, until a budget or a
  stopping rule; :func:`verified_table` shows what was verified.
* :func:`cost_of_verified_recall`, :func:`curves`, :func:`irwrgm`, :func:`irwrgm_table`,
  :func:`recall_at_budget`, :func:`plot_cost_of_verified_recall` — costs in forward passes
  per prompt pair.
* :func:`diagnose` → :class:`Diagnosis` — flags likely false negatives among the unverified
  nodes and bounds the largest remaining effect; :func:`should_stop` is the stopping rule;
  :func:`verify_until_bound` alternates the two.
"""

from .diagnostic import Diagnosis, diagnose, should_stop, verify_until_bound
from .recall import (
    cost_of_verified_recall,
    curves,
    irwrgm,
    irwrgm_table,
    plot_cost_of_verified_recall,
    recall_at_budget,
)
from .verify import verified_nodes, verified_table, verify

__all__ = [
    "Diagnosis",
    "cost_of_verified_recall",
    "curves",
    "diagnose",
    "irwrgm",
    "irwrgm_table",
    "plot_cost_of_verified_recall",
    "recall_at_budget",
    "should_stop",
    "verified_nodes",
    "verified_table",
    "verify",
    "verify_until_bound",
]
