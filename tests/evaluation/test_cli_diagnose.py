"""``atp-nnsight diagnose`` end to end on the planted model (inputs loading stubbed)."""

from __future__ import annotations

import pandas as pd
import pytest

from atp_nnsight import cli
from atp_nnsight.results import Attribution


@pytest.fixture
def stub_inputs(monkeypatch, planted):
    monkeypatch.setattr(cli, "load_inputs", lambda args: (planted.model, planted.pairs))
    return planted


def test_diagnose_prints_bound_flags_and_decision(stub_inputs, tmp_path, capsys):
    out = tmp_path / "flagged.csv"
    argv = ["diagnose", "--nodes", "neuron", "--verify", "8", "--subsets", "120"]
    rc = cli.main(argv + ["--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "upper bound on the largest unverified |effect|" in text
    assert "decision: CONTINUE verifying" in text
    flagged = pd.read_csv(out)
    assert stub_inputs.j in flagged["node"].tolist()
    assert {"kind", "layer", "index", "lower", "upper"} <= set(flagged.columns)
    saved = Attribution.load(out.with_suffix(".npz"))
    assert len(saved.metadata["verified"]["order"]) == 8


def test_diagnose_stops_with_a_large_threshold(stub_inputs, capsys):
    argv = ["diagnose", "--nodes", "neuron", "--verify", "4", "--subsets", "40"]
    assert cli.main(argv + ["--theta", "1000", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "decision: STOP verifying" in text and "flagged): 0" in text


def test_diagnose_without_threshold_or_verified_nodes_is_an_error(stub_inputs, capsys):
    assert cli.main(["diagnose", "--nodes", "neuron", "--verify", "0", "--no-progress"]) == 2
    assert "theta is needed" in capsys.readouterr().err
