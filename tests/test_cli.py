"""The command line on a tiny model saved to disk (``--model DIR``) and a pairs file."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from atp_nnsight import Attribution, patch
from atp_nnsight.cli import main
from atp_nnsight.metrics import METRICS
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
    header = next(line for line in text.splitlines() if line.lstrip().startswith("rank"))
    assert header.split() == ["rank", "layer", "index", "score", "exact"]
    html = (folder / "report.html").read_text()
    assert "data:image/png;base64" in html
    assert len(list(folder.glob("*.png"))) >= 3
    # run has no ground truth: no (circular) cost-of-verified-recall figure
    assert "Cost of verified recall" not in html
    assert not (folder / "verified_recall.png").exists()


def test_run_report_gives_the_diagnostic_command_or_its_bound(
    model_dir, pairs_file, tmp_path, capsys
):
    args = ["run", "--model", model_dir, "--pairs", pairs_file, "--verify", "2"]
    args += ["--nodes", "head", "--no-progress", "--out"]
    assert main(args + [str(tmp_path / "plain")]) == 0
    html = (tmp_path / "plain" / "report.html").read_text()
    assert "Nothing bounds the effects" in html
    assert f"atp-nnsight run --model {model_dir}" in html and "--diagnose</code>" in html

    assert main(args + [str(tmp_path / "diag"), "--diagnose", "--subsets", "8"]) == 0
    out = capsys.readouterr().out
    assert "(diagnostic) forward passes" in out and "upper bound on the largest unverified" in out
    html = (tmp_path / "diag" / "report.html").read_text()
    assert "Nothing bounds the effects" not in html
    assert "The false-negative diagnostic patched 8 random subsets" in html


def test_run_tables_show_the_signed_estimate_of_a_signed_method(
    model_dir, pairs_file, tmp_path, capsys
):
    folder = tmp_path / "report"
    args = ["run", "--model", model_dir, "--pairs", pairs_file, "--verify", "2"]
    args += ["--method", "atp", "--nodes", "head", "--out", str(folder), "--no-progress"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("rank"))
    assert lines[header].split() == ["rank", "layer", "index", "score", "estimate", "exact"]
    first = lines[header + 1].split()
    assert first[4] != "-" and float(first[4]) != 0.0


def test_bad_pairs_file_is_a_clear_error(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "w1 w2", "noise": "w3 w4", "clean_target": " w5"}\n')
    assert main(["patch", "--model", model_dir, "--pairs", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "noise_target" in err and "line 1" in err


# ---- outputs: one convention, atomic ---------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".npz"])
def test_out_suffix_names_one_of_the_two_files_written(model_dir, pairs_file, tmp_path, suffix):
    folder = tmp_path / "new" / "folder"  # created when the results are written
    args = ["attribute", "--model", model_dir, "--pairs", pairs_file, "--method", "atp"]
    assert (
        main(args + ["--layers", "1", "--out", str(folder / f"res{suffix}"), "--no-progress"]) == 0
    )
    table = pd.read_csv(folder / "res.csv")
    full = Attribution.load(folder / "res.npz")
    np.testing.assert_allclose(table["score"], full.scores, rtol=1e-6)
    assert sorted(p.name for p in folder.iterdir()) == ["res.csv", "res.npz"]


def test_failed_npz_write_leaves_the_earlier_outputs(model_dir, pairs_file, tmp_path, monkeypatch):
    out = tmp_path / "res.csv"
    args = ["attribute", "--model", model_dir, "--pairs", pairs_file, "--method", "atp"]
    args += ["--layers", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_save(self, path):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Attribution, "save", broken_save)
    assert main(args + ["--nodes", "neuron"]) == 1
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_run_replaces_an_earlier_report_only_when_complete(
    model_dir, pairs_file, tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "report"
    args = ["run", "--model", model_dir, "--pairs", pairs_file, "--nodes", "head"]
    args += ["--verify", "2", "--out", str(folder), "--no-progress"]
    assert main(args) == 0
    first = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert "report.html" in first

    def crash(folder, *args, **kwargs):
        (Path(folder) / "report.html").write_text("half")
        raise RuntimeError("plotting failed")

    monkeypatch.setattr("atp_nnsight.report.write_report", crash)
    assert main(args[:-3] + ["--verify", "3", "--out", str(folder), "--no-progress"]) == 1
    assert "plotting failed" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == first
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary folder left
    monkeypatch.undo()
    assert main(args[:-3] + ["--verify", "3", "--out", str(folder), "--no-progress"]) == 0
    assert "--verify 3" in (folder / "report.html").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


# ---- checkpoints: an interrupted run resumes -------------------------------------------------


FAIL_ON_TARGET: list[int] = []
CALLS: list[int] = []


def flaky_logit_diff(logits, clean_target, noise_target):
    """logit-diff that records the clean targets it sees and fails on FAIL_ON_TARGET."""
    CALLS.extend(clean_target.tolist())
    if set(clean_target.tolist()) & set(FAIL_ON_TARGET):
        raise RuntimeError("simulated crash")
    from atp_nnsight.metrics import logit_diff

    return logit_diff(logits, clean_target, noise_target)


def test_interrupted_run_resumes_from_its_checkpoints(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATP_NNSIGHT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(METRICS, "logit-diff", flaky_logit_diff)
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"clean": f"w{i} w2 w3", "noise": f"w{i + 10} w5 w6", "clean_target": f" w{50 + i}",
         "noise_target": " w40"}
        for i in range(3)
    ]  # fmt: skip
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["attribute", "--model", model_dir, "--pairs", str(pairs), "--method", "atp"]
    args += ["--pairs-per-chunk", "1", "--no-progress"]
    FAIL_ON_TARGET[:] = [52]
    CALLS.clear()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "simulated crash" in err and "rerun to resume" in err
    folder = Path(err.split("checkpoints: ")[1].split(" (")[0])
    assert folder.is_relative_to(tmp_path / "cache") and any(folder.rglob("chunk_*.pt"))
    assert 50 in CALLS
    FAIL_ON_TARGET.clear()
    CALLS.clear()
    assert main(args) == 0
    assert 50 not in CALLS and 52 in CALLS  # pair 0 came from the checkpoint
    assert not folder.exists()  # removed once the run succeeded


def test_pair_warnings_are_one_line_on_stderr(model_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    row = {"clean": "w1 w2 w3", "noise": "w4 w5 w6", "clean_target": " w7", "noise_target": "w7"}
    pairs.write_text(json.dumps(row) + "\n")
    args = ["attribute", "--model", model_dir, "--pairs", str(pairs), "--method", "atp"]
    assert main(args + ["--metric", "logprob", "--layers", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "atp-nnsight: warning: pair 0: clean_target and noise_target are the same token" in err
    assert main(args + ["--layers", "1", "--no-progress"]) == 2  # logit-diff would be all zeros
    assert "logit-diff metric is 0 on every run" in capsys.readouterr().err


# ---- check-remote ----------------------------------------------------------------------------


def test_check_remote_without_its_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "atp_nnsight.remote_check", None)
    assert main(["check-remote"]) == 2
    assert "check-remote is not available" in capsys.readouterr().err


def test_check_remote_is_wired_to_remote_check(monkeypatch):
    seen = {}

    def add_arguments(parser):
        parser.add_argument("--model", default="meta-llama/Llama-3.1-8B")

    def run(args):
        seen["model"] = args.model
        return 3

    module = types.ModuleType("atp_nnsight.remote_check")
    module.add_arguments, module.run = add_arguments, run
    monkeypatch.setitem(sys.modules, "atp_nnsight.remote_check", module)
    assert main(["check-remote", "--model", "org/name"]) == 3
    assert seen == {"model": "org/name"}


def test_help_lists_check_remote(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "check-remote" in out and "smallest meaningful NDIF job" in out
