"""``atp-nnsight check-remote``: the smallest meaningful NDIF job, to check a remote setup.

One prompt pair, head nodes of the model's last two layers: ``atp``, then ``atp*``, then exact
patching of the three heads AtP* ranks highest. Each step reports its time and, per request,
the payload and result bytes; at the end AtP* is compared with exact patching on those heads.
Failures print one line naming the problem and the fix (no key, key rejected, service
unreachable, model not deployed, request rejected, job timed out) and exit with code 1.

``--remote local`` runs nnsight's serialize/deserialize dry run instead (no NDIF, no key), so
the same check works offline on any model.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

N_HEADS_EXACT = 3
"""Heads verified with exact patching: AtP*'s top three."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="Hugging Face id of a model deployed on NDIF (for --remote local: also a local "
        "directory)",
    )
    parser.add_argument(
        "--remote",
        default="ndif",
        choices=["ndif", "local"],
        help="ndif: run on NDIF (key from NDIF_API_KEY or nnsight's config); local: nnsight's "
        "offline dry run of the same requests",
    )
    parser.add_argument(
        "--task",
        default="ioi",
        choices=["ioi", "factual", "random"],
        help="built-in task the one prompt pair comes from (default: ioi)",
    )
    parser.add_argument(
        "--pairs", default=None, help="take the first pair of this .jsonl/.csv file instead"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in pair")


def run(args: argparse.Namespace) -> int:
    """Load the model and the pair, then :func:`check`; returns the exit code."""
    from atp_nnsight.data import load_pairs, make_task
    from atp_nnsight.models.loading import load_model

    remote: Any = True if args.remote == "ndif" else "local"
    try:
        model = load_model(args.model, remote=remote is True)
        if args.pairs:
            pair = load_pairs(args.pairs)[0]
        else:
            pair = make_task(args.task, 1, seed=args.seed, tokenizer=model.tokenizer)[0]
    except (OSError, ValueError, RuntimeError) as err:
        print(f"check-remote: {err}", file=sys.stderr)
        return 1
    return check(model, pair, remote)


def _bytes(values: list[Any]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    return "+".join(f"{v:,}" for v in known)


def check(
    model: Any, pair: Any, remote: Any, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the three steps on ``model`` with ``remote`` (True, "local" or a backend).

    Prints a table (step, seconds, requests, payload and result bytes per request) and the
    AtP*-vs-exact agreement to ``out``; a failure's one-line message to ``err``. Returns 0 when
    every step ran, 1 otherwise.
    """
    import time

    import numpy as np
    import pandas as pd

    from atp_nnsight.methods.atp import attribute
    from atp_nnsight.methods.exact import patch_sets
    from atp_nnsight.models import get_adapter
    from atp_nnsight.remote import (
        ChunkFailedError,
        RemoteSetupError,
        api_key_source,
        ndif_host,
        record_transfers,
    )
    from atp_nnsight.types import Node

    out = out or sys.stdout
    err = err or sys.stderr
    n_layers = get_adapter(model).n_layers
    layers = list(range(max(0, n_layers - 2), n_layers))
    if remote is True:
        target = f"NDIF ({ndif_host()})"
    elif remote == "local":
        target = "a local dry run (remote='local')"
    else:
        target = f"backend {type(remote).__name__}"
    print(f"check-remote: {getattr(model, 'repo_id', None) or 'model'} on {target}", file=out)
    if remote is True:
        source = api_key_source()
        print(f"API key: {source or 'none found'}", file=out)
    print(
        f"pair: {pair.clean!r} -> {pair.clean_target!r} vs {pair.noise_target!r}; "
        f"head nodes of layers {layers[0]}-{layers[-1]}",
        file=out,
    )
    rows: list[tuple[str, float, Any]] = []
    results: dict[str, Any] = {}

    def step(name: str, compute: Any) -> None:
        start = time.perf_counter()
        with record_transfers() as log:
            results[name] = compute()
        rows.append((name, time.perf_counter() - start, log))

    try:
        for method in ("atp", "atp*"):
            step(
                method,
                lambda m=method: attribute(
                    model, [pair], "head", method=m, layers=layers, remote=remote, progress=False
                ),
            )
        ranked = results["atp*"].top(N_HEADS_EXACT)
        heads = [Node("head", int(r.layer), int(r.index)) for r in ranked.itertuples()]
        step(
            f"exact ({len(heads)} heads)",
            lambda: patch_sets(model, [pair], [[h] for h in heads], remote=remote, progress=False),
        )
    except (RemoteSetupError, ChunkFailedError) as failure:
        print(f"check-remote failed: {failure}", file=err)
        return 1

    table = pd.DataFrame(
        [
            (name, f"{seconds:.1f}", len(log), _bytes(log.payload_bytes), _bytes(log.result_bytes))
            for name, seconds, log in rows
        ],
        columns=["step", "seconds", "requests", "payload bytes", "result bytes"],
    )
    print(table.to_string(index=False), file=out)
    exact = results[rows[-1][0]][0][0]  # [pairs, sets] for the one pair
    star = ranked["score"].to_numpy()
    print(f"AtP* vs exact patching on AtP*'s top {len(heads)} heads:", file=out)
    for head, score, effect in zip(heads, star, exact, strict=True):
        print(f"  L{head.layer}H{head.index}  AtP* {score:.4f}  exact {effect:+.4f}", file=out)
    ranks = pd.Series(star).rank().corr(pd.Series(np.abs(exact)).rank())
    same_top = int(np.argmax(np.abs(exact))) == 0
    print(
        f"agreement: Spearman(AtP* score, |exact effect|) = {ranks:.2f}; AtP*'s top head is "
        f"exact patching's top head: {'yes' if same_top else 'no'}",
        file=out,
    )
    print("OK: every step ran.", file=out)
    return 0
