"""Cost of verified recall of every method on the bundled model (paper §4; spec §8).

For built-in IOI and factual pairs: ground truth by exhaustive exact patching (heads, q, k, v
on ``--pairs`` pairs; the neurons of ``--neuron-layers`` on ``--neuron-pairs`` pairs — all
neurons would take ~10^6 forwards on this machine), then every method: atp, atp+qk, atp+gd,
atp*, subsampling, blocks, hierarchical and the brute-force (random) order. For each method and
node kind: the forward passes per pair needed to have verified the true top-1/5/10/20 nodes
(method cost + verification rank of the last of them), and the IRWRGM summary relative to
AtP*. Writes ``verified_recall.md``, ``verified_recall.csv`` and one PNG per task and node set
under ``benchmarks/results/``; ground truth is cached there as ``exact_*.npz``.

    python benchmarks/verified_recall.py [--pairs 8] [--neuron-pairs 4] [--neuron-layers 14,29]
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
from common import OUT, ground_truth, markdown_table, task_pairs

from atp_nnsight import Attribution, attribute, load_model
from atp_nnsight.evaluation import curves, irwrgm_table, plot_cost_of_verified_recall
from atp_nnsight.methods.atp import METHODS
from atp_nnsight.methods.baselines import blocks, brute_force, hierarchical, subsampling

XS = (1, 5, 10, 20)


def run_methods(model, pairs, kinds, layers, n_nodes: int) -> dict[str, Attribution]:
    opts = dict(layers=layers, progress=False)
    results = {m: attribute(model, pairs, kinds, method=m, **opts) for m in METHODS}
    results["subsampling"] = subsampling(model, pairs, kinds, n_subsets=200, **opts)
    results["blocks"] = blocks(model, pairs, kinds, block_size=16, **opts)
    results["hierarchical"] = hierarchical(model, pairs, kinds, budget=n_nodes // 2, **opts)
    results["brute-force"] = brute_force(model, pairs, kinds, **opts)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--neuron-pairs", type=int, default=4)
    parser.add_argument("--neuron-layers", default="14,29")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = load_model()
    tables, summaries = [], []
    for task in ("ioi", "factual"):
        pairs = task_pairs(model, task, max(args.pairs, args.neuron_pairs))
        for kinds, layers, n in (
            ("head,q,k,v", None, args.pairs),
            ("neuron", args.neuron_layers, args.neuron_pairs),
        ):
            sub = pairs[:n]
            name = f"{task}_{kinds.replace(',', '')}"
            truth = ground_truth(model, sub, kinds, layers, name)
            t0 = time.perf_counter()
            results = run_methods(model, sub, kinds, layers, len(truth))
            print(f"{task} {kinds}: methods in {time.perf_counter() - t0:.0f} s", flush=True)
            curve = curves(truth, results, k_max=max(XS))
            curve.insert(0, "task", task)
            tables.append(curve)
            summary = irwrgm_table(curve, reference="atp*")
            summary.insert(0, "task", task)
            summaries.append(summary)
            fig = plot_cost_of_verified_recall(
                curve.drop(columns="task"), title=f"{task}: cost of verified recall ({kinds})"
            )
            fig.savefig(OUT / f"verified_recall_{name}.png", dpi=110, bbox_inches="tight")
    table = pd.concat(tables, ignore_index=True)
    table.to_csv(OUT / "verified_recall.csv", index=False)
    summary = pd.concat(summaries, ignore_index=True)
    wide = table[table["x"].isin(XS) & (table["kind"] != "all")].pivot_table(
        index=["task", "kind", "method"], columns="x", values="cost"
    )
    wide.columns = [f"top-{x}" for x in wide.columns]
    wide = wide.join(
        summary.set_index(["task", "kind", "method"])["irwrgm"].rename("IRWRGM vs atp*")
    )
    lines = [
        "# Cost of verified recall (bundled SmolLM2-135M)",
        "",
        f"Command: `python benchmarks/verified_recall.py --pairs {args.pairs} --neuron-pairs "
        f"{args.neuron_pairs} --neuron-layers {args.neuron_layers}` "
        f"({time.perf_counter() - started:.0f} s on this machine)",
        "",
        "Forward passes per prompt pair (backward = 2) to have verified the true top-x nodes: "
        "method cost + verification rank of the last of them (oracle = x). Noising, logit "
        "difference, nodes summed over positions. IRWRGM: inverse-rank-weighted geometric mean "
        "over x = 1..20 of cost / cost of atp* (1 = as good as AtP*, > 1 = worse). Baselines: "
        "subsampling M=200 (p = 10/|N|), blocks B=16, hierarchical B=3 best-first with budget "
        "|N|/2 group patches; brute force = random order.",
        "",
        markdown_table(wide.round(1).reset_index()),
        "",
    ]
    (OUT / "verified_recall.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
