"""Measure the activation peak of one ``attribute`` call in a fresh process (for test_plan).

    python tests/plan_measure.py '{"model": "tiny", "n_layers": 4, ...}'

Prints one JSON line: ``{"peak": bytes, "pairs_per_chunk": n}``. Runs under
``MALLOC_ARENA_MAX=1`` (set by the caller) so :mod:`atp_nnsight.memory` sees every allocation.
"""

from __future__ import annotations

import json
import sys

import torch


def main(spec: dict) -> dict:
    from atp_nnsight import attribute, tokenize_pairs
    from atp_nnsight.memory import peak_during

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent.parent / "benchmarks"))
    from common import random_token_pairs

    torch.manual_seed(0)
    if spec["model"] == "bundled":
        from atp_nnsight import load_model

        model = load_model()
    else:
        from atp_nnsight.models.tiny import tiny_model

        model = tiny_model("llama", n_layers=spec["n_layers"], **spec.get("config", {}))
    vocab = model._module.config.vocab_size
    words = min(vocab, 100)  # the tiny tokenizer's words; any ids work for the bundled model
    if spec["model"] == "bundled":
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (2 * spec["pairs"], spec["seq_len"]), generator=g)
        pairs = _id_pairs(ids, spec["pairs"], vocab)
    else:
        pairs = tokenize_pairs(
            random_token_pairs(spec["pairs"], spec["seq_len"], words), model.tokenizer
        )
    kwargs = dict(method=spec["method"], pairs_per_chunk=spec["pairs"], progress=False)
    # a warm-up on the same batch shape: first calls with a new shape allocate one-time caches
    attribute(model, pairs, spec["nodes"], **{**kwargs, "layers": [0]})
    _, before, peak, _ = peak_during(lambda: attribute(model, pairs, spec["nodes"], **kwargs))
    return {"peak": peak - before}


def _id_pairs(ids: torch.Tensor, n: int, vocab: int):
    from atp_nnsight.data import PromptPair, TokenizedPairs

    return TokenizedPairs(
        pairs=[PromptPair(f"c{i}", f"n{i}", "a", "b") for i in range(n)],
        clean_ids=list(ids[:n]),
        noise_ids=list(ids[n : 2 * n]),
        clean_target=torch.arange(n) % vocab,
        noise_target=(torch.arange(n) + 1) % vocab,
    )


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
