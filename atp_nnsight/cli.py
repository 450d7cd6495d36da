"""``atp-nnsight``: a thin command line over the library.

Subcommands: ``patch`` (exact activation patching) and ``attribute`` (AtP family). Both write
``--out FILE.csv`` (one row per node: ``kind,layer,index,position,score,mean_effect``) and the
full result with per-pair values beside it (``FILE.npz``, load with ``Attribution.load``).

``diagnose`` ranks nodes with an AtP-family method, verifies the top ``--verify K`` with exact
patching and runs the false-negative diagnostic on the rest (``--subsets M`` random subsets):
it prints the upper bound on the largest unverified effect, the flagged nodes and the stopping
decision; ``--out FILE.csv`` gets the flagged nodes and ``FILE.npz`` the verified result.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ALL_KINDS = "head,q,k,v,neuron,resid,attn_out,mlp_out"
RUN_KINDS = "head,q,k,v,neuron"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="hub id or local directory (default: bundled SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--pairs",
        default=None,
        help="prompt pairs (.jsonl/.csv with clean,noise,clean_target,noise_target); "
        "default: built-in --task pairs",
    )
    p.add_argument(
        "--task",
        default="ioi",
        choices=["ioi", "factual", "random"],
        help="built-in task used when --pairs is not given (default: ioi)",
    )
    p.add_argument("--n-pairs", type=int, default=16, help="built-in pairs to generate")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in pairs")
    p.add_argument("--nodes", default="head", help=f"node kinds, comma-separated ({ALL_KINDS})")
    p.add_argument("--layers", default=None, help="layers, e.g. '0-3,29' (default: all)")
    p.add_argument(
        "--per-position",
        action="store_true",
        help="one node per position (0-based from the first token) instead of summed",
    )
    p.add_argument("--direction", default="noising", choices=["noising", "denoising"])
    p.add_argument("--metric", default="logit-diff", choices=["logit-diff", "logprob"])
    p.add_argument("--prepend-bos", action="store_true", help="prepend the tokenizer's BOS token")
    p.add_argument(
        "--remote",
        default="none",
        choices=["none", "local", "ndif"],
        help="run on NDIF (needs NDIF_API_KEY), or 'local' to dry-run the request",
    )
    p.add_argument("--out", default=None, help="CSV of node scores (full result saved as .npz)")
    p.add_argument("--top", type=int, default=20, help="rows of the ranked table to print")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atp-nnsight",
        description="Localize a language model's behaviour to its components (AtP*, nnsight).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("patch", help="exact activation patching, one node at a time")
    _common(p)
    p.add_argument("--batch-size", type=int, default=None, help="patched rows per forward")
    a = sub.add_parser("attribute", help="AtP / AtP+QK / AtP+GD / AtP* estimates of every node")
    _common(a)
    _method_options(a)
    r = sub.add_parser(
        "run",
        help="the main job: AtP* over head,q,k,v,neuron nodes, verify the top of each kind, "
        "write a report",
    )
    _common(r)
    r.set_defaults(nodes=RUN_KINDS, out="atp_report")
    _set_help(r, "nodes", f"node kinds, comma-separated (default {RUN_KINDS})")
    _set_help(r, "out", "report folder (default atp_report)")
    _method_options(r)
    r.add_argument("--verify", type=int, default=10, help="top nodes of each kind to verify")
    r.add_argument("--batch-size", type=int, default=None, help="patched rows per forward")
    d = sub.add_parser(
        "diagnose",
        help="verify the top nodes of an AtP-family ranking and bound the effects it missed",
    )
    _common(d)
    _set_help(d, "out", "CSV of the flagged nodes (verified result saved beside as .npz)")
    _method_options(d)
    d.add_argument("--batch-size", type=int, default=None, help="patched rows per forward")
    d.add_argument(
        "--verify", type=int, default=20, help="top nodes to verify with exact patching (K)"
    )
    d.add_argument(
        "--subsets", type=int, default=200, help="random subsets of unverified nodes (M)"
    )
    d.add_argument(
        "--p",
        type=float,
        default=None,
        help="subset inclusion probability (default min(0.5, 20/M))",
    )
    d.add_argument(
        "--theta",
        type=float,
        default=None,
        help="effect size that matters (default 0.1 x the largest verified |effect|)",
    )
    d.add_argument(
        "--delta", type=float, default=0.05, help="1 - confidence of the bound (default 0.05)"
    )
    d.add_argument("--subset-seed", type=int, default=0, help="seed of the random subsets")
    return parser


def _method_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="atp*", choices=["atp", "atp+qk", "atp+gd", "atp*"])
    p.add_argument(
        "--pairs-per-chunk",
        type=int,
        default=16,
        help="pairs per forward/backward and per remote session",
    )


def _set_help(p: argparse.ArgumentParser, dest: str, text: str) -> None:
    for action in p._actions:
        if action.dest == dest:
            action.help = text


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    """How every model computation of a command runs: remote backend, progress, BOS."""
    return dict(
        remote=_remote(args.remote), progress=not args.no_progress, prepend_bos=args.prepend_bos
    )


def _remote(value: str) -> Any:
    return {"none": False, "local": "local", "ndif": True}[value]


def load_inputs(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """The model and prompt pairs the arguments ask for."""
    from atp_nnsight.data import keep_correct, load_pairs, make_task
    from atp_nnsight.models.loading import load_model

    model = load_model(args.model, remote=args.remote == "ndif")
    if args.pairs is not None:
        pairs = load_pairs(args.pairs)
    else:
        pairs = make_task(args.task, args.n_pairs, seed=args.seed, tokenizer=model.tokenizer)
        if args.remote != "ndif":
            pairs = keep_correct(model, pairs, prepend_bos=args.prepend_bos)
    return model, pairs


def print_table(df: pd.DataFrame, title: str) -> None:
    show = df[["rank", "kind", "layer", "index", "position", "score", "mean_effect"]]
    print(f"\n{title}")
    print(show.to_string(index=False, float_format=lambda x: f"{x:.4f}"))


def write_outputs(result: Any, out: str | None) -> None:
    if out is None:
        return
    csv = result.to_csv(out)
    npz = result.save(Path(out).with_suffix(".npz"))
    print(f"\nwrote {csv} and {npz}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "diagnose":
        return run_diagnose(args)
    if args.command == "run":
        return run_main_job(args)
    started = time.perf_counter()
    try:
        model, pairs = load_inputs(args)
        common = dict(
            layers=args.layers,
            per_position=args.per_position,
            direction=args.direction,
            metric=args.metric,
            prepend_bos=args.prepend_bos,
            remote=_remote(args.remote),
            progress=not args.no_progress,
        )
        if args.command == "patch":
            from atp_nnsight.methods.exact import patch

            result = patch(model, pairs, args.nodes, batch_size=args.batch_size, **common)
        else:
            from atp_nnsight.methods.atp import attribute

            result = attribute(
                model,
                pairs,
                args.nodes,
                method=args.method,
                pairs_per_chunk=args.pairs_per_chunk,
                **common,
            )
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"atp-nnsight: error: {err}", file=sys.stderr)
        return 2
    print(
        f"{result.method} on {result.model}: {len(pairs)} pairs, {len(result)} nodes, "
        f"{result.direction}, metric {result.metric}, cost {result.cost:g} forward passes, "
        f"{time.perf_counter() - started:.1f} s"
    )
    print_table(result.top(args.top), f"top {args.top} nodes by score")
    write_outputs(result, args.out)
    return 0


def run_diagnose(args: argparse.Namespace) -> int:
    """``atp-nnsight diagnose``: rank, verify the top ``--verify``, diagnose the rest."""
    started = time.perf_counter()
    try:
        from atp_nnsight.evaluation import diagnose, verified_table, verify

        model, pairs = load_inputs(args)
        run = _run_options(args)
        result = _attribute(model, pairs, args, **run)
        verified = verify(
            model, pairs, result, budget=args.verify, batch_size=args.batch_size, **run
        )
        diagnosis = diagnose(
            model,
            pairs,
            result,
            verified=verified,
            n_subsets=args.subsets,
            p=args.p,
            theta=args.theta,
            delta=args.delta,
            seed=args.subset_seed,
            batch_size=args.batch_size,
            **run,
        )
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"atp-nnsight: error: {err}", file=sys.stderr)
        return 2
    info = verified.metadata["verified"]
    print(
        f"{result.method} on {result.model}: {len(pairs)} pairs, {len(result)} nodes, "
        f"{result.direction}, metric {result.metric}; cost {result.cost:g} (ranking) + "
        f"{info['cost']:g} (verification) + {diagnosis.cost:g} (diagnostic) forward passes, "
        f"{time.perf_counter() - started:.1f} s"
    )
    table = verified_table(verified).head(args.top)
    print(f"\nverified nodes (top {len(info['order'])} by {result.method}; first {len(table)})")
    print(
        table[["step", "kind", "layer", "index", "position", "score", "exact"]].to_string(
            index=False, float_format=lambda x: f"{x:.4f}"
        )
    )
    print()
    print(diagnosis.summary(max_rows=args.top))
    print(f"decision: {'STOP' if diagnosis.stop else 'CONTINUE'} verifying")
    if args.out is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        diagnosis.flagged.to_csv(out, index=False)
        npz = verified.save(out.with_suffix(".npz"))
        print(f"\nwrote {out} (flagged nodes) and {npz}")
    return 0


def _attribute(model: Any, pairs: Any, args: argparse.Namespace, **run: Any) -> Any:
    from atp_nnsight.methods.atp import attribute

    return attribute(
        model,
        pairs,
        args.nodes,
        method=args.method,
        layers=args.layers,
        per_position=args.per_position,
        direction=args.direction,
        metric=args.metric,
        pairs_per_chunk=args.pairs_per_chunk,
        **run,
    )


def verified_curves(result: Any) -> Any:
    """Cost-of-verified-recall curves *among the verified nodes*: how far down the method's
    ranking the largest verified exact effects sat (no exhaustive ground truth needed)."""
    from atp_nnsight.evaluation import curves, verified_nodes

    order = verified_nodes(result)
    info = result.metadata["verified"]
    mask = np.zeros(len(result), dtype=bool)
    mask[order] = True
    exact = np.zeros(len(result))
    exact[order] = info["mean_effect"]
    per_pair = np.zeros((len(info["per_pair"]), len(result)), dtype=np.float32)
    per_pair[:, order] = np.asarray(info["per_pair"], dtype=np.float32)
    truth = dataclasses.replace(
        result,
        scores=np.abs(exact),
        per_pair=per_pair,
        mean_effect=exact,
        method="exact",
        metadata={},
    ).select(mask)
    return curves(truth, {result.method: result.select(mask)})


def run_main_job(args: argparse.Namespace) -> int:
    """``atp-nnsight run``: attribute, verify the top ``--verify`` of each kind, report."""
    started = time.perf_counter()
    try:
        from atp_nnsight.evaluation import verified_table, verify
        from atp_nnsight.report import write_report

        model, pairs = load_inputs(args)
        run = _run_options(args)
        result = _attribute(model, pairs, args, **run)
        ranked_at = time.perf_counter() - started
        verified = verify(
            model, pairs, result, per_kind=args.verify, batch_size=args.batch_size, **run
        )
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"atp-nnsight: error: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    info = verified.metadata["verified"]
    print(
        f"{result.method} on {result.model}: {len(pairs)} pairs, {len(result)} nodes, "
        f"{result.direction}, metric {result.metric}; cost {result.cost:g} (ranking, "
        f"{ranked_at:.0f} s) + {info['cost']:g} (verification) forward passes; {elapsed:.0f} s"
    )
    table = verified_table(verified).sort_values(["kind", "rank"], kind="stable")
    for kind, rows in table.groupby("kind", sort=False):
        print(
            f"\ntop {len(rows)} {kind} nodes by {result.method} score, verified by exact patching"
        )
        print(
            rows[["rank", "layer", "index", "position", "score", "estimate", "exact"]].to_string(
                index=False, float_format=lambda x: f"{x:.4f}", na_rep="-"
            )
        )
    settings = {
        "task": "pairs from " + args.pairs if args.pairs else f"built-in {args.task}",
        "seed": args.seed,
        "verified per kind": args.verify,
        "time (s)": f"{elapsed:.0f}",
        "command": "atp-nnsight " + " ".join(sys.argv[1:]) if sys.argv[1:] else "atp-nnsight run",
    }
    tokens = (
        model.tokenizer.convert_ids_to_tokens(model.tokenizer(pairs[0].clean)["input_ids"])
        if args.per_position
        else None
    )
    html = write_report(
        args.out,
        {result.method: verified},
        settings=settings,
        curves=verified_curves(verified),
        tokens=tokens,
    )
    print(f"\nreport: {html}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
