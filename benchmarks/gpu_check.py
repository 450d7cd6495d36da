"""GPU check: the CUDA tests, then AtP/AtP* time and peak GPU memory against plain PyTorch.

    python benchmarks/gpu_check.py [--pairs 16] [--length 128] [--repeats 3]

On a CUDA machine (under 10 minutes, nothing downloaded):

1. runs the CUDA-marked tests (``pytest -m cuda``: the bundled model split between ``cuda:0``
   and the CPU, and a bf16 run);
2. builds a random-weight Llama of about 1B parameters (the TinyLlama-1.1B shape: 22 layers,
   d_model 2048, 32 query / 4 KV heads, MLP 5632, vocab 32000) in bf16 directly on the GPU,
   with the offline word-level tokenizer of the tiny test models;
3. on ``--pairs`` pairs of random token ids of ``--length`` tokens (one chunk), times plain
   PyTorch 2F+1B and 2F+L·B (HF forward + ``torch.autograd.grad`` of the logit difference to
   the embeddings, no nnsight; ``benchmarks/common.py``), AtP and AtP* over head, q, k, v and
   neuron nodes, and prints the median times, the ratios and each run's peak GPU memory
   (``torch.cuda.max_memory_allocated``, reset before every run).

Without CUDA it says so, skips step 1 and runs steps 2-3 on a 2-layer tiny Llama on the CPU
(a smoke test of the same code path, no memory column), and exits 0.
Exit status 1 if the CUDA tests fail.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from common import plain_passes, random_token_pairs
from transformers import AutoModelForCausalLM, LlamaConfig

from atp_nnsight import attribute, tokenize_pairs
from atp_nnsight.models.tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
KINDS = "head,q,k,v,neuron"
RUNS = ("plain 2F+1B", "atp", "plain 2F+L*B", "atp*")

LLAMA_1B = LlamaConfig(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    use_cache=False,
)
"""The TinyLlama-1.1B shape (1.10e9 parameters)."""

LLAMA_SMOKE = LlamaConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    use_cache=False,
)
"""The CPU smoke test's stand-in."""


@dataclass(frozen=True)
class Setup:
    config: LlamaConfig
    device: torch.device
    n_pairs: int
    length: int
    repeats: int


def random_llama(config: LlamaConfig, device: torch.device, dtype: torch.dtype):
    """A random-weight Llama built (and initialised) directly on ``device``, wrapped for
    nnsight with the offline tokenizer; eval mode, parameters frozen."""
    from nnsight.modeling.transformers import TransformersModel

    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf.eval()
    hf.requires_grad_(False)
    return TransformersModel(hf, tokenizer=tiny_tokenizer(config.vocab_size))


def run_cuda_tests() -> bool:
    print("== CUDA tests: pytest -m cuda", flush=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "tests"]
    return subprocess.run(cmd, cwd=ROOT).returncode == 0


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """Median seconds of ``repeats`` calls after one warm-up, and peak GPU memory (GB; NaN on
    the CPU) over the timed calls."""
    cuda = device.type == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return statistics.median(seconds), peak


def benchmark(setup: Setup) -> dict[str, tuple[float, float]]:
    """Seconds and peak memory of each of :data:`RUNS`."""
    cfg = setup.config
    start = time.perf_counter()
    model = random_llama(cfg, setup.device, torch.bfloat16)
    hf = model._module
    n_params = sum(p.numel() for p in hf.parameters())
    weights = torch.cuda.memory_allocated() / 2**30 if setup.device.type == "cuda" else None
    print(
        f"random Llama: {n_params / 1e6:,.1f}M parameters, {cfg.num_hidden_layers} layers, bf16 "
        f"on {setup.device}, built in {time.perf_counter() - start:.1f} s"
        + (f", weights {weights:.2f} GB" if weights is not None else "")
    )
    pairs = random_token_pairs(setup.n_pairs, setup.length, cfg.vocab_size)
    tok = tokenize_pairs(pairs, model.tokenizer)
    n = setup.n_pairs
    atp = functools.partial(attribute, model, tok, KINDS, pairs_per_chunk=n, progress=False)
    runs: dict[str, Callable[[], object]] = {
        "plain 2F+1B": functools.partial(plain_passes, hf, tok, 1, n),
        "atp": functools.partial(atp, method="atp"),
        "plain 2F+L*B": functools.partial(plain_passes, hf, tok, cfg.num_hidden_layers, n),
        "atp*": functools.partial(atp, method="atp*"),
    }
    out = {}
    for name in RUNS:
        out[name] = measure(runs[name], setup.device, setup.repeats)
        print(f"  {name:<14} {out[name][0]:8.3f} s", flush=True)
    return out


def report(setup: Setup, out: dict[str, tuple[float, float]]) -> None:
    layers = setup.config.num_hidden_layers
    print(
        f"\n{setup.n_pairs} pairs x {setup.length} tokens of random ids, nodes {KINDS} (summed "
        f"over positions), one chunk, median of {setup.repeats}, L = {layers}"
    )
    print(f"{'run':<16}{'seconds':>10}{'peak GPU GB':>14}")
    for name in RUNS:
        seconds, peak = out[name]
        memory = f"{peak:.2f}" if setup.device.type == "cuda" else "-"
        print(f"{name:<16}{seconds:>10.3f}{memory:>14}")
    atp = out["atp"][0] / out["plain 2F+1B"][0]
    star = out["atp*"][0] / out["plain 2F+L*B"][0]
    print(f"ratio atp / plain 2F+1B: {atp:.2f}   (issue 8 target on the bundled model: <= 1.25)")
    print(f"ratio atp* / plain 2F+L*B: {star:.2f}   (issue 8 target at L = 80: <= 1.2)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    if torch.cuda.is_available():
        print(f"CUDA: {torch.cuda.get_device_name(0)}")
        tests_passed = run_cuda_tests()
        setup = Setup(LLAMA_1B, torch.device("cuda", 0), args.pairs, args.length, args.repeats)
    else:
        print(
            "CUDA is not available: skipping the CUDA tests (pytest -m cuda) and the 1B-parameter "
            "GPU benchmark; running the same benchmark code on a 2-layer tiny Llama on the CPU "
            "as a smoke test (its times say nothing about the GPU)."
        )
        tests_passed = True
        setup = Setup(LLAMA_SMOKE, torch.device("cpu"), 4, 16, 1)
    print("== benchmark", flush=True)
    report(setup, benchmark(setup))
    print(f"\ngpu_check finished in {time.perf_counter() - start:.0f} s")
    if not tests_passed:
        print("FAILED: the CUDA tests failed (see above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
