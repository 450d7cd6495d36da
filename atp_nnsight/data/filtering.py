"""Filtering prompt pairs by model behaviour."""

from __future__ import annotations

from typing import Any

from .pairs import PromptPair, tokenize_pairs


def keep_correct(
    model: Any,
    pairs: Any,
    prepend_bos: bool = False,
    batch_size: int = 32,
    remote: bool | str = False,
) -> list[PromptPair]:
    """The pairs whose clean prompt the model completes with the clean target.

    ``model`` is an nnsight ``TransformersModel`` (its ``model.tokenizer`` tokenizes the pairs,
    see :func:`atp_nnsight.data.tokenize_pairs`); ``pairs`` is anything
    :func:`atp_nnsight.data.load_pairs` accepts. A pair is kept when the argmax of the
    last-position logits of the clean prompt is ``clean_target``. Pairs are run in equal-length
    chunks of at most ``batch_size`` (no padding), one trace per chunk; ``remote`` is passed to
    ``model.trace``. The kept pairs are returned in their original order.

    Raises ``ValueError`` if no pair is kept.
    """
    tokenized = tokenize_pairs(pairs, model.tokenizer, prepend_bos=prepend_bos)
    kept: list[int] = []
    for group in tokenized.chunks(batch_size):
        with model.trace(group.clean, use_cache=False, logits_to_keep=1, remote=remote):
            top = model.output.logits[:, -1].argmax(-1).detach().cpu().save()
        hits = (top == group.clean_target).tolist()
        kept.extend(i for i, hit in zip(group.indices, hits, strict=True) if hit)
    if not kept:
        raise ValueError(
            f"keep_correct: the model predicted the clean target for none of the "
            f"{len(tokenized)} pairs tried"
        )
    return [tokenized.pairs[i] for i in sorted(kept)]
