from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import transformers
from nnsight.modeling.transformers import TransformersModel

from atp_nnsight.data import PromptPair, ioi_pairs, keep_correct, tokenize_pairs

CANDIDATES = [" Mary", " John", " Alice", " Bob", " Tom", " Sarah", " Emma", " David"]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A tiny random Llama over the SmolLM2 vocabulary whose argmax is always one of the
    CANDIDATES tokens (their unembedding rows are scaled up), so targets are real words."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=32,
        intermediate_size=64,
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    ids = [tokenizer.encode(c, add_special_tokens=False)[0] for c in CANDIDATES]
    with torch.no_grad():
        hf.lm_head.weight[ids] *= 200.0
    return hf, TransformersModel(hf, tokenizer=copy.deepcopy(tokenizer))


def _argmax_next(hf, ids):
    with torch.no_grad():
        return int(hf(ids[None]).logits[0, -1].argmax())


def _pairs_with_mixed_targets(hf, tokenizer, prepend_bos=False):
    """IOI pairs (several token lengths) whose clean target is the model's argmax for even
    indices and another candidate for odd ones."""
    pairs = ioi_pairs(14, seed=5, tokenizer=tokenizer)
    tp = tokenize_pairs(pairs, tokenizer, prepend_bos=prepend_bos)
    out = []
    for i, p in enumerate(pairs):
        top = tokenizer.decode([_argmax_next(hf, tp.clean_ids[i])])
        assert top in CANDIDATES  # the scaled unembedding steers the argmax
        target = top if i % 2 == 0 else next(c for c in CANDIDATES if c != top)
        out.append(dataclasses.replace(p, clean_target=target))
    return out


def _expected(hf, tokenizer, pairs, prepend_bos=False):
    tp = tokenize_pairs(pairs, tokenizer, prepend_bos=prepend_bos)
    return [
        p
        for i, p in enumerate(pairs)
        if _argmax_next(hf, tp.clean_ids[i]) == int(tp.clean_target[i])
    ]


@pytest.mark.parametrize("batch_size", [3, 32])
def test_keep_correct_matches_plain_forward(tiny, tokenizer, batch_size):
    hf, model = tiny
    pairs = _pairs_with_mixed_targets(hf, tokenizer)
    assert len(set(tokenize_pairs(pairs, tokenizer).lengths)) > 1  # several length groups
    expected = _expected(hf, tokenizer, pairs)
    assert expected == pairs[::2]  # non-trivial: half kept, half dropped
    assert keep_correct(model, pairs, batch_size=batch_size) == expected


def test_keep_correct_prepend_bos(tiny, tokenizer):
    hf, model = tiny
    pairs = _pairs_with_mixed_targets(hf, tokenizer, prepend_bos=True)
    expected = _expected(hf, tokenizer, pairs, prepend_bos=True)
    assert expected == pairs[::2]
    assert keep_correct(model, pairs, prepend_bos=True, batch_size=4) == expected


def test_keep_correct_none_kept(tiny, tokenizer):
    hf, model = tiny
    pairs = _pairs_with_mixed_targets(hf, tokenizer)[1:8:2]  # all wrong targets
    with pytest.raises(ValueError, match="none of the 4 pairs tried"):
        keep_correct(model, pairs)


def test_keep_correct_validates_pairs(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match="pair 0: clean and noise prompts have different"):
        keep_correct(model, [PromptPair("Hello there", "Hello", " a", " b")])
