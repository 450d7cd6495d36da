"""``atp-nnsight circuit``: fast help, and a whole run on a tiny saved model writing the
circuit JSON, faithfulness curve, graph figure and report."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import torch_reference as ref

from atp_nnsight.cli import main
from atp_nnsight.data import PromptPair, save_pairs
from atp_nnsight.edges import Circuit, EdgeAttribution
from atp_nnsight.models.tiny import tiny_hf_model, tiny_tokenizer


def test_help_is_fast():
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "atp_nnsight.cli", "circuit", "--help"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert time.perf_counter() - start < 1.5
    assert "--edges-top" in done.stdout and "eap*" in done.stdout


def test_circuit_command_writes_everything(tmp_path):
    folder = tmp_path / "model"
    tiny_hf_model("llama", n_layers=2, seed=4).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    pairs = [PromptPair(*p) for p in ref.word_pairs(41, [6, 6, 6])]
    pairs_file = save_pairs(pairs, tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    argv = ["circuit", "--model", str(folder), "--pairs", str(pairs_file), "--method", "eap*"]
    argv += ["--edges-top", "15", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    result = EdgeAttribution.load(out / "edges.npz")
    assert result.method == "eap*" and result.per_pair.shape[0] == 3
    circuit = Circuit.from_json(out / "circuit.json")
    assert 0 < len(circuit) <= 15
    assert set(circuit.edges) <= set(result.ranking()[:15])
    curve = json.loads((out / "faithfulness.json").read_text())
    assert len(curve["faithfulness"]) == 9 and curve["cpr"] is not None
    assert np.isfinite(curve["cmd"])
    assert (out / "faithfulness.csv").read_text().startswith("size,requested,kept")
    for page in ("report.html", "circuit_graph.html"):
        text = (out / page).read_text()
        assert "Plotly.newPlot" in text and 'src="http' not in text
    assert "CPR (eap*)" in (out / "report.html").read_text()
    assert (out / "edges.csv").read_text().count("\n") == len(result) + 1
