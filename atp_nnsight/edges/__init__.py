"""Circuits: edge attribution (EAP, EAP-IG, and EAP with the AtP* fixes), exact edge patching,
faithfulness curves and circuit pruning. See :mod:`atp_nnsight.edges.graph` for the graph."""

from atp_nnsight.edges.attribute import METHODS, attribute_edges
from atp_nnsight.edges.graph import EdgeGraph, UnsupportedEdgesError
from atp_nnsight.edges.results import EdgeAttribution

__all__ = ["METHODS", "EdgeAttribution", "EdgeGraph", "UnsupportedEdgesError", "attribute_edges"]
