"""Remote execution: local, nnsight's ``remote="local"`` dry run and an emulated NDIF server.

The emulated server (:mod:`ndif_emulator`) receives the request exactly as nnsight's client
serializes it and runs it against a *separate* model with frozen weights, with ``atp_nnsight``
not importable (NDIF does not install it).
"""

from __future__ import annotations

import socket
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nnsight
import numpy as np
import pytest
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError
from nnsight.modeling.transformers import TransformersModel

import atp_nnsight
import atp_nnsight.remote as remote_mod
from atp_nnsight.data import PromptPair
from atp_nnsight.methods.atp import METHODS, attribute
from atp_nnsight.methods.exact import patch, patch_sets
from atp_nnsight.models.tiny import tiny_hf_model, tiny_model, tiny_tokenizer
from atp_nnsight.remote import ChunkFailedError, RemoteSetupError
from atp_nnsight.types import Node

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # works with or without tests/__init__.py
    sys.path.insert(0, _HERE)

from ndif_emulator import InProcessNDIFBackend, server_environment  # noqa: E402

SEED = 11
ALL_KINDS = ["head", "q", "k", "v", "neuron", "resid"]
PAIRS = [
    PromptPair("w1 w2 w3 w4 w5 w6", "w1 w9 w3 w4 w5 w6", " w5", " w9"),
    PromptPair("w7 w8 w2 w4 w1 w3", "w7 w8 w11 w4 w1 w3", " w2", " w11"),
    PromptPair("w20 w21 w22 w23 w24 w25", "w20 w30 w22 w23 w24 w25", " w22", " w30"),
]
ATOL = 1e-6


@dataclass
class Setup:
    family: str
    client: Any
    server: Any
    calls: Counter

    def backend(self, **kwargs: Any) -> InProcessNDIFBackend:
        return InProcessNDIFBackend(self.server, self.client, **kwargs)


def _count_calls(model: Any, calls: Counter, name: str) -> None:
    def hook(*_: Any) -> None:
        calls[name] += 1

    model._module.register_forward_hook(hook)


def _build(family: str) -> Setup:
    client = tiny_model(family, seed=SEED)
    server_hf = tiny_hf_model(family, seed=SEED)
    assert not any(p.requires_grad for p in server_hf.parameters())
    server = TransformersModel(server_hf, tokenizer=tiny_tokenizer(server_hf.config.vocab_size))
    assert server._module is not client._module
    calls: Counter = Counter()
    _count_calls(client, calls, "client")
    _count_calls(server, calls, "server")
    return Setup(family, client, server, calls)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request: pytest.FixtureRequest) -> Setup:
    return _build(request.param)


@pytest.fixture(scope="module")
def llama() -> Setup:
    return _build("llama")


def _three_ways(s: Setup, run: Any) -> tuple[Any, Any, Any]:
    """``run(remote)`` locally, with ``remote="local"`` and on the emulated server."""
    before = s.calls.copy()
    local = run(False)
    dry = run("local")
    assert s.calls["client"] > before["client"]
    assert s.calls["server"] == before["server"]

    backend = s.backend()
    before = s.calls.copy()
    emulated = run(backend)
    assert backend.requests >= 1 and not backend.errors
    assert s.calls["server"] > before["server"], "the request did not run on the server model"
    assert s.calls["client"] == before["client"], "the client's model ran during a remote run"
    return local, dry, emulated


def _assert_same(a: Any, b: Any) -> None:
    np.testing.assert_allclose(b.per_pair, a.per_pair, rtol=0, atol=ATOL)
    np.testing.assert_allclose(
        b.metadata["base_metric"], a.metadata["base_metric"], rtol=0, atol=ATOL
    )
    if a.mean_effect is not None:
        np.testing.assert_allclose(b.mean_effect, a.mean_effect, rtol=0, atol=ATOL)
    assert b.nodes.equals(a.nodes)


# --------------------------------------------------------------------------------------------
# the same numbers locally, as a dry run and on the emulated (frozen) server
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kinds, per_position",
    [(["head", "k", "neuron", "resid"], False), (["q", "v", "head"], True)],
    ids=["summed", "per-position"],
)
def test_patch_same_locally_and_remotely(setup: Setup, kinds: list[str], per_position: bool):
    def run(remote: Any) -> Any:
        return patch(
            setup.client, PAIRS, kinds, per_position=per_position, remote=remote, progress=False
        )

    local, dry, emulated = _three_ways(setup, run)
    assert np.abs(local.per_pair).max() > 1e-2  # the comparison is not vacuous
    _assert_same(local, dry)
    _assert_same(local, emulated)


