"""``atp-nnsight circuit``: edge attribution → circuit → faithfulness curve → HTML report.

Runs ``attribute_edges`` with ``--method`` (eap, eap+qk, eap+gd, eap*, eap-ig), prunes the
``--edges-top`` best edges to a circuit (``--selection`` topk or greedy, dangling edges
removed), evaluates the faithfulness curve of the ranking with exact edge patching (unless
``--no-curve``) and writes to ``--out DIR``:

* ``edges.npz`` (the full :class:`~atp_nnsight.edges.EdgeAttribution`) and ``edges.csv``
  (one row per edge, best first);
* ``circuit.json`` (nodes, edges, scores);
* ``faithfulness.json`` and ``faithfulness.csv`` (f per size, CPR, CMD);
* ``circuit_graph.html`` (the graph figure alone) and ``report.html`` (everything).

Only argparse is imported at module level, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EDGE_METHODS = ("eap", "eap+qk", "eap+gd", "eap*", "eap-ig")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="eap*", choices=EDGE_METHODS)
    parser.add_argument(
        "--model", default=None, help="hub id or local directory (default: bundled SmolLM2)"
    )
    parser.add_argument(
        "--pairs", default=None, help="prompt pairs .jsonl/.csv (default: built-in --task pairs)"
    )
    parser.add_argument("--task", default="ioi", choices=["ioi", "factual", "random"])
    parser.add_argument("--n-pairs", type=_positive, default=16, help="built-in pairs to make")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in pairs")
    parser.add_argument(
        "--edges-top", type=_positive, default=200, help="edges chosen for the circuit"
    )
    parser.add_argument("--selection", default="topk", choices=["topk", "greedy"])
    parser.add_argument("--ig-steps", type=_positive, default=5, help="EAP-IG gradient steps")
    parser.add_argument("--direction", default="noising", choices=["noising", "denoising"])
    parser.add_argument("--metric", default="logit-diff", choices=["logit-diff", "logprob"])
    parser.add_argument("--pairs-per-chunk", type=_positive, default=8)
    parser.add_argument(
        "--no-curve",
        action="store_true",
        help="skip the faithfulness curve (exact patching of 11 circuits per pair)",
    )
    parser.add_argument(
        "--remote",
        default="none",
        choices=["none", "local", "ndif"],
        help="run on NDIF (needs NDIF_API_KEY), or 'local' to dry-run the requests",
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _inputs(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    from atp_nnsight.data import keep_correct, load_pairs, make_task
    from atp_nnsight.models.loading import load_model

    model = load_model(args.model, remote=args.remote == "ndif")
    if args.pairs is not None:
        return model, load_pairs(args.pairs)
    pairs = make_task(args.task, args.n_pairs, seed=args.seed, tokenizer=model.tokenizer)
    if args.remote != "ndif":
        pairs = keep_correct(model, pairs)
    return model, pairs


def run(args: argparse.Namespace) -> int:
    """Compute and write everything (see the module docstring); returns the exit code."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} exists and is not a folder", file=sys.stderr)
        return 2
    if args.pairs is not None and not Path(args.pairs).is_file():
        print(f"error: --pairs {args.pairs}: no such file", file=sys.stderr)
        return 2
    from atp_nnsight.edges import attribute_edges, evaluate_circuit, prune
    from atp_nnsight.edges.report import circuit_figure, write_circuit_report
    from atp_nnsight.results import atomic_paths

    remote: Any = {"none": False, "local": "local", "ndif": True}[args.remote]
    progress = not args.no_progress
    model, pairs = _inputs(args)
    result = attribute_edges(
        model,
        pairs,
        args.method,
        ig_steps=args.ig_steps,
        direction=args.direction,
        metric=args.metric,
        pairs_per_chunk=args.pairs_per_chunk,
        remote=remote,
        progress=progress,
    )
    k = min(args.edges_top, len(result))
    circuit = prune(result, k, args.selection)
    curves = {}
    if not args.no_curve:
        curves[args.method] = evaluate_circuit(
            model,
            pairs,
            result,
            selection=args.selection,
            direction=args.direction,
            metric=args.metric,
            remote=remote,
            progress=progress,
        )
    out.mkdir(parents=True, exist_ok=True)
    result.save(out / "edges.npz")
    result.to_dataframe().sort_values("rank").to_csv(out / "edges.csv", index=False)
    circuit.to_json(out / "circuit.json")
    if curves:
        curve = curves[args.method]
        with atomic_paths(out / "faithfulness.json", out / "faithfulness.csv") as (js, csv):
            js.write_text(json.dumps(curve.to_dict(), indent=1))
            curve.to_dataframe().to_csv(csv, index=False)
    with atomic_paths(out / "circuit_graph.html") as (tmp,):
        circuit_figure(circuit).write_html(tmp, include_plotlyjs="inline")
    settings = {"pairs file": args.pairs or f"built-in {args.task}", "selection": args.selection}
    write_circuit_report(
        out / "report.html",
        circuit,
        result=result,
        curves=curves,
        title=f"{args.method} circuit of {result.model}",
        settings=settings,
    )
    print(f"{len(result)} edges scored with {args.method}; circuit: {len(circuit)} edges")
    for name, curve in curves.items():
        print(f"{name}: CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f}")
    print(f"report: {out / 'report.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atp-nnsight circuit", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
