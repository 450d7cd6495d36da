"""Prompt pairs: validation, tokenization, JSONL/CSV/pandas I/O, built-in tasks, filtering.

A prompt pair is ``clean`` / ``noise`` prompts of equal token length with single-token
``clean_target`` / ``noise_target``; the default metric is the last-position logit difference
``logit[clean_target] - logit[noise_target]``.
"""

from .filtering import keep_correct
from .pairs import (
    FIELDS,
    PairGroup,
    PromptPair,
    TokenizedPairs,
    load_pairs,
    pairs_to_dataframe,
    save_pairs,
    tokenize_pairs,
)
from .tasks import TASKS, factual_pairs, ioi_pairs, make_task, random_pairs

__all__ = [
    "FIELDS",
    "PairGroup",
    "PromptPair",
    "TASKS",
    "TokenizedPairs",
    "factual_pairs",
    "ioi_pairs",
    "keep_correct",
    "load_pairs",
    "make_task",
    "pairs_to_dataframe",
    "random_pairs",
    "save_pairs",
    "tokenize_pairs",
]
