"""The planner: sizes from configs alone, chunk sizing from a budget, and its memory model
against measured peaks (fresh processes, live heap bytes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atp_nnsight import attribute, tiny_model
from atp_nnsight.memory import ENV
from atp_nnsight.models import UnsupportedArchitectureError
from atp_nnsight.models.tiny import tiny_config
from atp_nnsight.plan import SHIPPED_CONFIGS, MemoryBudgetError, plan

MEASURE = Path(__file__).parent / "plan_measure.py"
WIDE = dict(
    hidden_size=256,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=1024,
    max_position_embeddings=128,
)
"""Tiny but wide enough that activations dwarf the interpreter's own allocations."""


def measured_peak(spec: dict) -> int:
    env = {**os.environ, **ENV}
    out = subprocess.run(
        [sys.executable, str(MEASURE), json.dumps(spec)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


@pytest.mark.parametrize(
    ("n_layers", "method"), [(2, "atp*"), (4, "atp"), (4, "atp*"), (8, "atp*")]
)
def test_memory_prediction_within_25_percent_on_tiny_models(n_layers, method):
    spec = dict(
        model="tiny",
        n_layers=n_layers,
        config=WIDE,
        pairs=8,
        seq_len=64,
        nodes="head,q,k,v,neuron",
        method=method,
    )
    predicted = plan(
        tiny_config("llama", n_layers=n_layers, **WIDE),
        seq_len=64,
        n_pairs=8,
        nodes=spec["nodes"],
        method=method,
        pairs_per_chunk=8,
        dtype="float32",
    ).peak_bytes
    measured = measured_peak(spec)
    assert abs(predicted - measured) <= 0.25 * measured, (predicted, measured)


@pytest.mark.slow
def test_memory_prediction_within_25_percent_on_the_bundled_model():
    spec = dict(model="bundled", pairs=8, seq_len=16, nodes="head,q,k,v,neuron", method="atp*")
    predicted = plan(
        None, seq_len=16, n_pairs=8, nodes=spec["nodes"], method="atp*", pairs_per_chunk=8
    ).peak_bytes
    measured = measured_peak(spec)
    assert abs(predicted - measured) <= 0.25 * measured, (predicted, measured)


@pytest.mark.parametrize("name", sorted(set(SHIPPED_CONFIGS) - {"SmolLM2-135M-Instruct"}))
def test_shipped_configs_plan_offline(name):
    p = plan(name, seq_len=32, n_pairs=4, nodes="head", method="atp", pairs_per_chunk=2)
    assert p.n_nodes > 0 and p.n_chunks == 2 and p.backwards_per_pair == 1


def test_llama_70b_remote_plan():
    p = plan(
        "meta-llama/Llama-3.1-70B",
        seq_len=128,
        n_pairs=32,
        nodes="head,q,k,v",
        method="atp*",
        remote=True,
    )
    assert p.n_nodes == 80 * (64 + 64 + 8 + 8)
    assert p.forwards_per_pair == 2 and p.backwards_per_pair == 80
    assert p.cost == 32 * (2 + 2 * 80)
    # NDIF's cap above 140 GB of bf16 weights is ~21 GB of activations
    assert 15 * 2**30 < p.budget_bytes < 25 * 2**30
    assert p.peak_bytes <= p.budget_bytes
    assert p.n_chunks == -(-32 // p.pairs_per_chunk)
    assert p.result_bytes == 4 * p.pairs_per_chunk * (2 * p.n_nodes + 2)
    assert 5_000 < p.request_bytes < 200_000  # code + token ids, never activations
    text = str(p)
    assert "NDIF" in text and "GiB" in text


def test_time_estimate_from_throughput():
    p = plan(None, seq_len=10, n_pairs=4, nodes="head", method="atp", throughput=40.0)
    assert p.seconds == pytest.approx(p.cost * 10 / 40.0)


def test_plan_refuses_an_unsupported_architecture_like_attribute():
    import transformers

    config = transformers.BertConfig()
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'bert'"):
        plan(config, seq_len=8, n_pairs=2)


def test_budget_too_small_for_one_pair_names_budget_estimate_and_remedy():
    with pytest.raises(MemoryBudgetError) as err:
        plan(None, seq_len=64, n_pairs=4, nodes="neuron", max_memory=2**20)
    message = str(err.value)
    assert "budget is 1 MiB" in message and "one pair needs about" in message
    for remedy in ("fewer node kinds", "layers", "shorter prompts", "device"):
        assert remedy in message


def test_attribute_sizes_chunks_from_max_memory():
    model = tiny_model("llama", n_layers=2)
    pairs = [("w1 w2 w3 w4", "w5 w6 w7 w8", "w9", "w10")] * 6
    p1 = plan(model, seq_len=4, n_pairs=6, nodes="head", method="atp", pairs_per_chunk=1)
    p2 = plan(model, seq_len=4, n_pairs=6, nodes="head", method="atp", pairs_per_chunk=2)
    budget = (p1.peak_bytes + p2.peak_bytes) // 2  # room for one pair, not two
    result = attribute(model, pairs, "head", method="atp", max_memory=budget, progress=False)
    assert result.metadata["pairs_per_chunk"] == 1
    whole = attribute(model, pairs, "head", method="atp", progress=False)
    assert whole.metadata["pairs_per_chunk"] == 6
    torch.testing.assert_close(torch.tensor(result.per_pair), torch.tensor(whole.per_pair))
    with pytest.raises(MemoryBudgetError, match="max_memory"):
        attribute(model, pairs, "head", method="atp", max_memory=1024, progress=False)
