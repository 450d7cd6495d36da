"""Circuits: edge attribution (EAP, EAP-IG, and EAP with the AtP* fixes), exact edge patching,
pruning to circuits and their faithfulness. See :mod:`atp_nnsight.edges.graph` for the graph.

::

    result = attribute_edges(model, pairs, "eap*")          # every edge, per pair
    circuit = prune(result, 200)                             # top 200, dangling edges removed
    curve = evaluate_circuit(model, pairs, result)           # f at 0.1 % ... 50 %, CPR, CMD
    truth = patch_edges(model, pairs, result.ranking()[:50]) # exact effects of single edges
"""

from atp_nnsight.edges.attribute import METHODS, attribute_edges
from atp_nnsight.edges.circuit import Circuit, prune
from atp_nnsight.edges.evaluate import SIZES, Faithfulness, evaluate_circuit
from atp_nnsight.edges.exact import patch_edge_sets, patch_edges
from atp_nnsight.edges.graph import EdgeGraph, UnsupportedEdgesError
from atp_nnsight.edges.results import EdgeAttribution

__all__ = [
    "METHODS",
    "SIZES",
    "Circuit",
    "EdgeAttribution",
    "EdgeGraph",
    "Faithfulness",
    "UnsupportedEdgesError",
    "attribute_edges",
    "evaluate_circuit",
    "patch_edge_sets",
    "patch_edges",
    "prune",
]
