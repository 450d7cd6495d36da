"""Prompt pairs: the unit of data for attribution patching.

Conventions (pinned for the whole package):

* A **prompt pair** has a ``clean`` and a ``noise`` prompt of *equal token length* and two
  *single-token* targets, ``clean_target`` and ``noise_target`` (strings such as ``" Mary"``;
  mind the leading space of BPE vocabularies).
* The default metric is the logit difference at the last position,
  ``logit[clean_target] - logit[noise_target]``.
* Prompts are tokenized with the tokenizer's own defaults (``tokenizer(text)["input_ids"]``): a
  BOS token is present only if the tokenizer adds one itself, or if ``prepend_bos=True`` is asked
  for. Targets are encoded with ``add_special_tokens=False`` and must be exactly one token.

Pairs load from a list of :class:`PromptPair`, dicts or 4-tuples
``(clean, noise, clean_target, noise_target)``, a pandas DataFrame, or a ``.jsonl`` / ``.csv``
file with the columns ``clean``, ``noise``, ``clean_target``, ``noise_target``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atp_nnsight import checks

if TYPE_CHECKING:
    import torch

FIELDS: tuple[str, ...] = ("clean", "noise", "clean_target", "noise_target")
"""The fields of a prompt pair, in order (also the column order of saved files)."""

FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".csv")

_MAX_REPORTED = 5


@dataclass(frozen=True)
class PromptPair:
    """One clean/noise prompt pair with single-token targets (see the module docstring)."""

    clean: str
    noise: str
    clean_target: str
    noise_target: str

    def __post_init__(self) -> None:
        bad = [f.name for f in fields(self) if not isinstance(getattr(self, f.name), str)]
        if bad:
            shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in bad)
            raise TypeError(f"PromptPair fields must be strings; got {shown}")

    def to_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in FIELDS}


# --------------------------------------------------------------------------------------------
# loading and saving
# --------------------------------------------------------------------------------------------


def _pair_from_mapping(row: Mapping[str, Any], where: str) -> PromptPair:
    keys = list(row.keys())
    unknown = [k for k in keys if k not in FIELDS]
    if unknown:
        raise ValueError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed fields: {', '.join(FIELDS)}"
        )
    missing = [f for f in FIELDS if f not in row or row[f] is None]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
    bad = [(f, row[f]) for f in FIELDS if not isinstance(row[f], str)]
    if bad:
        shown = ", ".join(f"{f}={v!r} ({type(v).__name__})" for f, v in bad)
        raise ValueError(f"{where}: field values must be strings; got {shown}")
    return PromptPair(**{f: row[f] for f in FIELDS})


def _pair_from_item(item: Any, where: str) -> PromptPair:
    if isinstance(item, PromptPair):
        return item
    if isinstance(item, Mapping):
        return _pair_from_mapping(item, where)
    if isinstance(item, (tuple, list)):
        if len(item) != len(FIELDS):
            raise ValueError(
                f"{where}: expected a 4-tuple ({', '.join(FIELDS)}); got {len(item)} value(s)"
            )
        return _pair_from_mapping(dict(zip(FIELDS, item, strict=True)), where)
    raise ValueError(
        f"{where}: expected a PromptPair, a dict or a 4-tuple; got {type(item).__name__}"
    )


def _load_jsonl(path: Path) -> list[PromptPair]:
    pairs = []
    with path.open(encoding="utf-8-sig") as fh:  # -sig: accept a byte-order mark
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: bad JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            pairs.append(_pair_from_mapping(row, where))
    return pairs


def _load_csv(path: Path) -> list[PromptPair]:
    pairs = []
    with path.open(encoding="utf-8-sig", newline="") as fh:  # -sig: Excel writes a BOM
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        unknown = [h for h in header if h not in FIELDS]
        if unknown:
            raise ValueError(
                f"{path} line 1 (header): unknown field(s) {', '.join(map(repr, unknown))}; "
                f"allowed fields: {', '.join(FIELDS)}"
            )
        missing = [f for f in FIELDS if f not in header]
        if header and missing:
            raise ValueError(
                f"{path} line 1 (header): missing field(s) {', '.join(map(repr, missing))}"
            )
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if None in row:  # more values than header columns
                raise ValueError(
                    f"{where}: {len(header) + len(row[None])} values but the header has "
                    f"{len(header)} columns ({', '.join(header)})"
                )
            pairs.append(_pair_from_mapping(row, where))
    return pairs


def load_pairs(source: Any) -> list[PromptPair]:
    """Load and validate prompt pairs.

    ``source`` is a list (or other iterable) of :class:`PromptPair`, dicts with exactly the keys
    ``clean``, ``noise``, ``clean_target``, ``noise_target``, or 4-tuples in that order; a pandas
    DataFrame with those columns; or a path (``str`` / ``Path``) to a ``.jsonl`` (one JSON object
    per line; blank lines are skipped) or ``.csv`` (header row) file.

    Raises ``ValueError`` naming the offending pair index / file line for: no pairs at all,
    missing or unknown fields, non-string values, bad JSON, an unknown file extension.
    Token-level checks (equal lengths, single-token targets) happen in :func:`tokenize_pairs`.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        suffix = path.suffix.lower()
        if suffix not in FILE_SUFFIXES:
            raise ValueError(
                f"unknown file extension {path.suffix!r} for {path}; "
                f"use one of {', '.join(FILE_SUFFIXES)}"
            )
        if not path.is_file():
            raise FileNotFoundError(
                f"no such prompt-pair file: {path}; check the path (a .jsonl or .csv file with "
                f"the fields {', '.join(FIELDS)})"
            )
        pairs = _load_jsonl(path) if suffix == ".jsonl" else _load_csv(path)
        what = str(path)
    elif _is_dataframe(source):
        pairs = [
            _pair_from_mapping(row, f"DataFrame row {i} (index {label!r})")
            for i, (label, row) in enumerate(
                zip(source.index, source.to_dict(orient="records"), strict=True)
            )
        ]
        what = "the DataFrame"
    elif isinstance(source, (Mapping, PromptPair)):
        raise TypeError(
            f"pairs must be a list of pairs, got a single {type(source).__name__}; wrap it in a "
            "list: [pair]"
        )
    elif not isinstance(source, Iterable) or isinstance(source, bytes):
        raise TypeError(
            f"cannot load prompt pairs from a {type(source).__name__}; pass a list of "
            "PromptPair/dicts/4-tuples, a pandas DataFrame, or a .jsonl/.csv path"
        )
    else:
        pairs = [_pair_from_item(item, f"pair {i}") for i, item in enumerate(source)]
        what = f"the given {type(source).__name__}"
    if not pairs:
        raise ValueError(
            f"no prompt pairs in {what}; give at least one pair with the fields {', '.join(FIELDS)}"
        )
    return pairs


