from __future__ import annotations

import json
import warnings
from dataclasses import astuple

import pandas as pd
import pytest
import torch

from atp_nnsight.checks import PairWarning
from atp_nnsight.data import (
    FIELDS,
    PromptPair,
    TokenizedPairs,
    load_pairs,
    pairs_to_dataframe,
    save_pairs,
    tokenize_pairs,
)

PAIRS = [
    PromptPair(
        "When Mary and John went to the store, John gave a drink to",
        "When Alice and Bob went to the store, Tom gave a drink to",
        " Mary",
        " John",
    ),
    PromptPair(
        "The city of Paris is located in the country of",
        "The city of Berlin is located in the country of",
        " France",
        " Germany",
    ),
    PromptPair(
        'Tricky, "quoted" text\nwith a newline', "ünïcödé, commas; and 'quotes'", " a", " b"
    ),
]

# token lengths under SmolLM2: 14, 10, 14, 4, 10, 14
MIXED = [
    PAIRS[0],
    PAIRS[1],
    PromptPair(
        "When Sarah and James went to the park, James gave a ring to",
        "When Emma and David went to the park, Paul gave a ring to",
        " Sarah",
        " James",
    ),
    PromptPair("When Mary and John", "When Alice and Bob", " Mary", " John"),
    PromptPair(
        "The city of Rome is located in the country of",
        "The city of Tokyo is located in the country of",
        " Italy",
        " Japan",
    ),
    PromptPair(
        "When Lucy and Henry went to the store, Henry gave a book to",
        "When Grace and Peter went to the store, Adam gave a book to",
        " Lucy",
        " Henry",
    ),
]


def _dicts(pairs):
    return [p.to_dict() for p in pairs]


# ------------------------------------------------------------------------------------------
# loading / saving
# ------------------------------------------------------------------------------------------


def test_all_sources_load_identically(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(d) + "\n" for d in _dicts(PAIRS)), encoding="utf-8")
    csv_path = tmp_path / "p.csv"
    pd.DataFrame(_dicts(PAIRS)).to_csv(csv_path, index=False)
    sources = {
        "pairs": list(PAIRS),
        "dicts": _dicts(PAIRS),
        "tuples": [astuple(p) for p in PAIRS],
        "dataframe": pd.DataFrame(_dicts(PAIRS)),
        "jsonl": jsonl,
        "jsonl-str": str(jsonl),
        "csv": csv_path,
    }
    for name, source in sources.items():
        loaded = load_pairs(source)
        assert loaded == PAIRS, name
        assert all(type(p) is PromptPair for p in loaded), name


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".JSONL"])
def test_save_load_round_trip(tmp_path, suffix):
    path = save_pairs(PAIRS, tmp_path / f"pairs{suffix}")
    assert load_pairs(path) == PAIRS


def test_dataframe_round_trip():
    df = pairs_to_dataframe(PAIRS)
    assert list(df.columns) == list(FIELDS)
    assert len(df) == len(PAIRS)
    assert df.loc[0, "clean_target"] == " Mary"
    assert load_pairs(df) == PAIRS


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n" + json.dumps(PAIRS[0].to_dict()) + "\n\n", encoding="utf-8")
    assert load_pairs(path) == [PAIRS[0]]


def test_prompt_pair_rejects_non_strings():
    with pytest.raises(TypeError, match="clean_target=5"):
        PromptPair("a", "b", 5, " c")


@pytest.mark.parametrize(
    "source, match",
    [
        ([], "no prompt pairs in the given list"),
        (pd.DataFrame(columns=list(FIELDS)), "no prompt pairs in the DataFrame"),
    ],
)
def test_empty_input(source, match):
    with pytest.raises(ValueError, match=match):
        load_pairs(source)


