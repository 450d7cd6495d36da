"""Recall of the true top-10 nodes within each method's top-20, on the bundled model.

Ground truth: exact patching (noising, logit difference, nodes summed over positions) of every
head, q, k and v node on ``--pairs`` built-in pairs per task, and of the neurons of
``--neuron-layers`` on ``--neuron-pairs`` pairs (all neurons of all layers would take ~10^6
forwards here). Methods: atp, atp+qk, atp+gd, atp*. Writes a markdown table and the raw
results under ``benchmarks/results/``.

    python benchmarks/recall_table.py [--pairs 8] [--neuron-pairs 4] [--neuron-layers 14,29]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import OUT, ground_truth, task_pairs

from atp_nnsight import Attribution, attribute, load_model
from atp_nnsight.methods.atp import METHODS


def recall(truth: Attribution, estimate: Attribution, k: int = 10, budget: int = 20):
    top_true = set(truth.ranking()[:k].tolist())
    top_est = set(estimate.ranking()[:budget].tolist())
    missed = sorted(top_true - top_est, key=lambda i: -truth.scores[i])
    return len(top_true & top_est) / k, missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--neuron-pairs", type=int, default=4)
    parser.add_argument("--neuron-layers", default="14,29")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    model = load_model()
    lines = [
        "# Recall of the exact top-10 within each method's top-20 (bundled SmolLM2-135M)",
        "",
        f"Command: `python benchmarks/recall_table.py --pairs {args.pairs} --neuron-pairs "
        f"{args.neuron_pairs} --neuron-layers {args.neuron_layers}`",
        "",
        "Noising, logit difference, nodes summed over positions. Neurons: layers "
        f"{args.neuron_layers} only, {args.neuron_pairs} pairs.",
        "",
        "| task | kind | nodes | " + " | ".join(METHODS) + " |",
        "|---|---|---|" + "---|" * len(METHODS),
    ]
    notes = []
    for task in ("ioi", "factual"):
        pairs = task_pairs(model, task, max(args.pairs, args.neuron_pairs))
        for kinds, layers, n in (
            ("head,q,k,v", None, args.pairs),
            ("neuron", args.neuron_layers, args.neuron_pairs),
        ):
            sub = pairs[:n]
            started = time.perf_counter()
            truth = ground_truth(model, sub, kinds, layers, f"{task}_{kinds.replace(',', '')}")
            print(f"{task} {kinds}: ground truth in {time.perf_counter() - started:.0f} s")
            estimates = {
                m: attribute(model, sub, kinds, method=m, layers=layers, progress=False)
                for m in METHODS
            }
            for kind in kinds.split(","):
                mask = (truth.nodes["kind"] == kind).to_numpy()
                sub_truth = truth.select(mask)
                cells = []
                for m, est in estimates.items():
                    r, missed = recall(sub_truth, est.select(mask))
                    cells.append(f"{r:.1f}")
                    if missed:
                        names = ", ".join(
                            f"{sub_truth.node(i)} (exact {sub_truth.mean_effect[i]:+.3f}, "
                            f"rank {int(np.where(est.select(mask).ranking() == i)[0][0]) + 1})"
                            for i in missed
                        )
                        notes.append(f"- {task} {kind} {m} misses: {names}")
                lines.append(f"| {task} | {kind} | {int(mask.sum())} | " + " | ".join(cells) + " |")
    lines += ["", "## Missed nodes (exact mean effect; rank in the method's ordering)", ""] + notes
    (OUT / "recall.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