def _is_dataframe(obj: Any) -> bool:
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency
        return False
    return isinstance(obj, pd.DataFrame)


def pairs_to_dataframe(pairs: Any):
    """A pandas DataFrame with one row per pair and the columns of :data:`FIELDS`."""
    import pandas as pd

    pairs = load_pairs(pairs)
    return pd.DataFrame([astuple(p) for p in pairs], columns=list(FIELDS))


def save_pairs(pairs: Any, path: str | Path) -> Path:
    """Write pairs to ``.jsonl`` or ``.csv`` (chosen by extension); :func:`load_pairs` reads
    the file back to the same pairs. Returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(
            f"unknown file extension {path.suffix!r} for {path}; "
            f"use one of {', '.join(FILE_SUFFIXES)}"
        )
    pairs = load_pairs(pairs)
    if suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as fh:
            for p in pairs:
                fh.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
    else:
        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(FIELDS)
            writer.writerows(astuple(p) for p in pairs)
    return path


# --------------------------------------------------------------------------------------------
# tokenization
# --------------------------------------------------------------------------------------------


@dataclass
class PairGroup:
    """Pairs of one token length, stacked: ``clean``/``noise`` are ``[n, length]``, the targets
    ``[n]``; ``indices`` are the pairs' positions in the :class:`TokenizedPairs` they came from."""

    indices: list[int]
    clean: torch.LongTensor
    noise: torch.LongTensor
    clean_target: torch.LongTensor
    noise_target: torch.LongTensor
    length: int

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class TokenizedPairs:
    """Validated, tokenized prompt pairs (made by :func:`tokenize_pairs`).

    ``clean_ids[i]`` / ``noise_ids[i]`` are 1-D token tensors of equal length; ``clean_target`` /
    ``noise_target`` hold one token id per pair (``[P]``). Pairs may have different lengths from
    each other: use :meth:`by_length` or :meth:`chunks` to get stackable groups (no padding).
    """

    pairs: list[PromptPair]
    clean_ids: list[torch.LongTensor]
    noise_ids: list[torch.LongTensor]
    clean_target: torch.LongTensor
    noise_target: torch.LongTensor

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def lengths(self) -> list[int]:
        """Token length of each pair (clean and noise have the same length)."""
        return [int(ids.shape[0]) for ids in self.clean_ids]

    def _group(self, indices: list[int]) -> PairGroup:
        import torch

        return PairGroup(
            indices=list(indices),
            clean=torch.stack([self.clean_ids[i] for i in indices]),
            noise=torch.stack([self.noise_ids[i] for i in indices]),
            clean_target=self.clean_target[indices],
            noise_target=self.noise_target[indices],
            length=int(self.clean_ids[indices[0]].shape[0]),
        )

    def by_length(self) -> list[PairGroup]:
        """Groups of equal-length pairs, in order of first appearance, indices ascending."""
        order: dict[int, list[int]] = {}
        for i, n in enumerate(self.lengths):
            order.setdefault(n, []).append(i)
        return [self._group(idx) for idx in order.values()]

    def chunks(self, size: int) -> list[PairGroup]:
        """The :meth:`by_length` groups split into pieces of at most ``size`` pairs."""
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"chunk size must be a positive integer, got {size!r}")
        out = []
        for group in self.by_length():
            for start in range(0, len(group.indices), size):
                out.append(self._group(group.indices[start : start + size]))
        return out

    def subset(self, indices: Iterable[int]) -> TokenizedPairs:
        """The pairs at ``indices`` (in that order), as a new :class:`TokenizedPairs`."""
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not -len(self) <= i < len(self)]
        if bad:
            raise IndexError(f"pair index(es) {bad} out of range for {len(self)} pairs")
        idx = [i % len(self) for i in idx]
        return TokenizedPairs(
            pairs=[self.pairs[i] for i in idx],
            clean_ids=[self.clean_ids[i] for i in idx],
            noise_ids=[self.noise_ids[i] for i in idx],
            clean_target=self.clean_target[idx],
            noise_target=self.noise_target[idx],
        )