def test_empty_files(tmp_path):
    jsonl = tmp_path / "empty.jsonl"
    jsonl.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no prompt pairs in .*empty\.jsonl"):
        load_pairs(jsonl)
    csv_path = tmp_path / "empty.csv"
    csv_path.write_text(",".join(FIELDS) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no prompt pairs in .*empty\.csv"):
        load_pairs(csv_path)


def test_missing_fields_named_with_row():
    rows = _dicts(PAIRS)
    del rows[1]["noise"]
    del rows[1]["noise_target"]
    with pytest.raises(ValueError, match=r"pair 1: missing field\(s\) 'noise', 'noise_target'"):
        load_pairs(rows)


def test_unknown_fields_named_with_allowed_list():
    rows = _dicts(PAIRS)
    rows[2]["answer"] = "x"
    with pytest.raises(
        ValueError,
        match=r"pair 2: unknown field\(s\) 'answer'; allowed fields: clean, noise, "
        r"clean_target, noise_target",
    ):
        load_pairs(rows)


def test_non_string_values():
    rows = _dicts(PAIRS)
    rows[1]["clean_target"] = 7
    with pytest.raises(ValueError, match=r"pair 1: .*strings.*clean_target=7 \(int\)"):
        load_pairs(rows)
    df = pd.DataFrame(_dicts(PAIRS))
    df.loc[2, "noise"] = None
    with pytest.raises(ValueError, match=r"DataFrame row 2 .*noise=nan"):
        load_pairs(df)


def test_bad_tuple_and_item_types():
    with pytest.raises(ValueError, match=r"pair 1: expected a 4-tuple .* got 3 value"):
        load_pairs([astuple(PAIRS[0]), ("a", "b", " c")])
    with pytest.raises(ValueError, match=r"pair 0: expected a PromptPair, a dict or a 4-tuple"):
        load_pairs([42])
    with pytest.raises(TypeError, match=r"got a single dict; wrap it in a list: \[pair\]"):
        load_pairs(PAIRS[0].to_dict())
    with pytest.raises(TypeError, match="cannot load prompt pairs from a int"):
        load_pairs(5)


def test_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match=r"unknown file extension '\.txt'.*\.jsonl, \.csv"):
        load_pairs(tmp_path / "pairs.txt")
    with pytest.raises(ValueError, match=r"unknown file extension '\.json'"):
        save_pairs(PAIRS, tmp_path / "pairs.json")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_pairs(tmp_path / "nope.jsonl")


def test_bad_json_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(PAIRS[0].to_dict())
    path.write_text(f"{good}\n\n{good}\n{{'clean': oops}}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 4: bad JSON"):
        load_pairs(path)
    path.write_text(f"{good}\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object, got list"):
        load_pairs(path)


