"""Exact patching throughput on the bundled model vs a plain batched HF forward.

Patches every attention head (summed over positions) on 16 built-in IOI pairs and prints
patched forwards per second, the same for a plain ``no_grad`` HF forward of the same batch
size on the same inputs, and their ratio (target >= 0.9), all measured in this run.

    python benchmarks/bench_exact.py [--pairs 16] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import time

import torch

from atp_nnsight import ioi_pairs, keep_correct, load_model, patch, tokenize_pairs


def plain_rows_per_second(hf: torch.nn.Module, ids: torch.Tensor, batch: int, rows: int) -> float:
    x = ids.repeat((batch + len(ids) - 1) // len(ids), 1)[:batch]
    done, start = 0, time.perf_counter()
    with torch.no_grad():
        while done < rows:
            hf(x, use_cache=False)
            done += batch
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    model = load_model()
    pairs = keep_correct(model, ioi_pairs(args.pairs, tokenizer=model.tokenizer))
    tok = tokenize_pairs(pairs, model.tokenizer)
    patch(model, pairs[:1], "head", layers=[0], progress=False)  # warm-up (.source rewrite)

    start = time.perf_counter()
    result = patch(model, pairs, "head", batch_size=args.batch_size, progress=False)
    elapsed = time.perf_counter() - start
    patched = result.per_pair.size
    ours = patched / elapsed

    group = tok.by_length()[0]
    plain = plain_rows_per_second(model._module, group.clean, args.batch_size, patched // 4)
    print(
        f"model: {result.model}; pairs: {len(pairs)}; heads: {len(result)}; "
        f"batch size: {args.batch_size}; threads: {torch.get_num_threads()}"
    )
    print(
        f"exact patching: {patched} patched forwards in {elapsed:.1f} s "
        f"(incl. 2 unpatched forwards per pair) = {ours:.1f} patched forwards/s"
    )
    print(f"plain HF forward (no_grad, same batch size): {plain:.1f} forwards/s")
    print(f"ratio (target >= 0.9): {ours / plain:.2f}")


if __name__ == "__main__":
    main()
