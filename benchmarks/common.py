"""Shared by the benchmark scripts: built-in task pairs and cached exact ground truth."""

from __future__ import annotations

from pathlib import Path

from atp_nnsight import Attribution, keep_correct, make_task, patch

OUT = Path(__file__).parent / "results"


def task_pairs(model, task: str, n: int) -> list:
    """``n`` built-in ``task`` pairs the model gets right (drawn from 3n candidates)."""
    pairs = keep_correct(model, make_task(task, 3 * n, tokenizer=model.tokenizer))
    if len(pairs) < n:
        raise RuntimeError(f"only {len(pairs)} of {3 * n} {task} pairs are answered correctly")
    return pairs[:n]


def ground_truth(model, pairs, kinds: str, layers, name: str) -> Attribution:
    """Exact patching of every node, cached as ``results/exact_<name>.npz``."""
    path = OUT / f"exact_{name}.npz"
    if path.exists():
        cached = Attribution.load(path)
        if [p for p in cached.pairs] == [p.to_dict() for p in pairs]:
            return cached
    result = patch(model, pairs, kinds, layers=layers)
    OUT.mkdir(parents=True, exist_ok=True)
    result.save(path)
    return result
