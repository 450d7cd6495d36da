"""``atp-nnsight plan``: size a run before it starts (see :mod:`atp_nnsight.plan`).

Import-light at module level (argparse only): the command line answers ``--help`` and input
errors without loading torch.
"""

from __future__ import annotations

import argparse
import json

from atp_nnsight.cli import POSITIVE, POSITIVE_FLOAT

METHODS = ("atp", "atp+qk", "atp+gd", "atp*")
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20}
UNITS.update({"GIB": 2**30, "TB": 10**12, "TIB": 2**40})


def memory_size(text: str) -> int:
    """Bytes from ``'20GB'``, ``'512MiB'``, ``'1e9'``."""
    stripped = text.strip().upper().replace(" ", "")
    number = stripped.rstrip("KMGTIB")
    unit = stripped[len(number) :]
    try:
        value = float(number) * UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"bad memory size {text!r}; use e.g. 20GB, 512MiB or a number of bytes"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"memory size must be positive, got {text!r}")
    return int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="hub id, local dir or shipped config (SmolLM2-135M-Instruct, "
        "meta-llama/Llama-3.1-8B/70B/405B); default: the bundled model",
    )
    parser.add_argument("--seq-len", type=POSITIVE, required=True, help="tokens per prompt")
    parser.add_argument("--n-pairs", type=POSITIVE, required=True, help="number of pairs")
    parser.add_argument("--nodes", default="head", help="node kinds, comma-separated")
    parser.add_argument("--layers", default=None, help="layers, e.g. '0-3,29' (default: all)")
    parser.add_argument("--per-position", action="store_true", help="one node per position")
    parser.add_argument("--method", default="atp*", choices=METHODS)
    parser.add_argument(
        "--remote", default="none", choices=["none", "ndif"], help="plan an NDIF run"
    )
    parser.add_argument("--pairs-per-chunk", type=POSITIVE, default=None)
    parser.add_argument(
        "--max-memory",
        type=memory_size,
        default=None,
        help="activation budget per chunk, e.g. 20GB (default: NDIF's cap, or 80%% of free memory)",
    )
    parser.add_argument("--dtype", default=None, help="model dtype (default: the config's)")
    parser.add_argument(
        "--throughput",
        type=POSITIVE_FLOAT,
        default=None,
        help="forward tokens per second on the target hardware, for the time estimate",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    from atp_nnsight.plan import MemoryBudgetError, plan

    try:
        result = plan(
            args.model,
            seq_len=args.seq_len,
            n_pairs=args.n_pairs,
            nodes=args.nodes,
            method=args.method,
            layers=args.layers,
            per_position=args.per_position,
            remote=args.remote == "ndif",
            pairs_per_chunk=args.pairs_per_chunk,
            max_memory=args.max_memory,
            dtype=args.dtype,
            throughput=args.throughput,
        )
    except (ValueError, TypeError, MemoryBudgetError) as err:
        print(f"atp-nnsight plan: error: {err}", file=__import__("sys").stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0
