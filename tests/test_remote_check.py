"""``atp-nnsight check-remote``: the first-run check, offline (dry run, emulated server)."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
from remote_setup import PAIRS, SEED, Setup, build_setup

from atp_nnsight import remote_check
from atp_nnsight.models.tiny import tiny_hf_model, tiny_tokenizer


@pytest.fixture(scope="module")
def llama() -> Setup:
    return build_setup("llama", n_layers=3)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    remote_check.add_arguments(parser)
    return parser.parse_args(argv)


def test_check_on_the_emulated_server_reports_each_step(llama: Setup):
    out, err = io.StringIO(), io.StringIO()
    backend = llama.backend()
    assert remote_check.check(llama.client, PAIRS[0], backend, out=out, err=err) == 0, (
        err.getvalue()
    )
    text = out.getvalue()
    lines = text.splitlines()
    assert "head nodes of layers 1-2" in text
    table = {
        line.split()[0]: line.split()
        for line in lines
        if line.split()[:1] in (["atp"], ["atp*"], ["exact"])
    }
    assert set(table) == {"atp", "atp*", "exact"}
    sizes = backend.payload_bytes
    assert len(sizes) == 3 and not backend.errors  # one request per step
    for i, name in enumerate(["atp", "atp*"]):
        _, seconds, requests, payload, result = table[name]
        assert float(seconds) >= 0 and requests == "1"
        assert payload == f"{sizes[i]:,}" and result == f"{backend.result_bytes[i]:,}"
    assert table["exact"][1:3] == ["(3", "heads)"]
    assert f"{sizes[2]:,}" in lines[[line.split()[:1] for line in lines].index(["exact"])]
    assert "AtP* vs exact patching on AtP*'s top 3 heads:" in text
    assert sum(line.strip().startswith("L") and "exact" in line for line in lines) == 3
    assert "agreement: Spearman(AtP* score, |exact effect|) = " in text
    assert text.rstrip().endswith("OK: every step ran.")


def test_check_remote_command_offline(tmp_path: Path, capsys):
    """The CLI path with --remote local on a model directory and a pairs file."""
    model_dir = tmp_path / "model"
    tiny_hf_model("llama", seed=SEED).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(p.__dict__) for p in PAIRS) + "\n")
    args = _parse(["--model", str(model_dir), "--remote", "local", "--pairs", str(pairs)])
    assert remote_check.run(args) == 0
    text = capsys.readouterr().out
    assert "a local dry run (remote='local')" in text
    assert "OK: every step ran." in text
    row = next(line.split() for line in text.splitlines() if line.split()[:1] == ["atp*"])
    assert row[2] == "1" and int(row[3].replace(",", "")) > 1000 and row[4] == "-"


def test_check_failure_is_one_clear_line(llama: Setup, monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr("nnsight.CONFIG.API.APIKEY", None)
    monkeypatch.setattr("atp_nnsight.remote._session_api_key", None)
    out, err = io.StringIO(), io.StringIO()
    assert remote_check.check(llama.client, PAIRS[0], True, out=out, err=err) == 1
    assert "API key: none found" in out.getvalue()
    message = err.getvalue().strip()
    assert len(message.splitlines()) == 1
    assert message.startswith("check-remote failed: remote=True needs an NDIF API key")
