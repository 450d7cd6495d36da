"""The command line on a tiny model saved to disk (``--model DIR``) and a pairs file."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from atp_nnsight import Attribution, patch
from atp_nnsight.cli import main
from atp_nnsight.models.loading import load_model
from atp_nnsight.models.tiny import tiny_hf_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_hf_model("llama", n_layers=2, seed=4).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = []
    for _ in range(3):
        words = lambda: " ".join(f"w{i}" for i in rng.integers(0, 90, 5))  # noqa: E731
        rows.append(
            {"clean": words(), "noise": words(), "clean_target": " w1", "noise_target": " w2"}
        )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_patch_writes_csv_and_full_result(model_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "heads.csv"
    args = ["patch", "--model", model_dir, "--pairs", pairs_file, "--nodes", "head,neuron"]
    assert main(args + ["--layers", "1", "--out", str(out), "--no-progress"]) == 0
    df = pd.read_csv(out)
    assert list(df.columns) == ["kind", "layer", "index", "position", "score", "mean_effect"]
    assert set(df["layer"]) == {1} and df["position"].isna().all()
    np.testing.assert_allclose(df["score"], df["mean_effect"].abs(), rtol=1e-6)
    full = Attribution.load(out.with_suffix(".npz"))
    expected = patch(load_model(model_dir), pairs_file, "head,neuron", layers=[1], progress=False)
    np.testing.assert_allclose(full.per_pair, expected.per_pair, atol=1e-5)
    assert "top 20 nodes by score" in capsys.readouterr().out


def test_attribute_per_position(model_dir, pairs_file, tmp_path):
    out = tmp_path / "q.csv"
    args = ["attribute", "--model", model_dir, "--pairs", pairs_file, "--nodes", "q,k"]
    assert main(args + ["--method", "atp*", "--per-position", "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert df["position"].notna().all() and set(df["position"]) == set(range(5))
    assert df["mean_effect"].isna().all()  # GradDrop scores are unsigned


def test_run_writes_report(model_dir, pairs_file, tmp_path, capsys):
    folder = tmp_path / "report"
    args = ["run", "--model", model_dir, "--pairs", pairs_file, "--verify", "3"]
    assert main(args + ["--out", str(folder), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "verified by exact patching" in text and "report:" in text
    html = (folder / "report.html").read_text()
    assert "data:image/png;base64" in html
    assert len(list(folder.glob("*.png"))) >= 3


def test_bad_pairs_file_is_a_clear_error(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "w1 w2", "noise": "w3 w4", "clean_target": " w5"}\n')
    assert main(["patch", "--model", model_dir, "--pairs", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "noise_target" in err and "line 1" in err