def _tokens(tokenizer: Any, ids: list[int]) -> list[str]:
    return list(tokenizer.convert_ids_to_tokens(list(ids)))


def tokenize_pairs(pairs: Any, tokenizer: Any, prepend_bos: bool = False) -> TokenizedPairs:
    """Tokenize and validate prompt pairs.

    ``pairs`` is anything :func:`load_pairs` accepts. Prompts use the tokenizer's defaults
    (``tokenizer(text)["input_ids"]``); with ``prepend_bos=True`` the tokenizer's
    ``bos_token_id`` is prepended unless it is already the first token. Targets are encoded with
    ``add_special_tokens=False`` and must be exactly one token.

    Raises ``ValueError`` naming the pair index (0-based) and showing the tokens for: clean and
    noise prompts of different token lengths, a target that is not exactly one token or is the
    tokenizer's unknown token, an empty prompt, and no pairs at all (up to five problems are
    listed in one error); and for clean and noise prompts of identical tokens (nothing to
    patch). Warns (:class:`~atp_nnsight.checks.PairWarning`) about identical targets and
    about targets whose leading space does not match how the prompt continues.
    """
    import torch

    checks.check_tokenizer(tokenizer)
    pairs = load_pairs(pairs)
    unk = getattr(tokenizer, "unk_token_id", None)
    bos = None
    if prepend_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ValueError(
                "prepend_bos=True but the tokenizer has no BOS token (bos_token_id is None)"
            )

    def encode_prompt(text: str) -> list[int]:
        ids = list(tokenizer(text)["input_ids"])
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    problems: list[str] = []
    clean_ids: list[torch.Tensor] = []
    noise_ids: list[torch.Tensor] = []
    clean_tgt: list[int] = []
    noise_tgt: list[int] = []
    for i, p in enumerate(pairs):
        errs = []
        for name in ("clean", "noise"):
            if not getattr(p, name):
                errs.append(f"pair {i}: {name} prompt is empty")
        c = encode_prompt(p.clean)
        n = encode_prompt(p.noise)
        if not errs and len(c) != len(n):
            errs.append(
                f"pair {i}: clean and noise prompts have different token lengths "
                f"({len(c)} vs {len(n)})\n"
                f"  clean: {_tokens(tokenizer, c)}\n"
                f"  noise: {_tokens(tokenizer, n)}"
            )
        targets = []
        for name in ("clean_target", "noise_target"):
            text = getattr(p, name)
            ids = list(tokenizer.encode(text, add_special_tokens=False))
            if len(ids) != 1:
                errs.append(
                    f"pair {i}: {name} {text!r} is {len(ids)} tokens {_tokens(tokenizer, ids)}, "
                    "expected exactly 1"
                )
            elif unk is not None and ids[0] == unk and text.strip() != tokenizer.unk_token:
                errs.append(
                    f"pair {i}: {name} {text!r} is not in the vocabulary (it is the unknown "
                    f"token {tokenizer.unk_token!r}); use a word the tokenizer knows"
                )
            targets.append(ids[0] if ids else -1)
        if errs:
            problems.extend(errs)
            continue
        clean_ids.append(torch.tensor(c, dtype=torch.long))
        noise_ids.append(torch.tensor(n, dtype=torch.long))
        clean_tgt.append(targets[0])
        noise_tgt.append(targets[1])
    if problems:
        more = len(problems) - _MAX_REPORTED
        msg = "\n".join(problems[:_MAX_REPORTED])
        if more > 0:
            msg += f"\n... and {more} more problem(s)"
        raise ValueError(msg)
    tokenized = TokenizedPairs(
        pairs=pairs,
        clean_ids=clean_ids,
        noise_ids=noise_ids,
        clean_target=torch.tensor(clean_tgt, dtype=torch.long),
        noise_target=torch.tensor(noise_tgt, dtype=torch.long),
    )
    checks.check_distinct_prompts(tokenized)
    checks.check_distinct_targets(tokenized, metric=None)
    checks.check_target_spacing(tokenized, tokenizer)
    return tokenized