def test_jsonl_field_errors_name_line(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = _dicts(PAIRS)
    del rows[2]["clean"]
    path.write_text("".join(json.dumps(d) + "\n" for d in rows), encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.jsonl line 3: missing field\(s\) 'clean'"):
        load_pairs(path)


def test_csv_errors(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("clean,noise,clean_target\na,b, c\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1 \(header\): missing field\(s\) 'noise_target'"):
        load_pairs(path)
    path.write_text("clean,noise,clean_target,noise_target,id\na,b, c, d,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1 \(header\): unknown field\(s\) 'id'; allowed"):
        load_pairs(path)
    path.write_text("clean,noise,clean_target,noise_target\na,b, c, d\na,b, c\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.csv line 3: missing field\(s\) 'noise_target'"):
        load_pairs(path)
    path.write_text("clean,noise,clean_target,noise_target\na,b, c, d,extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.csv line 2: 5 values but the header has 4"):
        load_pairs(path)


def test_csv_keeps_leading_spaces_and_empty_cells(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("clean,noise,clean_target,noise_target\na,, c, d\n", encoding="utf-8")
    assert load_pairs(path) == [PromptPair("a", "", " c", " d")]


def test_files_with_a_byte_order_mark_load(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM (and uses CRLF); the header must still match."""
    csv_path = tmp_path / "excel.csv"
    pd.DataFrame([p.to_dict() for p in PAIRS]).to_csv(
        csv_path, index=False, encoding="utf-8-sig", lineterminator="\r\n"
    )
    assert csv_path.read_bytes().startswith(b"\xef\xbb\xbfclean,")
    assert load_pairs(csv_path) == PAIRS
    jsonl_path = tmp_path / "bom.jsonl"
    jsonl_path.write_text(
        "".join(json.dumps(p.to_dict()) + "\n" for p in PAIRS), encoding="utf-8-sig"
    )
    assert load_pairs(jsonl_path) == PAIRS


# ------------------------------------------------------------------------------------------
# tokenization
# ------------------------------------------------------------------------------------------


def test_tokenize_matches_tokenizer(tokenizer):
    tp = tokenize_pairs(MIXED, tokenizer)
    assert isinstance(tp, TokenizedPairs)
    assert len(tp) == len(MIXED)
    assert tp.pairs == MIXED
    for i, p in enumerate(MIXED):
        assert tp.clean_ids[i].dtype == torch.long and tp.clean_ids[i].dim() == 1
        assert tp.clean_ids[i].tolist() == tokenizer(p.clean)["input_ids"]
        assert tp.noise_ids[i].tolist() == tokenizer(p.noise)["input_ids"]
        assert [int(tp.clean_target[i])] == tokenizer.encode(
            p.clean_target, add_special_tokens=False
        )
        assert [int(tp.noise_target[i])] == tokenizer.encode(
            p.noise_target, add_special_tokens=False
        )
    assert tp.clean_target.shape == tp.noise_target.shape == (len(MIXED),)
    assert tp.clean_target.dtype == torch.long
    assert tp.lengths == [14, 10, 14, 4, 10, 14]
    # SmolLM2 adds no BOS by itself
    assert tp.clean_ids[0][0] != tokenizer.bos_token_id


def test_prepend_bos(tokenizer):
    plain = tokenize_pairs(MIXED, tokenizer)
    bos = tokenize_pairs(MIXED, tokenizer, prepend_bos=True)
    b = tokenizer.bos_token_id
    assert b is not None
    for i in range(len(MIXED)):
        assert bos.clean_ids[i].tolist() == [b, *plain.clean_ids[i].tolist()]
        assert bos.noise_ids[i].tolist() == [b, *plain.noise_ids[i].tolist()]
    assert torch.equal(bos.clean_target, plain.clean_target)
    # not doubled when the prompt already starts with BOS
    already = PromptPair(
        tokenizer.bos_token + "Hello there", tokenizer.bos_token + "Hi there", " a", " b"
    )
    tp = tokenize_pairs([already], tokenizer, prepend_bos=True)
    assert tp.clean_ids[0].tolist().count(b) == 1


class _NoBos:
    """A tokenizer stand-in without a BOS token."""

    bos_token_id = None

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, text):
        return self._tok(text)

    def encode(self, text, add_special_tokens=True):
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def convert_ids_to_tokens(self, ids):
        return self._tok.convert_ids_to_tokens(ids)


def test_prepend_bos_needs_bos(tokenizer):
    with pytest.raises(ValueError, match="no BOS token"):
        tokenize_pairs(MIXED, _NoBos(tokenizer), prepend_bos=True)
    assert len(tokenize_pairs(MIXED, _NoBos(tokenizer))) == len(MIXED)


def test_length_mismatch_shows_tokens(tokenizer):
    bad = list(MIXED)
    bad[2] = PromptPair("When Mary and John", "When Mary and Johnathan went", " Mary", " John")
    with pytest.raises(ValueError) as err:
        tokenize_pairs(bad, tokenizer)
    msg = str(err.value)
    assert msg.startswith("pair 2: clean and noise prompts have different token lengths (4 vs 6)")
    assert "clean: ['When', 'ĠMary', 'Ġand', 'ĠJohn']" in msg
    assert "noise: ['When', 'ĠMary', 'Ġand', 'ĠJohn', 'athan', 'Ġwent']" in msg


def test_multi_token_target_shows_tokens(tokenizer):
    bad = list(MIXED)
    bad[1] = PromptPair(MIXED[1].clean, MIXED[1].noise, " Mary Ann", " Germany")
    with pytest.raises(
        ValueError,
        match=r"pair 1: clean_target ' Mary Ann' is 2 tokens \['ĠMary', 'ĠAnn'\], expected "
        r"exactly 1",
    ):
        tokenize_pairs(bad, tokenizer)
    bad[1] = PromptPair(MIXED[1].clean, MIXED[1].noise, " France", "")
    with pytest.raises(ValueError, match=r"pair 1: noise_target '' is 0 tokens \[\]"):
        tokenize_pairs(bad, tokenizer)


def test_empty_prompt(tokenizer):
    bad = list(MIXED)
    bad[3] = PromptPair("", "When Alice and Bob", " Mary", " John")
    with pytest.raises(ValueError, match="pair 3: clean prompt is empty"):
        tokenize_pairs(bad, tokenizer)
    bad[3] = PromptPair("When Alice and Bob", "", " Mary", " John")
    with pytest.raises(ValueError, match="pair 3: noise prompt is empty"):
        tokenize_pairs(bad, tokenizer)


def test_empty_pair_list(tokenizer):
    with pytest.raises(ValueError, match="no prompt pairs"):
        tokenize_pairs([], tokenizer)


def test_several_problems_reported(tokenizer):
    bad = [PromptPair("a", "", " x", " y") for _ in range(8)]
    with pytest.raises(ValueError) as err:
        tokenize_pairs(bad, tokenizer)
    msg = str(err.value)
    assert "pair 0: noise prompt is empty" in msg and "pair 4: noise prompt is empty" in msg
    assert "pair 5:" not in msg
    assert msg.endswith("... and 3 more problem(s)")


# ------------------------------------------------------------------------------------------
# grouping
# ------------------------------------------------------------------------------------------


def _check_group(tp, g):
    assert g.clean.shape == g.noise.shape == (len(g.indices), g.length)
    assert g.clean.dtype == torch.long
    for row, i in enumerate(g.indices):
        assert torch.equal(g.clean[row], tp.clean_ids[i])
        assert torch.equal(g.noise[row], tp.noise_ids[i])
        assert g.clean_target[row] == tp.clean_target[i]
        assert g.noise_target[row] == tp.noise_target[i]
        assert tp.lengths[i] == g.length


def test_by_length(tokenizer):
    tp = tokenize_pairs(MIXED, tokenizer)
    groups = tp.by_length()
    assert [g.indices for g in groups] == [[0, 2, 5], [1, 4], [3]]
    assert [g.length for g in groups] == [14, 10, 4]
    assert [len(g) for g in groups] == [3, 2, 1]
    for g in groups:
        _check_group(tp, g)


def test_chunks(tokenizer):
    tp = tokenize_pairs(MIXED, tokenizer)
    chunks = tp.chunks(2)
    assert [c.indices for c in chunks] == [[0, 2], [5], [1, 4], [3]]
    for c in chunks:
        _check_group(tp, c)
    assert [c.indices for c in tp.chunks(100)] == [g.indices for g in tp.by_length()]
    assert [c.indices for c in tp.chunks(1)] == [[0], [2], [5], [1], [4], [3]]
    with pytest.raises(ValueError, match="chunk size must be a positive integer"):
        tp.chunks(0)


def test_subset(tokenizer):
    tp = tokenize_pairs(MIXED, tokenizer)
    sub = tp.subset([4, 0, 3])
    assert sub.pairs == [MIXED[4], MIXED[0], MIXED[3]]
    assert sub.lengths == [10, 14, 4]
    assert sub.clean_target.tolist() == [tp.clean_target[i].item() for i in (4, 0, 3)]
    assert sub.noise_target.tolist() == [tp.noise_target[i].item() for i in (4, 0, 3)]
    assert torch.equal(sub.noise_ids[1], tp.noise_ids[0])
    assert [g.indices for g in sub.by_length()] == [[0], [1], [2]]
    with pytest.raises(IndexError, match=r"\[6\] out of range for 6 pairs"):
        tp.subset([0, 6])


# ---- leading spaces of targets (warnings) ------------------------------------------------


def test_target_without_its_leading_space_warns(tokenizer):
    pairs = [
        PromptPair("When Mary and John went to the store, John gave a drink to",
                   "When Mary and John went to the store, Mary gave a drink to",
                   "Mary", " John"),
    ]  # fmt: skip
    with pytest.warns(PairWarning) as record:
        tokenize_pairs(pairs, tokenizer)
    message = str(record[0].message)
    assert message.startswith("pair 0 clean_target 'Mary' has no leading space")
    assert "use ' Mary'" in message and "noise_target" not in message


def test_target_with_a_space_after_a_prompt_ending_in_one_warns(tokenizer):
    pairs = [PromptPair("The capital of France is ", "The capital of Italy is ", " Paris", "Rome")]
    with pytest.warns(PairWarning, match="pair 0 clean_target ' Paris' starts with a space"):
        tokenize_pairs(pairs, tokenizer)


def test_well_spaced_and_non_word_targets_do_not_warn(tokenizer):
    pairs = [
        PromptPair("The capital of France is", "The capital of Italy is", " Paris", " Rome"),
        PromptPair("The capital of France is ", "The capital of Italy is ", "Paris", "Rome"),
        PromptPair("One plus one is", "Two plus two is", "2", "4"),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_pairs(pairs, tokenizer)
