from __future__ import annotations

import re
import warnings

import pytest

from atp_nnsight.checks import PairWarning
from atp_nnsight.data import (
    TASKS,
    PromptPair,
    factual_pairs,
    ioi_pairs,
    make_task,
    random_pairs,
    tokenize_pairs,
)
from atp_nnsight.data.tasks import (
    CITY_COUNTRY,
    FACTUAL_TEMPLATES,
    IOI_NAMES,
    IOI_TEMPLATES,
    RANDOM_CORPUS,
)

NAME_RE = re.compile(r"\b(" + "|".join(IOI_NAMES) + r")\b")
COUNTRY = dict(CITY_COUNTRY)


def _names(text):
    return NAME_RE.findall(text)


def test_task_registry():
    assert set(TASKS) == {"ioi", "factual", "random"}
    assert len(IOI_TEMPLATES) >= 6
    assert len(CITY_COUNTRY) >= 30
    assert len(FACTUAL_TEMPLATES) >= 3


@pytest.mark.parametrize("name", ["ioi", "factual", "random"])
def test_deterministic_and_valid_under_tokenizer(tokenizer, name):
    a = make_task(name, 40, seed=3, tokenizer=tokenizer)
    b = make_task(name, 40, seed=3, tokenizer=tokenizer)
    c = make_task(name, 40, seed=4, tokenizer=tokenizer)
    assert a == b
    assert a != c
    assert len(a) == 40 and all(isinstance(p, PromptPair) for p in a)
    assert a == TASKS[name](40, seed=3, tokenizer=tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PairWarning)  # built-in tasks mind the leading space
        tp = tokenize_pairs(a, tokenizer)  # raises on unequal lengths or multi-token targets
    assert len(tp) == 40
    for p in a:
        assert len(tokenizer.encode(p.clean_target, add_special_tokens=False)) == 1
        assert len(tokenizer.encode(p.noise_target, add_special_tokens=False)) == 1
        assert len(tokenizer(p.clean)["input_ids"]) == len(tokenizer(p.noise)["input_ids"])
        assert p.clean != p.noise


@pytest.mark.parametrize("fn", [ioi_pairs, factual_pairs])
def test_deterministic_without_tokenizer(fn):
    assert fn(25, seed=7) == fn(25, seed=7)
    assert fn(25, seed=7) != fn(25, seed=8)


def test_ioi_construction():
    pairs = ioi_pairs(60, seed=0)
    orders = []
    for i, p in enumerate(pairs):
        clean, noise = _names(p.clean), _names(p.noise)
        assert len(clean) == 3 and len(noise) == 3, p
        io, s = p.clean_target.strip(), p.noise_target.strip()
        assert p.clean_target == " " + io and p.noise_target == " " + s
        assert io != s
        if clean == [io, s, s]:
            orders.append("ABBA")
        elif clean == [s, io, s]:
            orders.append("BABA")
        else:
            pytest.fail(f"pair {i} is neither ABBA nor BABA: {p}")
        # ABC corruption: three distinct names, none of them IO or S
        assert len(set(noise)) == 3
        assert not set(noise) & {io, s}
        # same template, place and object: only the names differ
        assert NAME_RE.sub("_", p.clean) == NAME_RE.sub("_", p.noise)
        assert any(NAME_RE.sub("_", p.clean).startswith(t.split("{0}")[0]) for t in IOI_TEMPLATES)
    assert orders[:4] == ["ABBA", "BABA", "ABBA", "BABA"]
    assert orders.count("ABBA") == orders.count("BABA") == 30
    assert len({NAME_RE.sub("_", p.clean) for p in pairs}) > 10


class _MaryIsTwoTokens:
    """Delegates to a real tokenizer but makes " Mary" two tokens."""

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, text):
        return self._tok(text)

    def encode(self, text, add_special_tokens=True):
        if text == " Mary":
            return [1, 2]
        return self._tok.encode(text, add_special_tokens=add_special_tokens)


def test_ioi_uses_only_single_token_names(tokenizer):
    pairs = ioi_pairs(200, seed=0, tokenizer=_MaryIsTwoTokens(tokenizer))
    assert not any("Mary" in p.clean or "Mary" in p.noise for p in pairs)
    assert any("Mary" in p.clean for p in ioi_pairs(200, seed=0))


def test_ioi_too_few_names():
    class Tok:
        def encode(self, text, add_special_tokens=True):
            return [1, 2]

    with pytest.raises(ValueError, match="at least 5 single-token names; only 0"):
        ioi_pairs(3, tokenizer=Tok())


def test_factual_construction(tokenizer):
    cities = "|".join(c for c, _ in CITY_COUNTRY)
    city_re = re.compile(r"\b(" + cities + r")\b")
    for pairs in (factual_pairs(50, seed=1), factual_pairs(50, seed=1, tokenizer=tokenizer)):
        for p in pairs:
            [clean_city], [noise_city] = city_re.findall(p.clean), city_re.findall(p.noise)
            assert p.clean_target == " " + COUNTRY[clean_city]
            assert p.noise_target == " " + COUNTRY[noise_city]
            assert p.clean_target != p.noise_target
            assert p.noise == p.clean.replace(clean_city, noise_city)
            assert any(p.clean == t.format(city=clean_city) for t in FACTUAL_TEMPLATES)
    assert factual_pairs(1, seed=0)[0].clean.endswith("in the country of")


def test_random_pairs(tokenizer):
    pairs = random_pairs(30, seed=2, tokenizer=tokenizer)
    for p in pairs:
        clean_src = [s for s in RANDOM_CORPUS if s.startswith(p.clean + p.clean_target)]
        noise_src = [s for s in RANDOM_CORPUS if s.startswith(p.noise + p.noise_target)]
        assert clean_src and noise_src, p
        assert clean_src != noise_src
        assert p.clean_target != p.noise_target
        assert p.clean_target[0] == " " and p.noise_target[0] == " "  # cut where a word starts
        assert len(tokenizer(p.clean)["input_ids"]) >= 4
    with pytest.raises(ValueError, match="random_pairs needs a tokenizer"):
        random_pairs(3)
    with pytest.raises(ValueError, match="random_pairs needs a tokenizer"):
        make_task("random", 3)


def test_make_task_errors():
    with pytest.raises(ValueError, match=r"unknown task 'iio'; known tasks: factual, ioi, random"):
        make_task("iio", 3)
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        make_task("ioi", 0)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        factual_pairs(2.5)
