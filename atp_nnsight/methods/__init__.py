"""Methods: plain functions ``(model, pairs, nodes, options) -> Attribution``."""
