"""Peak memory of atp and atp* against plain PyTorch fwd+bwd, and the planner's prediction.

Tiny random Llama-shaped models with a 70B-like attention layout (64 query heads, 8 KV heads,
head_dim 2, hidden 128, MLP 256), L = 10, 20, 40, 80 layers and T = 16, 64, 256 tokens, 16
pairs in one chunk, nodes head,q,k,v,neuron summed over positions. Every measurement runs in
a fresh subprocess; the *activation peak* is the peak of live heap bytes during the call minus
the value just before it (atp_nnsight/memory.py), after a warm-up call on the same batch shape
(a first call with a new shape allocates one-time caches). Plain = noise forward
without grad, clean forward with grad from the embeddings, one backward (HF model, no nnsight;
benchmarks/common.py).

Targets (issue 8): atp* peak ≤ 1.5 × plain at every size; growth linear in L and in T·H
(quadratic in T only through attention); atp* time at L = 80 ≤ 1.2 × plain 2F + L·B.

    python benchmarks/bench_memory.py [--layers 10,20,40,80] [--tokens 16,64,256] [--pairs 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

KINDS = "head,q,k,v,neuron"
WIDE = dict(
    hidden_size=128,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=2,
    intermediate_size=256,
    max_position_embeddings=512,
)


def wide_model(n_layers: int):
    from atp_nnsight.models.tiny import tiny_model

    return tiny_model("llama", n_layers=n_layers, **WIDE)


def measure(what: str, n_layers: int, seq_len: int, n_pairs: int, timing: bool = False) -> dict:
    from common import plain_passes, random_token_pairs

    from atp_nnsight import attribute, tokenize_pairs
    from atp_nnsight.memory import peak_during

    torch.manual_seed(0)
    model = wide_model(n_layers)
    vocab = model._module.config.vocab_size
    tok = tokenize_pairs(random_token_pairs(n_pairs, seq_len, vocab), model.tokenizer)
    # warm-ups on the same batch shape: first calls with a new shape allocate one-time caches
    if what.startswith("plain"):
        n_backward = n_layers if what == "plain-L" else 1
        hf = model._module
        plain_passes(hf, tok, 1, n_pairs)
        _, before, peak, seconds = peak_during(
            lambda: plain_passes(hf, tok, n_backward, n_pairs), per_op=not timing
        )
    else:
        attribute(model, tok, KINDS, method=what, layers=[0, n_layers - 1], progress=False)
        _, before, peak, seconds = peak_during(
            lambda: attribute(
                model, tok, KINDS, method=what, pairs_per_chunk=n_pairs, progress=False
            ),
            per_op=not timing,
        )
    return {"what": what, "delta_mb": (peak - before) / 2**20, "seconds": seconds}


def predicted_mb(n_layers: int, seq_len: int, n_pairs: int, method: str) -> float:
    from atp_nnsight.models.tiny import tiny_config
    from atp_nnsight.plan import plan

    config = tiny_config("llama", n_layers=n_layers, **WIDE)
    p = plan(
        config,
        seq_len=seq_len,
        n_pairs=n_pairs,
        nodes=KINDS,
        method=method,
        pairs_per_chunk=n_pairs,
        dtype="float32",
    )
    return p.peak_bytes / 2**20


def run_one(what: str, n_layers: int, seq_len: int, n_pairs: int, timing: bool = False) -> dict:
    """One measurement in a fresh process; ``timing``: no per-op peak reads (clean seconds)."""
    cmd = [sys.executable, __file__, "--one", what, "--layers", str(n_layers)]
    cmd += ["--tokens", str(seq_len), "--pairs", str(n_pairs)] + (["--timing"] if timing else [])
    from atp_nnsight.memory import ENV

    env = {**os.environ, **ENV}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", default="10,20,40,80")
    parser.add_argument("--tokens", default="16,64,256")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument(
        "--time-at", type=int, default=80, help="L for the time comparison (0: none)"
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one = measure(args.one, int(args.layers), int(args.tokens), args.pairs, args.timing)
        print(json.dumps(one))
        return
    layers = [int(x) for x in args.layers.split(",")]
    tokens = [int(x) for x in args.tokens.split(",")]
    print(f"wide tiny Llama (64/8 heads, hidden 128), {args.pairs} pairs, nodes {KINDS}")
    print(
        f"{'L':>4}{'T':>6}{'plain MB':>10}{'atp MB':>9}{'atp* MB':>9}{'atp*/plain':>12}"
        f"{'plan atp* MB':>14}{'plan/meas':>11}"
    )
    rows = []
    for n_layers in layers:
        for seq_len in tokens:
            plain = run_one("plain", n_layers, seq_len, args.pairs)
            atp = run_one("atp", n_layers, seq_len, args.pairs)
            star = run_one("atp*", n_layers, seq_len, args.pairs)
            pred = predicted_mb(n_layers, seq_len, args.pairs, "atp*")
            ratio = star["delta_mb"] / plain["delta_mb"]
            rows.append((n_layers, seq_len, plain, atp, star, pred))
            print(
                f"{n_layers:>4}{seq_len:>6}{plain['delta_mb']:>10.1f}{atp['delta_mb']:>9.1f}"
                f"{star['delta_mb']:>9.1f}{ratio:>12.2f}{pred:>14.1f}"
                f"{pred / star['delta_mb']:>11.2f}",
                flush=True,
            )
    t = args.time_at
    seq = tokens[0]
    if t == 0:
        return
    plain_l = run_one("plain-L", t, seq, args.pairs, timing=True)
    star = run_one("atp*", t, seq, args.pairs, timing=True)
    print(
        f"time at L={t}, T={seq}: atp* {star['seconds']:.1f} s, plain 2F+{t}B "
        f"{plain_l['seconds']:.1f} s, ratio {star['seconds'] / plain_l['seconds']:.2f} "
        "(target <= 1.2)"
    )
    print(f"threads: {torch.get_num_threads()}, {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    main()
