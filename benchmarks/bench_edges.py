"""Edge attribution on the bundled model: cost of verified recall, faithfulness, time, memory.

Parts (``--part``, default all), for built-in IOI and factual pairs (``--pairs`` per task, the
ones the model answers correctly), noising, logit difference:

* ``recall``: every edge method (eap, eap+qk, eap+gd, eap*, eap-ig with 5 steps) ranks all
  edges; ground truth is exact edge patching of the union of each method's top ``--top``
  edges plus ``--random`` random other edges (cached under ``results/cache/``); the true
  top-20 are the 20 largest ``|mean effect|`` among them. Cost of verified recall of the true
  top-x: method cost per pair + verification rank of the last of them (forward passes per
  pair; backward = 2); IRWRGM over x = 1..20 relative to eap*.
* ``curves``: faithfulness of the top-k circuits of eap, eap-ig and eap* at 0.1 ... 50 % of
  the edges (and their greedy circuits), CPR and CMD (:mod:`atp_nnsight.edges.evaluate`).
* ``time``: wall time of eap against node AtP on the same pairs and node kinds (head, q, k, v,
  mlp_out: the components the edge graph joins), and of eap-ig (5 steps) against eap; the
  minimum of ``--repeats`` interleaved runs, one torch thread.
* ``memory``: activation peak (live heap during the call minus before, in a fresh subprocess
  with ``MALLOC_ARENA_MAX=1``, after a warm-up; ``atp_nnsight/memory.py``) of eap, eap-ig and
  eap* against a plain PyTorch forward (no grad) + forward + backward on the same chunk.

Writes ``bench_edges.md``, ``bench_edges.json``, ``edges_recall.csv``,
``edges_faithfulness.csv`` and ``edges_faithfulness_<task>.png`` under ``benchmarks/results/``.

    python benchmarks/bench_edges.py [--part recall,curves,time,memory] [--pairs 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import OUT, markdown_table, plain_passes, task_pairs

from atp_nnsight import attribute, load_model, tokenize_pairs
from atp_nnsight.edges import EdgeAttribution, attribute_edges, evaluate_circuit, patch_edges
from atp_nnsight.evaluation.recall import irwrgm

METHODS = ("eap", "eap+qk", "eap+gd", "eap*", "eap-ig")
CURVE_METHODS = ("eap", "eap-ig", "eap*")
XS = (1, 5, 10, 20)
TASKS = ("ioi", "factual")
CACHE = OUT / "cache"  # per-method results and exact effects (large; not committed)


def cached(path: Path, pairs, compute) -> EdgeAttribution:
    if path.exists():
        result = EdgeAttribution.load(path)
        if result.pairs == [p.to_dict() for p in pairs]:
            return result
    result = compute()
    result.save(path)
    return result


def method_results(model, pairs, task: str) -> dict[str, EdgeAttribution]:
    out = {}
    for method in METHODS:
        path = CACHE / f"edges_{task}_{method.replace('*', 'star').replace('+', '_')}.npz"
        start = time.perf_counter()
        out[method] = cached(
            path, pairs, lambda m=method: attribute_edges(model, pairs, m, progress=False)
        )
        print(f"{task} {method}: {time.perf_counter() - start:.0f} s", flush=True)
    return out


def candidates(results: dict[str, EdgeAttribution], top: int, n_random: int) -> np.ndarray:
    union = set()
    for r in results.values():
        union |= set(r.ranking()[:top].tolist())
    n_edges = len(next(iter(results.values())))
    rest = np.setdiff1d(np.arange(n_edges), np.array(sorted(union)))
    rng = np.random.default_rng(0)
    extra = rng.choice(rest, size=min(n_random, len(rest)), replace=False)
    return np.array(sorted(union | set(extra.tolist())), dtype=np.int64), extra


def recall_table(task, results, truth, random_edges) -> tuple[pd.DataFrame, dict]:
    truth_edges = truth.edges["edge"].to_numpy()
    order = np.argsort(-truth.scores, kind="stable")[: max(XS)]
    top_edges = truth_edges[order]
    rows = []
    for name, r in results.items():
        rank = np.empty(len(r), dtype=np.int64)
        rank[r.ranking()] = np.arange(1, len(r) + 1)
        per_pair = r.cost / r.per_pair.shape[0]
        costs = [per_pair + rank[top_edges[:x]].max() for x in range(1, max(XS) + 1)]
        rows.append(
            {"task": task, "method": name, "method cost": per_pair}
            | {f"top-{x}": costs[x - 1] for x in XS}
            | {"costs": costs}
        )
    ref = next(row["costs"] for row in rows if row["method"] == "eap*")
    for row in rows:
        row["IRWRGM vs eap*"] = irwrgm(row.pop("costs"), ref)
    info = {
        "candidates": int(len(truth_edges)),
        "true top-20 from the random sample": int(np.isin(top_edges, random_edges).sum()),
        "largest |effect| among the random sample": float(
            truth.scores[np.isin(truth_edges, random_edges)].max()
        ),
        "20th largest |effect|": float(truth.scores[order[-1]]),
    }
    return pd.DataFrame(rows), info


def part_recall_curves(args, model, parts: set[str], report: dict) -> None:
    recall_rows, curve_rows = [], []
    for task in TASKS:
        pairs = task_pairs(model, task, args.pairs)
        results = method_results(model, pairs, task)
        if "recall" in parts:
            chosen, random_edges = candidates(results, args.top, args.random)
            start = time.perf_counter()
            truth = cached(
                CACHE / f"edges_exact_{task}.npz",
                pairs,
                lambda c=chosen, p=pairs: patch_edges(model, p, c, progress=False),
            )
            print(f"{task} exact ({len(chosen)} edges): {time.perf_counter() - start:.0f} s")
            table, info = recall_table(task, results, truth, random_edges)
            recall_rows.append(table)
            report.setdefault("recall_info", {})[task] = info
        if "curves" in parts:
            for method in CURVE_METHODS:
                for selection in ("topk", "greedy"):
                    start = time.perf_counter()
                    curve = evaluate_circuit(
                        model, pairs, results[method], selection=selection, progress=False
                    )
                    print(f"{task} {method} {selection} curve: {time.perf_counter() - start:.0f} s")
                    df = curve.to_dataframe()
                    df.insert(0, "selection", selection)
                    df.insert(0, "method", method)
                    df.insert(0, "task", task)
                    df["CPR"], df["CMD"] = curve.cpr, curve.cmd
                    curve_rows.append(df)
    if recall_rows:
        recall = pd.concat(recall_rows, ignore_index=True)
        recall.to_csv(OUT / "edges_recall.csv", index=False)
        report["recall"] = recall.to_dict(orient="records")
    if curve_rows:
        curves = pd.concat(curve_rows, ignore_index=True)
        curves.to_csv(OUT / "edges_faithfulness.csv", index=False)
        report["curves"] = curves.to_dict(orient="records")
        plot_curves(curves)


def plot_curves(curves: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task, df in curves.groupby("task"):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for (method, selection), g in df.groupby(["method", "selection"]):
            style = "-" if selection == "topk" else "--"
            label = f"{method} {selection} (CPR {g.CPR.iloc[0]:.3f}, CMD {g.CMD.iloc[0]:.3f})"
            ax.plot(100 * g["size"], g["faithfulness"], style, marker="o", label=label)
        ax.set_xscale("log")
        ax.axhline(1, color="grey", lw=0.8, ls=":")
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("circuit size (% of edges)")
        ax.set_ylabel("faithfulness f(C)")
        ax.set_title(f"{task}: faithfulness of edge circuits (bundled SmolLM2-135M)")
        ax.legend(fontsize=7)
        fig.savefig(OUT / f"edges_faithfulness_{task}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)


def part_time(args, model, report: dict) -> None:
    pairs = task_pairs(model, "ioi", args.pairs)
    runs = {
        "node atp (head,q,k,v,mlp_out)": lambda: attribute(
            model, pairs, "head,q,k,v,mlp_out", method="atp", pairs_per_chunk=8, progress=False
        ),
        "eap": lambda: attribute_edges(model, pairs, "eap", pairs_per_chunk=8, progress=False),
        "eap-ig (5 steps)": lambda: attribute_edges(
            model, pairs, "eap-ig", pairs_per_chunk=8, progress=False
        ),
    }
    best = {k: float("inf") for k in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    node, eap, ig = best.values()
    report["time"] = {
        "seconds": best,
        "eap / node atp": eap / node,
        "eap-ig / eap": ig / eap,
        "pairs": args.pairs,
        "repeats": args.repeats,
    }
    print(report["time"], flush=True)


def measure_memory(what: str, n_pairs: int) -> dict:
    """In this (fresh) process: activation peak of one call after a warm-up."""
    from atp_nnsight.memory import peak_during

    torch.set_num_threads(1)
    model = load_model()
    pairs = task_pairs(model, "ioi", 6 * n_pairs)
    lengths = tokenize_pairs(pairs, model.tokenizer).lengths
    length = max(set(lengths), key=lengths.count)  # one chunk of pairs of one length
    same = [p for p, n in zip(pairs, lengths, strict=True) if n == length][:n_pairs]
    tok = tokenize_pairs(same, model.tokenizer)
    if what == "plain":
        call = lambda: plain_passes(model._module, tok, 1, len(same))  # noqa: E731
    elif what == "atp":
        call = lambda: attribute(  # noqa: E731
            model,
            same,
            "head,q,k,v,mlp_out",
            method="atp",
            pairs_per_chunk=len(same),
            progress=False,
        )
    else:
        call = lambda: attribute_edges(  # noqa: E731
            model, same, what, ig_steps=5, pairs_per_chunk=len(same), progress=False
        )
    call()
    _, before, peak, seconds = peak_during(call)
    return {"what": what, "pairs": len(same), "mb": (peak - before) / 2**20, "seconds": seconds}


def part_memory(args, report: dict) -> None:
    from atp_nnsight.memory import ENV

    rows = []
    for what in ("plain", "atp", "eap", "eap-ig", "eap*"):
        cmd = [sys.executable, __file__, "--one", what, "--pairs", str(args.pairs)]
        out = subprocess.run(
            cmd, check=True, capture_output=True, text=True, env={**os.environ, **ENV}
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    plain = rows[0]["mb"]
    for row in rows:
        row["/ plain"] = row["mb"] / plain
    report["memory"] = rows


def write_report(report: dict, args, seconds: float) -> None:
    old = {}
    path = OUT / "bench_edges.json"
    if path.exists():
        old = json.loads(path.read_text())
    report = {**old, **report}
    path.write_text(json.dumps(report, indent=1, default=float))
    lines = [
        "# Edge attribution on the bundled SmolLM2-135M",
        "",
        f"Command: `python benchmarks/bench_edges.py --pairs {args.pairs} --top {args.top} "
        f"--random {args.random}` (last part run took {seconds:.0f} s on this machine).",
        "Noising, logit difference, edges summed over positions; costs in forward passes per "
        "pair (backward = 2).",
        "",
    ]
    if "recall" in report:
        df = pd.DataFrame(report["recall"])
        lines += [
            "## Cost of verified recall of the true top-x edges",
            "",
            "Ground truth: exact edge patching of the union of every method's top "
            f"{args.top} edges plus {args.random} random others; true top-x = largest "
            "|mean effect| among them. Cost = method cost + verification rank of the last "
            "true top-x edge. IRWRGM over x = 1..20 relative to eap* (< 1: cheaper).",
            "",
            markdown_table(df, ".4g"),
            "",
            "```",
            json.dumps(report.get("recall_info", {}), indent=1),
            "```",
            "",
        ]
    if "curves" in report:
        df = pd.DataFrame(report["curves"])
        summary = df.groupby(["task", "method", "selection"], sort=False)[["CPR", "CMD"]].first()
        wide = df.pivot_table(
            index=["task", "method", "selection"], columns="size", values="faithfulness"
        )
        wide.columns = [f"{100 * c:g}%" for c in wide.columns]
        lines += [
            "## Faithfulness of circuits (CPR higher is better, CMD lower is better)",
            "",
            markdown_table(summary.reset_index(), ".4g"),
            "",
            markdown_table(wide.reset_index(), ".4g"),
            "",
        ]
    if "time" in report:
        t = report["time"]
        lines += [
            "## Time (one thread, minimum of interleaved repeats)",
            "",
            markdown_table(
                pd.DataFrame([{"run": k, "seconds": v} for k, v in t["seconds"].items()]), ".4g"
            ),
            "",
            f"eap / node atp = {t['eap / node atp']:.2f} (target ≤ 1.5); "
            f"eap-ig / eap = {t['eap-ig / eap']:.2f} (target ≤ 5.5).",
            "",
        ]
    if "memory" in report:
        lines += [
            "## Activation peak (MB above the value before the call)",
            "",
            markdown_table(pd.DataFrame(report["memory"]), ".4g"),
            "",
        ]
    (OUT / "bench_edges.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", default="recall,curves,time,memory")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--top", type=int, default=500)
    parser.add_argument("--random", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_memory(args.one, args.pairs)))
        return
    parts = set(args.part.split(","))
    torch.set_num_threads(1)  # steadier on a shared machine; timings are per thread
    CACHE.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict = {}
    model = load_model()
    if parts & {"recall", "curves"}:
        part_recall_curves(args, model, parts, report)
    if "time" in parts:
        part_time(args, model, report)
    if "memory" in parts:
        part_memory(args, report)
    write_report(report, args, time.perf_counter() - start)


if __name__ == "__main__":
    main()
