"""The pure input checks of :mod:`atp_nnsight.checks`: metric shape and values, non-finite
results, degenerate and mis-spaced pairs, model folders, output paths."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from atp_nnsight import checks
from atp_nnsight.checks import PairWarning
from atp_nnsight.data import PromptPair, tokenize_pairs
from atp_nnsight.models.tiny import tiny_tokenizer
from atp_nnsight.results import Attribution

PAIRS = [
    PromptPair("w1 w2 w3", "w4 w5 w6", " w7", " w8"),
    PromptPair("w9 w10 w11", "w12 w13 w14", " w15", " w16"),
    PromptPair("w17 w18 w19", "w20 w21 w22", " w23", " w24"),
]


# ---- metric shape ----------------------------------------------------------------------------


def test_metric_of_shape_batch_passes():
    checks.check_metric_shape(torch.zeros(4), 4, "logit-diff")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (torch.tensor(1.5), "returned a scalar for a batch of 4 prompts"),
        (torch.zeros(4, 1), r"returned shape \[4, 1\]"),
        (torch.zeros(3), r"returned shape \[3\]"),
        (torch.zeros(4, dtype=torch.long), "returned torch.int64 values; it must return floats"),
    ],
)
def test_metric_of_the_wrong_shape_or_type_is_refused(value, expected):
    with pytest.raises(ValueError, match=expected) as info:
        checks.check_metric_shape(value, 4, "mine")
    assert "'mine'" in str(info.value)


def test_metric_returning_a_float_is_refused():
    with pytest.raises(TypeError, match=r"returned float 0.5.*shape \[batch\] = \[2\]"):
        checks.check_metric_shape(0.5, 2, "mine")


# ---- metric values ---------------------------------------------------------------------------


def test_finite_distinct_metric_values_pass():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checks.check_metric_values(np.array([1.0, 2.0, 3.0]), np.array([0.0, -1.0, 2.5]), PAIRS)


@pytest.mark.parametrize(
    ("direction", "bad_run", "run"), [("noising", 0, "clean"), ("noising", 1, "noise")]
)
def test_non_finite_metric_names_pair_and_run(direction, bad_run, run):
    values = [np.array([1.0, 2.0, 3.0]), np.array([0.0, -1.0, 2.5])]
    values[bad_run][1] = np.nan
    values[bad_run][2] = np.inf
    with pytest.raises(ValueError) as info:
        checks.check_metric_values(*values, PAIRS, direction=direction)
    message = str(info.value)
    assert message.startswith("pairs 1, 2: the metric is nan on the " + run + " run")
    assert "'w9 w10 w11' / 'w12 w13 w14'" in message and "drop these pairs" in message


def test_denoising_base_run_is_the_noise_prompt():
    with pytest.raises(ValueError, match="is nan on the noise run"):
        checks.check_metric_values(
            np.array([np.nan, 2.0, 3.0]), np.zeros(3), PAIRS, direction="denoising"
        )


def test_zero_difference_on_every_pair_is_an_error():
    same = np.array([0.5, -2.0, 3.0])
    with pytest.raises(
        ValueError, match="every pair: the metric is the same.*nothing to attribute"
    ):
        checks.check_metric_values(same, same + 1e-8, PAIRS)


def test_zero_difference_on_some_pairs_warns_naming_them_with_subset_indices():
    base, source = np.array([0.5, -2.0, 3.0]), np.array([0.5, 1.0, 3.0])
    with pytest.warns(PairWarning, match=r"^pairs 10, 30: the metric is the same") as record:
        checks.check_metric_values(base, source, PAIRS, indices=[10, 20, 30])
    assert "pair 10: 'w1 w2 w3' / 'w4 w5 w6'" in str(record[0].message)


def test_small_real_differences_are_not_zero():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checks.check_metric_values(
            np.array([10.0, 0.0, 1.0]), np.array([10.001, 1e-4, 1.0001]), PAIRS
        )


def test_metric_values_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"one base and one source value per pair.*\(2,\)"):
        checks.check_metric_values(np.zeros(2), np.ones(3), PAIRS)


# ---- non-finite results ----------------------------------------------------------------------


def _result(per_pair: np.ndarray, signed: bool = True) -> Attribution:
    n = per_pair.shape[1]
    return Attribution(
        nodes=pd.DataFrame(
            {
                "kind": ["head"] * n,
                "layer": [0] * n,
                "index": list(range(n)),
                "position": pd.array([None] * n, dtype="Int64"),
            }
        ),
        scores=np.abs(per_pair).mean(0),
        per_pair=per_pair,
        mean_effect=per_pair.mean(0) if signed else None,
        method="atp",
        direction="noising",
        metric="logit-diff",
        model="tiny",
        cost=1.0,
    )


def test_finite_result_passes():
    checks.check_finite_scores(_result(np.ones((2, 3))))


def test_non_finite_result_names_node_and_pairs_unless_allowed():
    per_pair = np.ones((3, 4))
    per_pair[[0, 2], 2] = np.nan
    result = _result(per_pair)
    with pytest.raises(ValueError) as info:
        checks.check_finite_scores(result)
    message = str(info.value)
    assert "non-finite (nan/inf) scores for 1 of 4 nodes, e.g. head L0.H2 on pairs 0, 2" in message
    assert "allow_nonfinite=True" in message
    checks.check_finite_scores(result, allow_nonfinite=True)


def test_infinite_score_without_signed_mean_is_refused():
    per_pair = np.ones((2, 2))
    per_pair[1, 0] = np.inf
    with pytest.raises(ValueError, match="e.g. head L0.H0 on pair 1"):
        checks.check_finite_scores(_result(per_pair, signed=False))


# ---- degenerate and mis-spaced pairs ---------------------------------------------------------


def test_identical_prompt_tokens_are_refused_naming_every_pair():
    pairs = [PAIRS[0], PromptPair("w1 w2", "w1  w2", " w3", " w4"), PAIRS[1]]
    pairs += [PromptPair(f"w{i} w2", f"w{i}   w2", " w3", " w4") for i in range(6)]
    with pytest.raises(ValueError, match=r"^pairs 1, 3, 4, 5, 6 and 2 more: clean and noise"):
        tokenize_pairs(pairs, tiny_tokenizer())


def test_identical_targets_warn_when_tokenizing_and_fail_under_logit_diff():
    pairs = [PAIRS[0], PromptPair("w1 w2", "w3 w4", " w5", "w5")]
    with pytest.warns(PairWarning, match="pair 1: clean_target and noise_target are the same"):
        tokenized = tokenize_pairs(pairs, tiny_tokenizer())
    with pytest.raises(ValueError, match="logit-diff metric is 0 on every run"):
        checks.check_distinct_targets(tokenized, metric="logit-diff")
    with pytest.warns(PairWarning):
        checks.check_distinct_targets(tokenized, metric="logprob")


def test_pair_texts_are_checked_before_tokenizing():
    checks.check_pair_texts(PAIRS)
    same_targets = [{**PAIRS[0].to_dict(), "noise_target": " w7"}]
    checks.check_pair_texts(same_targets, metric="logprob")
    with pytest.raises(ValueError, match="pair 0: clean_target and noise_target"):
        checks.check_pair_texts(same_targets)
    with pytest.raises(ValueError, match="pair 0: clean and noise prompts are the same"):
        checks.check_pair_texts([PromptPair("a b", "a b", " c", " d")], metric=None)


# ---- models before loading -------------------------------------------------------------------


def test_supported_model_types_match_the_adapters():
    from atp_nnsight.models import FAMILIES

    assert set(checks.SUPPORTED_MODEL_TYPES) == set(FAMILIES)


def test_bundled_config_matches_the_bundled_gguf_file():
    from gguf import GGUFReader

    from atp_nnsight.models.loading import BUNDLED_MODEL, bundled_model_path

    reader = GGUFReader(bundled_model_path())

    def field(name):
        f = reader.fields[name]
        return f.parts[f.data[0]]

    architecture = bytes(field("general.architecture")).decode()
    assert checks.BUNDLED_CONFIG == {
        "model_type": architecture,
        "num_hidden_layers": int(field(f"{architecture}.block_count")[0]),
    }
    assert checks.BUNDLED_NAME == BUNDLED_MODEL
    assert checks.read_model_config(None) == checks.BUNDLED_CONFIG


def test_model_folder_saved_by_transformers_passes(tmp_path):
    from atp_nnsight.models.tiny import tiny_hf_model

    tiny_hf_model("gpt2", n_layers=3).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    config = checks.read_model_config(str(tmp_path))
    assert config["model_type"] == "gpt2" and checks.config_n_layers(config) == 3


def test_hub_id_outside_the_cache_is_left_to_the_loader():
    assert checks.read_model_config("no-such-org/no-such-model-xyz") is None


def test_hub_id_in_the_cache_is_read_from_it(tmp_path, monkeypatch):
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "qwen2", "num_layers": 5}))
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    config = checks.read_model_config("org/tiny")
    assert config is not None and checks.config_n_layers(config) == 5


def test_loader_names_missing_tokenizer_instead_of_blaming_sentencepiece(tmp_path):
    from atp_nnsight.models.loading import ModelLoadError, load_model
    from atp_nnsight.models.tiny import tiny_hf_model

    tiny_hf_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path))
    message = str(info.value)
    assert "no tokenizer files" in message and "tokenizer.save_pretrained(folder)" in message
    assert "sentencepiece" not in message.lower() and "tiktoken" not in message.lower()


# ---- output paths ----------------------------------------------------------------------------


def test_output_file_in_a_missing_folder_is_fine_and_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b" / "scores.csv"
    assert checks.check_output_file(target) == target
    assert list(tmp_path.iterdir()) == []


def test_output_folder_rules(tmp_path):
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "report.html").write_text("old")
    (tmp_path / "empty").mkdir()
    for name in ("earlier", "empty", "new"):
        checks.check_output_folder(tmp_path / name, replaced_if="report.html")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    checks.check_output_folder(tmp_path / "other")  # not replaced as a whole: fine
    with pytest.raises(ValueError, match="already holds other files"):
        checks.check_output_folder(tmp_path / "other", replaced_if="report.html")


# ---- option values ---------------------------------------------------------------------------


def test_option_values():
    assert checks.check_int(np.int64(3), "n") == 3
    assert checks.check_int(0, "n", minimum=0) == 0
    with pytest.raises(TypeError, match="n must be an integer, got bool True"):
        checks.check_int(True, "n")
    assert checks.check_fraction(0.25, "p") == 0.25
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="p must be"):
            checks.check_fraction(bad, "p")
    with pytest.raises(TypeError, match="p must be a number, got str '0.5'"):
        checks.check_fraction("0.5", "p")
    with pytest.raises(ValueError, match="theta must be a positive finite number, got inf"):
        checks.check_positive(float("inf"), "theta")


def test_hf_model_instead_of_an_nnsight_model_says_how_to_wrap_it():
    from atp_nnsight.models.tiny import tiny_hf_model, tiny_model

    checks.check_model(tiny_model("llama"))
    with pytest.raises(TypeError, match="TransformersModel\\(hf_model, tokenizer=tokenizer\\)"):
        checks.check_model(tiny_hf_model("llama"))