def test_patch_sets_same_locally_and_remotely(setup: Setup):
    sets = [[Node("head", 0, 1), Node("neuron", 1, 5, 2)], [Node("resid", 1, 0)]]

    def run(remote: Any) -> Any:
        return patch_sets(setup.client, PAIRS, sets, remote=remote, progress=False)[0]

    local, dry, emulated = _three_ways(setup, run)
    np.testing.assert_allclose(dry, local, rtol=0, atol=ATOL)
    np.testing.assert_allclose(emulated, local, rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", list(METHODS))
def test_attribute_same_locally_and_remotely(setup: Setup, method: str):
    def run(remote: Any) -> Any:
        return attribute(
            setup.client, PAIRS, ALL_KINDS, method=method, remote=remote, progress=False
        )

    local, dry, emulated = _three_ways(setup, run)
    assert np.abs(local.per_pair).max() > 1e-2
    _assert_same(local, dry)
    _assert_same(local, emulated)


def test_attribute_per_position_same_remotely(llama: Setup):
    def run(remote: Any) -> Any:
        return attribute(
            llama.client,
            PAIRS,
            ["q", "k", "head"],
            method="atp*",
            per_position=True,
            pairs_per_chunk=2,
            remote=remote,
            progress=False,
        )

    local, dry, emulated = _three_ways(llama, run)
    _assert_same(local, dry)
    _assert_same(local, emulated)


# --------------------------------------------------------------------------------------------
# what the emulator checks
# --------------------------------------------------------------------------------------------


def test_emulated_server_cannot_import_atp_nnsight(llama: Setup):
    with server_environment(llama.server, ["atp_nnsight"], hide_local=False):
        assert "atp_nnsight" not in sys.modules
        with pytest.raises(ModuleNotFoundError):
            __import__("atp_nnsight.methods.atp")
    assert sys.modules["atp_nnsight"] is atp_nnsight


def test_request_needs_atp_nnsight_shipped_by_value(llama: Setup, monkeypatch):
    """Pickled by reference (nnsight's default for installed packages) the request fails on
    a server without ``atp_nnsight``; run_chunks registers it by value for remote runs."""
    import cloudpickle.cloudpickle as cp

    by_value = set(cp._PICKLE_BY_VALUE_MODULES) - {"atp_nnsight"}
    monkeypatch.setattr(cp, "_PICKLE_BY_VALUE_MODULES", by_value)  # restored after the test
    ship = remote_mod.ship_by_value
    monkeypatch.setattr(remote_mod, "ship_by_value", lambda: None)
    with pytest.raises(ChunkFailedError, match="No module named 'atp_nnsight'"):
        attribute(llama.client, PAIRS[:1], "head", method="atp", remote=llama.backend())
    assert not cp._is_registered_pickle_by_value(atp_nnsight)

    monkeypatch.setattr(remote_mod, "ship_by_value", ship)
    backend = llama.backend()
    attribute(llama.client, PAIRS[:1], "head", method="atp", remote=backend, progress=False)
    assert cp._is_registered_pickle_by_value(atp_nnsight)
    assert backend.requests == 1 and not backend.errors


def test_one_request_per_chunk_and_only_saved_values_return(llama: Setup):
    backend = llama.backend()
    attribute(llama.client, PAIRS, "head", method="atp", pairs_per_chunk=1, remote=backend)
    assert backend.requests == 3 and len(backend.payload_bytes) == 3
    assert max(backend.result_bytes) < 20_000  # reduced per-node values, not activations


# --------------------------------------------------------------------------------------------
# remote=True setup errors (never reaches the network)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(RemoteBackend, "request", refuse)
    monkeypatch.setattr(RemoteBackend, "_post", refuse)
    monkeypatch.setattr(nnsight, "is_model_running", refuse)


def test_remote_true_without_api_key(llama: Setup, monkeypatch, no_network):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    with pytest.raises(RemoteSetupError, match="NDIF_API_KEY") as err:
        attribute(llama.client, PAIRS, "head", method="atp", remote=True)
    assert "export NDIF_API_KEY=" in str(err.value)
    with pytest.raises(RemoteSetupError, match="NDIF_API_KEY"):
        patch(llama.client, PAIRS, "head", remote=True)


def test_remote_true_needs_hub_model(llama: Setup, monkeypatch, no_network):
    monkeypatch.setenv("NDIF_API_KEY", "not-a-real-key")
    with pytest.raises(RemoteSetupError, match="Hugging Face id"):
        attribute(llama.client, PAIRS, "head", method="atp", remote=True)


def test_unknown_remote_string(llama: Setup):
    with pytest.raises(ValueError, match="unknown remote setting"):
        attribute(llama.client, PAIRS, "head", method="atp", remote="ndif")


# --------------------------------------------------------------------------------------------
# failures, checkpoints and resuming
# --------------------------------------------------------------------------------------------


def test_resume_after_failed_chunk(llama: Setup, tmp_path: Path):
    def run(backend: Any, checkpoint_dir: Any = None) -> Any:
        return attribute(
            llama.client,
            PAIRS,
            ALL_KINDS,
            method="atp*",
            pairs_per_chunk=1,
            remote=backend,
            checkpoint_dir=checkpoint_dir,
            progress=False,
        )

    uninterrupted = llama.backend()
    reference = run(uninterrupted)
    assert uninterrupted.requests == 3

    failing = llama.backend(fail_on=[2])
    with pytest.raises(ChunkFailedError) as err:
        run(failing, tmp_path)
    message = str(err.value)
    assert "chunk 2/3 failed" in message
    assert "1 finished chunk(s) are kept in" in message and str(tmp_path) in message
    assert "emulated server failure" in message
    assert isinstance(err.value.__cause__, RemoteError)
    assert err.value.done == 1 and err.value.checkpoint_dir == tmp_path
    assert failing.requests == 2
    assert (tmp_path / "chunk_00000.pt").exists()
    assert not (tmp_path / "chunk_00001.pt").exists()

    resumed_backend = llama.backend()
    resumed = run(resumed_backend, tmp_path)
    assert resumed_backend.requests == 2  # chunk 1 came from its checkpoint
    assert sorted(p.name for p in tmp_path.glob("chunk_*.pt")) == [
        f"chunk_{i:05d}.pt" for i in range(3)
    ]
    np.testing.assert_array_equal(resumed.per_pair, reference.per_pair)
    assert resumed.metadata["base_metric"] == reference.metadata["base_metric"]

    again = llama.backend()
    np.testing.assert_array_equal(run(again, tmp_path).per_pair, reference.per_pair)
    assert again.requests == 0


def test_checkpoint_dir_of_another_run_is_refused(llama: Setup, tmp_path: Path):
    attribute(llama.client, PAIRS, "q", method="atp", checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different run"):
        attribute(llama.client, PAIRS, "q", method="atp+qk", checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different run"):
        attribute(llama.client, PAIRS[:2], "q", method="atp", checkpoint_dir=tmp_path)


def test_failed_request_names_the_chunk(llama: Setup):
    backend = llama.backend(fail_on=[1])
    with pytest.raises(ChunkFailedError) as err:
        patch(llama.client, PAIRS, "head", remote=backend, progress=False)
    message = str(err.value)
    assert message.startswith("exact patching: chunk 1/1 failed: RemoteError: RuntimeError")
    assert "emulated server failure on request 1" in message
    assert "kept in" not in message  # nothing finished, no checkpoint directory
    assert err.value.done == 0


def test_server_model_mismatch_surfaces(llama: Setup):
    """A server whose module tree differs (e.g. another transformers version) fails to resolve
    the request's module references; the error comes back naming the chunk."""
    hf = tiny_hf_model("llama", n_layers=1, seed=SEED)
    other = TransformersModel(hf, tokenizer=tiny_tokenizer(hf.config.vocab_size))
    backend = InProcessNDIFBackend(other, llama.client)
    with pytest.raises(ChunkFailedError, match=r"atp: chunk 1/2 failed: RemoteError: .*layers\.1"):
        attribute(llama.client, PAIRS, "head", method="atp", pairs_per_chunk=2, remote=backend)
    assert backend.requests == 1


def test_trainable_client_frozen_server_same_atp(llama: Setup):
    """Weights that require grad locally (as after ``from_pretrained``) and frozen on the server
    (the library then starts the graph at the first layer's input) give the same estimates."""
    trainable = tiny_model("llama", seed=SEED)
    trainable._module.requires_grad_(True)
    kinds = ["resid", "q", "neuron"]
    local = attribute(trainable, PAIRS, kinds, method="atp*", progress=False)
    frozen = attribute(llama.client, PAIRS, kinds, method="atp*", progress=False)
    backend = InProcessNDIFBackend(llama.server, trainable)
    emulated = attribute(trainable, PAIRS, kinds, method="atp*", remote=backend, progress=False)
    _assert_same(local, frozen)
    _assert_same(local, emulated)
    assert all(p.grad is None for p in trainable._module.parameters())
