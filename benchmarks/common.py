"""Shared by the benchmark scripts: built-in task pairs and cached exact ground truth, random
token pairs, the plain-PyTorch baseline passes and markdown tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from atp_nnsight import Attribution, PromptPair, keep_correct, make_task, patch

OUT = Path(__file__).parent / "results"


def task_pairs(model, task: str, n: int) -> list:
    """``n`` built-in ``task`` pairs the model gets right (drawn from 3n candidates)."""
    pairs = keep_correct(model, make_task(task, 3 * n, tokenizer=model.tokenizer))
    if len(pairs) < n:
        raise RuntimeError(f"only {len(pairs)} of {3 * n} {task} pairs are answered correctly")
    return pairs[:n]


def ground_truth(model, pairs, kinds: str, layers, name: str) -> Attribution:
    """Exact patching of every node, cached as ``results/exact_<name>.npz``."""
    path = OUT / f"exact_{name}.npz"
    if path.exists():
        cached = Attribution.load(path)
        if [p for p in cached.pairs] == [p.to_dict() for p in pairs]:
            return cached
    result = patch(model, pairs, kinds, layers=layers)
    OUT.mkdir(parents=True, exist_ok=True)
    result.save(path)
    return result


def random_token_pairs(n: int, length: int, vocab_size: int, seed: int = 0) -> list:
    """``n`` pairs of random token ids for :func:`atp_nnsight.models.tiny.tiny_tokenizer`.

    Its words ``w{id}`` are single tokens, so the prompts tokenize to exactly ``length`` ids
    drawn from ``0 .. vocab_size - 3`` (clean and noise differ, and so do the two targets).
    """
    generator = torch.Generator().manual_seed(seed)
    n_words = vocab_size - 2  # w0 .. w{V-3}; the last two ids are <unk> and <eos>
    clean = torch.randint(0, n_words, (n, length), generator=generator).tolist()
    noise = torch.randint(0, n_words, (n, length), generator=generator).tolist()
    target = torch.randint(0, n_words, (n,), generator=generator)
    other = (target + torch.randint(1, n_words, (n,), generator=generator)) % n_words
    text = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
    return [
        PromptPair(text(c), text(x), f"w{t}", f"w{o}")
        for c, x, t, o in zip(clean, noise, target.tolist(), other.tolist(), strict=True)
    ]


def plain_passes(hf, tok, n_backward: int, pairs_per_chunk: int) -> None:
    """Plain PyTorch over the pairs ``tok``, per chunk: noise forward (no grad), clean forward
    and ``n_backward`` backwards of the logit difference to the embeddings (the residual stream
    entering layer 0) with ``torch.autograd.grad``. No nnsight; ``hf`` is the raw model."""
    embed = hf.get_input_embeddings()
    device = embed.weight.device
    for g in tok.chunks(pairs_per_chunk):
        with torch.no_grad():
            hf(g.noise.to(device), use_cache=False)
        emb = embed(g.clean.to(device)).detach().requires_grad_(True)
        last = hf(inputs_embeds=emb, use_cache=False).logits[:, -1].float()
        rows = torch.arange(len(g), device=device)
        clean, noise = g.clean_target.to(device), g.noise_target.to(device)
        metric = (last[rows, clean] - last[rows, noise]).sum()
        for i in range(n_backward):
            torch.autograd.grad(metric, emb, retain_graph=i < n_backward - 1)


def markdown_table(df: pd.DataFrame, float_format: str = "g") -> str:
    """``df`` as a GitHub markdown table; floats formatted with ``float_format``."""
    rows = [list(map(str, df.columns))] + [
        [format(v, float_format) if isinstance(v, float) else str(v) for v in row]
        for row in df.itertuples(index=False)
    ]
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(df.columns))
    return "\n".join(lines)
