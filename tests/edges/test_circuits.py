"""Results, pruning, circuit export and faithfulness (evaluate_circuit)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch_reference as ref
from edge_support import client, raw

from atp_nnsight.edges import (
    Circuit,
    EdgeAttribution,
    EdgeGraph,
    attribute_edges,
    evaluate_circuit,
    prune,
)
from atp_nnsight.edges.circuit import _greedy, edge_receivers
from atp_nnsight.edges.evaluate import areas
from atp_nnsight.edges.report import write_circuit_report

PAIRS = ref.word_pairs(21, [6, 6, 6])


@pytest.fixture(scope="module")
def result() -> EdgeAttribution:
    return attribute_edges(client("llama", n_layers=3), PAIRS, "eap", progress=False)


def test_save_load_csv_and_top(result, tmp_path):
    path = result.save(tmp_path / "edges")
    assert path.suffix == ".npz"
    loaded = EdgeAttribution.load(path)
    np.testing.assert_array_equal(loaded.per_pair, result.per_pair)
    np.testing.assert_array_equal(loaded.mean_effect, result.mean_effect)
    assert loaded.edges.equals(result.edges)
    assert loaded.metadata == json.loads(json.dumps(result.metadata))
    with np.load(path, allow_pickle=False) as z:  # no pickled objects inside
        assert "per_pair" in z.files
    top = result.top(5)
    assert list(top["rank"]) == [1, 2, 3, 4, 5]
    assert top["score"].is_monotonic_decreasing
    assert (result.top(3, input="k")["input"] == "k").all()
    csv = result.to_csv(tmp_path / "edges.csv").read_text().splitlines()
    assert csv[0].startswith("name,edge,upstream,downstream,input")
    assert len(csv) == len(result) + 1
    with pytest.raises(ValueError, match="unknown input kind"):
        result.top(3, input="neuron")


def _dangling(graph: EdgeGraph, edges: np.ndarray) -> list[int]:
    """Edges of a circuit whose upstream node receives nothing (and is not the embeddings) or
    whose receivers send nothing (and are not the logits)."""
    up_idx, _ = graph.edge_ends()
    receivers = edge_receivers(graph)
    received = {int(r) for e in edges for r in receivers[e] if r >= 0} | {0}
    sending = {int(up_idx[e]) for e in edges} | {graph.n_upstream}
    return [
        int(e)
        for e in edges
        if int(up_idx[e]) not in received or not any(int(r) in sending for r in receivers[e])
    ]


@pytest.mark.parametrize("selection", ["topk", "greedy"])
def test_prune_keeps_best_edges_without_dangling_ones(result, selection):
    graph = EdgeGraph.from_metadata(result.metadata)
    circuit = prune(result, 30, selection)
    assert 0 < len(circuit) <= 30
    assert _dangling(graph, circuit.edges) == []
    np.testing.assert_array_equal(circuit.scores, result.scores[circuit.edges])
    if selection == "topk":
        assert set(circuit.edges) <= set(result.ranking()[:30])
        removed = sorted(set(result.ranking()[:30]) - set(circuit.edges))
        assert set(_dangling(graph, result.ranking()[:30])) <= set(removed)


def test_greedy_grows_from_the_logits(result):
    """Before pruning: the first edge is the best one into the logits, and every edge is
    received by a node already connected to the logits by earlier edges."""
    graph = EdgeGraph.from_metadata(result.metadata)
    chosen = np.flatnonzero(_greedy(graph, result.scores, 20))
    assert len(chosen) == 20
    up_idx, _ = graph.edge_ends()
    receivers = edge_receivers(graph)
    into_logits = (result.edges["input"] == "logits").to_numpy()
    assert into_logits[chosen].any()
    assert result.scores[chosen].max() >= result.scores[into_logits].max()
    connected = {graph.n_upstream}
    # replay: each chosen edge must have a receiver connected by the edges chosen before it
    remaining = set(chosen.tolist())
    while remaining:
        ready = [e for e in remaining if any(int(r) in connected for r in receivers[e])]
        assert ready, "a chosen edge is not connected to the logits"
        for e in ready:
            connected.add(int(up_idx[e]))
            remaining.discard(e)
    assert _dangling(graph, prune(result, 20, "greedy").edges) == []


def test_circuit_json_round_trip(result, tmp_path):
    circuit = prune(result, 25)
    data = json.loads(circuit.to_json(tmp_path / "c.json").read_text())
    assert {n["name"] for n in data["nodes"]} == set(circuit.nodes())
    assert [e["edge"] for e in data["edges"]] == circuit.edges.tolist()
    assert all(e["receivers"] for e in data["edges"])
    again = Circuit.from_json(tmp_path / "c.json")
    np.testing.assert_array_equal(again.edges, circuit.edges)
    np.testing.assert_allclose(again.scores, circuit.scores)
    assert again.info == circuit.info


def test_report_is_self_contained(result, tmp_path):
    curve = evaluate_circuit(client("llama", n_layers=3), PAIRS, result, progress=False)
    path = write_circuit_report(
        tmp_path / "report.html", prune(result, 20), result=result, curves={"eap": curve}
    )
    text = path.read_text()
    assert "<script" in text
    assert not re.search(r"<script[^>]*\bsrc=", text), "a script is loaded from elsewhere"
    assert "Plotly.newPlot" in text and "Faithfulness" in text
    settings_table = text.split("</table>")[0]
    labels = re.findall(r"<tr><td>([^<]*)</td>", settings_table)
    assert "method" in labels and len(labels) == len(set(labels)), labels  # one row per setting


def test_faithfulness_of_full_and_empty_circuits(result):
    model = client("llama", n_layers=3)
    graph = EdgeGraph.of(model)
    everything = Circuit(graph, np.arange(graph.n_edges), np.ones(graph.n_edges))
    nothing = Circuit(graph, np.zeros(0, dtype=np.int64), np.zeros(0))
    full = evaluate_circuit(model, PAIRS, everything, progress=False)
    empty = evaluate_circuit(model, PAIRS, nothing, progress=False)
    assert full.faithfulness == [pytest.approx(1.0, abs=1e-6)]
    assert empty.faithfulness == [pytest.approx(0.0, abs=1e-6)]
    # M(∅) is the noise run and M(full) the clean run, computed here without the package
    hf = raw("llama", n_layers=3)
    with torch.no_grad():
        metric = {}
        for which in (0, 1):
            values = []
            for pair in PAIRS:
                ids = ref.pair_ids(pair)
                logits = hf(input_ids=ids[which][None], use_cache=False).logits
                values.append(float(ref.metric_logit_diff(logits, ids[2], ids[3])))
            metric[which] = np.mean(values)
    assert full.metric_full == pytest.approx(metric[0], abs=1e-4)
    assert full.metric_empty == pytest.approx(metric[1], abs=1e-4)


def test_curve_sizes_areas_and_monotone_extremes(result):
    model = client("llama", n_layers=3)
    curve = evaluate_circuit(model, PAIRS, result, sizes=(0.05, 0.2, 0.5), progress=False)
    n = len(result)
    assert curve.requested == [int(0.05 * n), int(0.2 * n), int(0.5 * n)]
    assert all(k <= r for k, r in zip(curve.kept, curve.requested, strict=True))
    cpr, cmd = areas(curve.sizes, curve.faithfulness)
    assert (curve.cpr, curve.cmd) == (pytest.approx(cpr), pytest.approx(cmd))
    assert curve.to_dataframe().shape == (3, 5)


def test_areas_by_hand():
    cpr, cmd = areas([0.5], [0.0])  # f: 0 at 0.5, 1 at 1
    assert cpr == pytest.approx(0.25)
    assert cmd == pytest.approx(0.25)
    cpr, cmd = areas([0.1, 0.5], [1.2, 1.0])
    assert cpr == pytest.approx(0.4 * 1.1 + 0.5 * 1.0)
    assert cmd == pytest.approx(0.4 * 0.1)


def test_refusals():
    from atp_nnsight.edges import UnsupportedEdgesError

    with pytest.raises(UnsupportedEdgesError, match="post-norms"):
        EdgeGraph.of(client("gemma2"))
    with pytest.raises(UnsupportedEdgesError, match="post-norms"):
        EdgeGraph.of(client("olmo2"))
