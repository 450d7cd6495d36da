"""AtP and AtP* wall time on the bundled model vs plain PyTorch passes over the same inputs.

16 built-in IOI pairs, all head, q, k, v and neuron nodes (summed over positions). Ratios, all
measured in this run (targets: atp <= 1.25, atp* <= 1.5):

* ``atp``  / (noise forward + clean forward + one backward to the embeddings, plain torch)
* ``atp*`` / (noise forward + clean forward + L backwards to the embeddings, plain torch)

Each measurement runs in a fresh subprocess: the minimum time of ``--repeats`` calls after a
warm-up, and the process's peak memory (max RSS).

    python benchmarks/bench_atp.py [--pairs 16] [--per-position] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from common import plain_passes

KINDS = "head,q,k,v,neuron"


def _setup(n_pairs: int, per_position: bool):
    """The model and ``n_pairs`` correct IOI pairs (per position: all of one token length)."""
    from atp_nnsight import ioi_pairs, keep_correct, load_model, tokenize_pairs

    model = load_model()
    if not per_position:
        pairs = keep_correct(model, ioi_pairs(n_pairs, tokenizer=model.tokenizer))
        return model, pairs, tokenize_pairs(pairs, model.tokenizer)
    pairs = keep_correct(model, ioi_pairs(8 * n_pairs, tokenizer=model.tokenizer))
    lengths = tokenize_pairs(pairs, model.tokenizer).lengths
    common = max(set(lengths), key=lengths.count)
    same = [p for p, n in zip(pairs, lengths, strict=True) if n == common][:n_pairs]
    return model, same, tokenize_pairs(same, model.tokenizer)


def measure(what: str, n_pairs: int, per_position: bool, repeats: int) -> dict:
    from atp_nnsight import attribute

    model, pairs, tok = _setup(n_pairs, per_position)
    hf = model._module
    n_layers = hf.config.num_hidden_layers
    attribute(model, pairs[:1], KINDS, method="atp*", layers=[0], progress=False)  # warm-up
    plain_passes(hf, tok, 1, n_pairs)
    if what in ("plain", "plain-L"):
        n_backward = n_layers if what == "plain-L" else 1
        call = lambda: plain_passes(hf, tok, n_backward, n_pairs)  # noqa: E731
    else:
        call = lambda: attribute(  # noqa: E731
            model,
            pairs,
            KINDS,
            method=what,
            per_position=per_position,
            progress=False,
            pairs_per_chunk=n_pairs,
        )
    seconds = float("inf")
    for _ in range(repeats):  # the minimum: the least disturbed by other jobs
        start = time.perf_counter()
        call()
        seconds = min(seconds, time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"what": what, "seconds": seconds, "peak_mb": peak_mb, "layers": n_layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--per-position", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls; the minimum counts")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.pairs, args.per_position, args.repeats)))
        return
    rows = {}
    for what in ("plain", "atp", "plain-L", "atp*"):
        cmd = [sys.executable, __file__, "--one", what, "--pairs", str(args.pairs)]
        cmd += ["--repeats", str(args.repeats)]
        cmd += ["--per-position"] if args.per_position else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[what] = json.loads(out.strip().splitlines()[-1])
    layers = rows["atp"]["layers"]
    print(
        f"bundled model, {args.pairs} IOI pairs, nodes {KINDS}, "
        f"{'per position' if args.per_position else 'summed over positions'}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'run':<36}{'seconds':>10}{'peak RSS MB':>14}")
    names = {
        "plain": "plain torch: 2 fwd + 1 bwd",
        "atp": "atp",
        "plain-L": f"plain torch: 2 fwd + {layers} bwd",
        "atp*": "atp*",
    }
    for key, row in rows.items():
        print(f"{names[key]:<36}{row['seconds']:>10.2f}{row['peak_mb']:>14.0f}")
    ratio = rows["atp"]["seconds"] / rows["plain"]["seconds"]
    print(f"ratio atp / plain (target <= 1.25): {ratio:.2f}")
    print(
        f"ratio atp* / plain with {layers} backwards (target <= 1.5): "
        f"{rows['atp*']['seconds'] / rows['plain-L']['seconds']:.2f}"
    )


if __name__ == "__main__":
    main()
