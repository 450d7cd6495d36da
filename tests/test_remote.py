"""Remote execution: local, nnsight's ``remote="local"`` dry run and an emulated NDIF server.

The emulated server (:mod:`ndif_emulator`) receives the request exactly as nnsight's client
serializes it and runs it against a *separate* frozen model, with ``atp_nnsight`` not
importable (NDIF does not install it) and the server's import allowlist and builtins. Exact
numbers are compared on its fp32 variant; everything also runs under the server's bf16
numerics, compared by rank (:func:`remote_setup.assert_rank_agreement`). ``remote=True`` runs
go through nnsight's real client transport against :class:`ndif_emulator.FakeNDIFService`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import socket
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import httpx
import nnsight
import numpy as np
import pytest
import torch
import websocket
import zstandard
from ndif_emulator import (
    EXACT,
    INVALID_KEY_DETAIL,
    LENIENT,
    STRICT,
    FakeNDIFService,
    InProcessNDIFBackend,
    make_server_model,
    server_environment,
)
from nnsight.intervention.backends.remote import RemoteError
from remote_setup import (
    ALL_KINDS,
    ATOL,
    PAIRS,
    SEED,
    Setup,
    assert_rank_agreement,
    build_setup,
)

import atp_nnsight
import atp_nnsight.remote as remote_mod
from atp_nnsight.evaluation.diagnostic import diagnose
from atp_nnsight.evaluation.verify import verify
from atp_nnsight.methods import baselines
from atp_nnsight.methods.atp import METHODS, attribute
from atp_nnsight.methods.exact import patch, patch_sets
from atp_nnsight.models.tiny import tiny_hf_model, tiny_model, tiny_tokenizer
from atp_nnsight.remote import (
    ChunkFailedError,
    RemoteSetupError,
    RemoteVersionWarning,
    record_transfers,
    resolve_api_key,
    run_chunks,
    set_api_key,
    version_mismatches,
)
from atp_nnsight.report import write_report
from atp_nnsight.types import Node

REPO = "meta-llama/Llama-3.1-8B"
"""The Hub id the remote=True tests pretend the tiny client was built from."""


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request: pytest.FixtureRequest) -> Setup:
    return build_setup(request.param)


@pytest.fixture(scope="module")
def llama() -> Setup:
    return build_setup("llama")


def _three_ways(s: Setup, run: Any) -> tuple[Any, Any, Any]:
    """``run(remote)`` locally, with ``remote="local"`` and on the fp32 emulated server."""
    before = s.calls.copy()
    local = run(False)
    dry = run("local")
    assert s.calls["client"] > before["client"]
    assert s.calls["server"] == before["server"]

    backend = s.exact_backend()
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
# the same numbers locally, as a dry run and on the emulated fp32 server
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kinds, per_position",
    [(["head", "k", "neuron", "resid", "mlp_out"], False), (["q", "v", "head", "attn_out"], True)],
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
# every method and node kind under the server's numerics (bf16 weights, autocast)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_position", [False, True], ids=["summed", "per-position"])
@pytest.mark.parametrize("method", ["exact", *METHODS])
def test_methods_agree_under_server_numerics(setup: Setup, method: str, per_position: bool):
    def run(remote: Any) -> Any:
        if method == "exact":
            return patch(
                setup.client,
                PAIRS,
                ALL_KINDS,
                per_position=per_position,
                remote=remote,
                progress=False,
            )
        return attribute(
            setup.client,
            PAIRS,
            ALL_KINDS,
            method=method,
            per_position=per_position,
            remote=remote,
            progress=False,
        )

    backend = setup.backend()
    remote = run(backend)
    assert backend.requests >= 1 and not backend.errors
    assert_rank_agreement(
        run(False).scores, remote.scores, min_spearman=0.9 if method == "exact" else 0.99
    )


@pytest.mark.parametrize(
    "name, rel_tol", [("subsampling", 0.1), ("blocks", 0.1), ("hierarchical", 0.25)]
)
def test_baselines_agree_under_server_numerics(llama: Setup, name: str, rel_tol: float):
    """The baselines that run the model (brute force does not). Hierarchical chooses which
    groups to split by thresholds on measured effects, so bf16 noise can change what it
    expands: scores move by up to 15 % of the top there (measured)."""

    def run(remote: Any) -> Any:
        method = getattr(baselines, name)
        return method(llama.client, PAIRS, ["head", "neuron"], remote=remote, progress=False)

    backend = llama.backend()
    remote = run(backend)
    assert backend.requests >= 1 and not backend.errors
    assert_rank_agreement(run(False).scores, remote.scores, min_spearman=0.9, rel_tol=rel_tol)


def test_verification_and_diagnostic_under_server_numerics(llama: Setup):
    estimate = attribute(llama.client, PAIRS, ["head", "neuron"], method="atp*", progress=False)
    backend = llama.backend()
    local = verify(llama.client, PAIRS, estimate, budget=6, progress=False).metadata["verified"]
    remote = verify(
        llama.client, PAIRS, estimate, budget=6, remote=backend, progress=False
    ).metadata["verified"]
    assert backend.requests >= 1 and not backend.errors
    assert list(remote["order"]) == list(local["order"]) and len(local["order"]) == 6
    effects = np.asarray(local["mean_effect"])
    np.testing.assert_allclose(remote["mean_effect"], effects, atol=0.1 * np.abs(effects).max())

    backend = llama.backend()
    kwargs = dict(verified=4, n_subsets=20, progress=False)
    local_d = diagnose(llama.client, PAIRS, estimate, **kwargs)
    remote_d = diagnose(llama.client, PAIRS, estimate, remote=backend, **kwargs)
    assert backend.requests >= 1 and not backend.errors
    assert list(remote_d.verified) == list(local_d.verified)
    subset_effects = local_d.subsets["effect"].to_numpy()
    assert np.abs(subset_effects).max() > 1e-2
    np.testing.assert_allclose(
        remote_d.subsets["effect"].to_numpy(),
        subset_effects,
        atol=0.1 * np.abs(subset_effects).max(),
    )


# --------------------------------------------------------------------------------------------
# what the emulator enforces
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
    from nnsight.ndif import pull_env

    pull_env()  # registers the local test modules once per process: not into the set below
    by_value = set(cp._PICKLE_BY_VALUE_MODULES) - {"atp_nnsight"}
    monkeypatch.setattr(cp, "_PICKLE_BY_VALUE_MODULES", by_value)  # restored after the test
    ship = remote_mod.ship_by_value
    monkeypatch.setattr(remote_mod, "ship_by_value", lambda: None)
    lenient = llama.exact_backend(policy=LENIENT)
    with pytest.raises(ChunkFailedError, match="No module named 'atp_nnsight'"):
        attribute(llama.client, PAIRS[:1], "head", method="atp", remote=lenient)
    strict = llama.exact_backend()
    with pytest.raises(ChunkFailedError, match="Module atp_nnsight.* is not whitelisted"):
        attribute(llama.client, PAIRS[:1], "head", method="atp", remote=strict)
    assert not cp._is_registered_pickle_by_value(atp_nnsight)

    monkeypatch.setattr(remote_mod, "ship_by_value", ship)
    backend = llama.exact_backend()
    attribute(llama.client, PAIRS[:1], "head", method="atp", remote=backend, progress=False)
    assert cp._is_registered_pickle_by_value(atp_nnsight)
    assert backend.requests == 1 and not backend.errors


@dataclasses.dataclass(frozen=True)
class _GeneratedMethods:
    value: int


class _HandWritten:
    def __init__(self, value: int):
        self.value = value


def _reads_a_file() -> str:
    return open(__file__).read(10)  # noqa: SIM115 - the server has no `open`


def _imports_os() -> str:
    import os

    return os.sep


def _imports_math() -> float:
    import math

    return math.pi


def _session(s: Setup, backend: Any, make: Any) -> Any:
    with s.client.session(backend=backend):
        out = nnsight.save(make())
    return out


def test_allowlist_and_builtins_like_the_server(llama: Setup):
    """Dataclasses (generated methods), ``open`` and non-allowlisted imports fail on the server;
    hand-written classes and allowlisted imports work."""
    assert _session(llama, llama.exact_backend(), lambda: _HandWritten(3).value) == 3
    assert _session(llama, llama.exact_backend(), _imports_math) == pytest.approx(3.14159, 1e-5)
    cases = [
        (lambda: _GeneratedMethods(3).value, "Module dataclasses is not whitelisted"),
        (_reads_a_file, "NameError: name 'open' is not defined"),
        (_imports_os, "Module os is not whitelisted"),
    ]
    for make, message in cases:
        with pytest.raises(RemoteError, match=message):
            _session(llama, llama.exact_backend(), make)
        assert _session(llama, llama.exact_backend(policy=LENIENT), make) is not None


def test_server_numerics_are_bf16_and_restored(llama: Setup):
    client = llama.client

    def probe() -> Any:
        with client.trace(torch.tensor([[1, 2, 3]])):
            dtype = str(client.model.layers[0].self_attn.o_proj.output.dtype)
        return (str(torch.get_default_dtype()), dtype)

    assert _session(llama, llama.backend(), probe) == ("torch.bfloat16", "torch.bfloat16")
    assert torch.get_default_dtype() == torch.float32
    assert not torch.is_autocast_enabled("cpu")
    assert _session(llama, llama.exact_backend(), probe) == ("torch.float32", "torch.float32")
    with pytest.raises(ValueError, match="bf16 server weights"):
        InProcessNDIFBackend(llama.exact_server, llama.client, policy=STRICT)


# --------------------------------------------------------------------------------------------
# requests: one per chunk, nothing re-uploaded, sizes recorded
# --------------------------------------------------------------------------------------------


def test_one_request_per_chunk_and_only_saved_values_return(llama: Setup):
    backend = llama.exact_backend()
    attribute(llama.client, PAIRS, "head", method="atp", pairs_per_chunk=1, remote=backend)
    assert backend.requests == 3 and len(backend.payload_bytes) == 3
    assert max(backend.result_bytes) < 20_000  # reduced per-node values, not activations


def test_request_sizes_flat_across_chunks(llama: Setup):
    """Nothing of an earlier chunk (its result) travels with a later request."""
    pairs = [PAIRS[0], PAIRS[1], PAIRS[0], PAIRS[1]]
    backend = llama.exact_backend(compress=False)
    with record_transfers() as log:
        attribute(
            llama.client,
            pairs,
            ["neuron", "q"],
            method="atp",
            per_position=True,
            pairs_per_chunk=1,
            remote=backend,
            progress=False,
        )
    sizes = backend.payload_bytes
    assert len(sizes) == 4 and log.payload_bytes == sizes
    assert log.result_bytes == backend.result_bytes
    spread = max(sizes) - min(sizes)
    assert spread <= 64, f"request sizes grow across chunks: {sizes}"
    assert min(backend.result_bytes) > 20 * max(spread, 64)  # a re-upload would show


def test_record_transfers_of_a_dry_run(llama: Setup):
    with record_transfers() as log:
        attribute(llama.client, PAIRS, "head", method="atp", pairs_per_chunk=2, remote="local")
    assert len(log) == 2 and all(b > 1000 for b in log.payload_bytes)
    assert log.result_bytes == [None, None]
    with record_transfers() as local_log:
        attribute(llama.client, PAIRS, "head", method="atp", progress=False)
    assert len(local_log) == 0


# --------------------------------------------------------------------------------------------
# remote=True through nnsight's real client transport (FakeNDIFService)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def hub_client(llama: Setup, monkeypatch, no_network, tmp_path: Path) -> Setup:
    """The llama client as if built with ``load_model(REPO, remote=True)``; no key set."""
    monkeypatch.setattr(llama.client, "repo_id", REPO, raising=False)
    monkeypatch.setattr(llama.client, "to_model_key", lambda: f"fake:{REPO}", raising=False)
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.delenv("NDIF_HOST", raising=False)
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    monkeypatch.setattr(remote_mod, "_session_api_key", None)
    monkeypatch.setattr(remote_mod, "_versions_checked", set())
    monkeypatch.setenv("ATP_NNSIGHT_CACHE", str(tmp_path / "cache"))
    return llama


def _service(s: Setup, monkeypatch: Any, **kwargs: Any) -> FakeNDIFService:
    kwargs.setdefault("deployed", [REPO, "openai-community/gpt2"])
    kwargs.setdefault("remote_env", _local_env())
    return FakeNDIFService(s.server, **kwargs).install(monkeypatch)


def _local_env() -> dict:
    from importlib.metadata import version

    return {
        "python_version": sys.version,
        "packages": {p: version(p) for p in ("torch", "transformers", "nnsight")},
    }


def _atp(s: Setup, tmp_path: Path, **kwargs: Any) -> Any:
    kwargs.setdefault("checkpoint_dir", tmp_path / "chunks")
    return attribute(
        s.client, PAIRS, ["head", "q"], method="atp*", progress=False, remote=True, **kwargs
    )


def test_key_exported_after_import_is_sent(hub_client: Setup, monkeypatch, tmp_path: Path):
    service = _service(hub_client, monkeypatch, valid_keys=["key-from-env"])
    monkeypatch.setenv("NDIF_API_KEY", "key-from-env")  # nnsight read the environment long ago
    assert nnsight.CONFIG.API.APIKEY is None
    result = _atp(hub_client, tmp_path)
    assert [h["ndif-api-key"] for h in service.headers] == ["key-from-env"]
    assert service.subscribe_headers == [{"ndif-api-key": "key-from-env"}]
    local = attribute(hub_client.client, PAIRS, ["head", "q"], method="atp*", progress=False)
    assert_rank_agreement(local.scores, result.scores)


def test_key_sources_in_order(hub_client: Setup, monkeypatch, tmp_path: Path):
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", "from-config")
    assert resolve_api_key() == "from-config"
    monkeypatch.setenv("NDIF_API_KEY", "from-env")
    assert resolve_api_key() == "from-env"
    set_api_key("from-set")
    assert resolve_api_key() == "from-set"
    assert resolve_api_key("from-argument") == "from-argument"

    service = _service(hub_client, monkeypatch, valid_keys=["from-argument"])
    chunks = [torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, 6]])]
    out = run_chunks(
        hub_client.client,
        chunks,
        _last_logits,
        remote=True,
        api_key="from-argument",
        checkpoint_dir=tmp_path,
        progress=False,
    )
    assert [h["ndif-api-key"] for h in service.headers] == ["from-argument"] * 2
    assert [tuple(o.shape) for o in out] == [(1, 100), (1, 100)]


def _last_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """A minimal chunk body: the last position's logits."""
    with model.trace(ids):
        logits = model.output.logits[:, -1].float().detach().cpu()
    return logits


def test_planted_key_is_never_written(
    hub_client: Setup, monkeypatch, tmp_path: Path, capfd, caplog
):
    key = "ndif-PLANTED-7f3c9e1d"
    caplog.set_level(logging.DEBUG)
    service = _service(
        hub_client, monkeypatch, valid_keys=[key], job_errors={3: "CUDA out of memory"}
    )
    set_api_key(key)
    result = attribute(
        hub_client.client,
        PAIRS,
        ["head", "q"],
        method="atp*",
        pairs_per_chunk=2,
        progress=False,
        remote=True,
        checkpoint_dir=tmp_path / "chunks",
    )
    result.save(tmp_path / "result.npz")
    result.to_csv(tmp_path / "result.csv")
    write_report(tmp_path / "report", {"atp*": result}, settings={"remote": "ndif"})
    with pytest.raises(ChunkFailedError) as failed:
        attribute(
            hub_client.client,
            PAIRS,
            "head",
            method="atp",
            pairs_per_chunk=2,
            progress=False,
            remote=True,
            checkpoint_dir=tmp_path / "failed",
        )
    assert [h["ndif-api-key"] for h in service.headers] == [key] * 3  # it was used

    written = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "chunk_00000.pt" for p in tmp_path.rglob("*"))
    payloads = [zstandard.ZstdDecompressor().decompress(b) for b in service.payloads]
    out, err = capfd.readouterr()
    texts = [
        out,
        err,
        caplog.text,
        str(failed.value),
        repr(failed.value),
        "".join(traceback.format_exception(failed.value)),
        repr(result),
        str(result.metadata),
    ]
    for blob in written + payloads:
        assert key.encode() not in blob
    for text in texts:
        assert key not in text
    buffer = io.BytesIO()
    torch.save(result.__dict__, buffer)
    assert key.encode() not in buffer.getvalue()


def test_version_mismatch_warns(hub_client: Setup, monkeypatch, tmp_path: Path):
    env = _local_env()
    env["packages"] = dict(env["packages"], transformers="4.99.0")
    env["python_version"] = "3.12.3 (main) [GCC]"
    _service(hub_client, monkeypatch, valid_keys=["k"], remote_env=env)
    set_api_key("k")
    with pytest.warns(RemoteVersionWarning, match=r"transformers \S+ here, 4.99.0 on NDIF") as w:
        _atp(hub_client, tmp_path)
    if sys.version_info[:2] != (3, 12):
        assert "Python" in str(w[0].message) and "3.12 on NDIF" in str(w[0].message)

    monkeypatch.setattr(remote_mod, "_versions_checked", set())
    _service(hub_client, monkeypatch, valid_keys=["k"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RemoteVersionWarning)
        _atp(hub_client, tmp_path / "same")


def test_version_mismatches_only_what_matters():
    env = _local_env()
    torch_version = env["packages"]["torch"]
    patched = torch_version.split("+")[0].rsplit(".", 1)[0] + ".99"
    assert version_mismatches(env) == []
    assert version_mismatches(dict(env, packages=dict(env["packages"], torch=patched))) == []
    moved = dict(env, packages=dict(env["packages"], nnsight="0.7.0", pandas="0.1"))
    assert version_mismatches(moved) == [f"nnsight {nnsight.__version__} here, 0.7.0 on NDIF"]


# --------------------------------------------------------------------------------------------
# remote=True errors: each says what is wrong and how to fix it (no network here)
# --------------------------------------------------------------------------------------------


def test_no_api_key(hub_client: Setup, monkeypatch, tmp_path: Path):
    service = _service(hub_client, monkeypatch, valid_keys=["k"])
    for run in (
        lambda: _atp(hub_client, tmp_path),
        lambda: patch(hub_client.client, PAIRS, "head", remote=True),
    ):
        with pytest.raises(RemoteSetupError, match="NDIF_API_KEY") as err:
            run()
        assert err.value.reason == "no-api-key"
        assert "api_key=" in str(err.value) and "https://login.ndif.us" in str(err.value)
    assert service.headers == []


def test_key_rejected(hub_client: Setup, monkeypatch, tmp_path: Path):
    _service(hub_client, monkeypatch, valid_keys=["the-real-key"])
    set_api_key("a-fake-key")
    with pytest.raises(ChunkFailedError) as err:
        _atp(hub_client, tmp_path)
    assert err.value.reason == "api-key-rejected"
    message = str(err.value)
    assert "NDIF rejected the API key (HTTP 401" in message and INVALID_KEY_DETAIL in message
    assert "chunk 1/1" in message and "a-fake-key" not in message


@pytest.mark.parametrize(
    "failure, says",
    [
        (
            httpx.ConnectError("[Errno -3] Temporary failure in name resolution"),
            "connection failed",
        ),
        (httpx.ConnectTimeout("timed out"), "connection timed out"),
    ],
    ids=["dns", "timeout"],
)
def test_service_unreachable(hub_client: Setup, monkeypatch, tmp_path: Path, failure, says):
    _service(hub_client, monkeypatch, valid_keys=["fake-key"], unreachable=failure)
    set_api_key("fake-key")
    with pytest.raises(RemoteSetupError) as err:
        _atp(hub_client, tmp_path)
    message = str(err.value)
    assert err.value.reason == "unreachable"
    assert "cannot reach NDIF at https://" in message and says in message
    assert "NDIF_HOST" in message and "CONFIG.API.HOST" in message
    assert "not running" not in message and "not deployed" not in message


def test_unreachable_mid_run_keeps_finished_chunks(hub_client: Setup, monkeypatch, tmp_path: Path):
    service = _service(hub_client, monkeypatch, valid_keys=["k"])
    set_api_key("k")
    connect = websocket.create_connection
    calls = []

    def drop_second(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise websocket.WebSocketAddressException("[Errno -2] Name or service not known")
        return connect(*args, **kwargs)

    monkeypatch.setattr(websocket, "create_connection", drop_second)
    with pytest.raises(ChunkFailedError) as err:
        _atp(hub_client, tmp_path, pairs_per_chunk=2)
    assert err.value.reason == "unreachable" and err.value.done == 1
    message = str(err.value)
    assert "chunk 2/2 failed: cannot reach NDIF" in message and "NDIF_HOST" in message
    assert "1 finished chunk(s) are saved in" in message
    assert len(service.payloads) == 1


def test_host_exported_after_import_is_used(hub_client: Setup, monkeypatch, tmp_path: Path):
    monkeypatch.setattr(nnsight.CONFIG.API, "HOST", nnsight.CONFIG.API.HOST)  # restored after
    monkeypatch.setenv("NDIF_HOST", "https://ndif.example.org")
    _service(hub_client, monkeypatch, valid_keys=["k"], unreachable=httpx.ConnectError("no route"))
    set_api_key("k")
    with pytest.raises(RemoteSetupError, match="cannot reach NDIF at https://ndif.example.org"):
        _atp(hub_client, tmp_path)


def test_model_not_deployed_lists_deployed(hub_client: Setup, monkeypatch, tmp_path: Path):
    _service(
        hub_client,
        monkeypatch,
        valid_keys=["k"],
        deployed=["openai-community/gpt2", "meta-llama/Llama-3.1-70B"],
    )
    set_api_key("k")
    with pytest.raises(RemoteSetupError) as err:
        _atp(hub_client, tmp_path)
    assert err.value.reason == "model-not-deployed"
    message = str(err.value)
    assert f"model {REPO!r} is not deployed on NDIF" in message
    assert "meta-llama/Llama-3.1-70B, openai-community/gpt2" in message


def test_request_rejected_shows_server_message(hub_client: Setup, monkeypatch, tmp_path: Path):
    detail = "Client python version 3.11 does not match server version: 3.12."
    _service(hub_client, monkeypatch, valid_keys=["k"], reject=(400, detail))
    set_api_key("k")
    with pytest.raises(ChunkFailedError) as err:
        _atp(hub_client, tmp_path)
    assert err.value.reason == "request-rejected"
    assert f"NDIF rejected the request (HTTP 400): {detail}" in str(err.value)


def test_job_timeout_names_chunk_and_saved_chunks(hub_client: Setup, monkeypatch, tmp_path: Path):
    _service(
        hub_client,
        monkeypatch,
        valid_keys=["k"],
        job_errors={2: "Job took longer than timeout: 3600 seconds"},
    )
    set_api_key("k")
    with pytest.raises(ChunkFailedError) as err:
        _atp(hub_client, tmp_path, pairs_per_chunk=2)
    message = str(err.value)
    assert err.value.reason == "timeout" and err.value.done == 1
    assert "atp*: chunk 2/2 failed: the job hit the server's time limit" in message
    assert "3600 seconds" in message and "pairs_per_chunk" in message
    assert f"1 finished chunk(s) are saved in {tmp_path / 'chunks'}" in message
    assert (tmp_path / "chunks" / "chunk_00000.pt").exists()


def test_remote_true_needs_hub_model(llama: Setup, monkeypatch, no_network):
    monkeypatch.setenv("NDIF_API_KEY", "not-a-real-key")
    with pytest.raises(RemoteSetupError, match="Hugging Face id") as err:
        attribute(llama.client, PAIRS, "head", method="atp", remote=True)
    assert err.value.reason == "not-a-hub-model"


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
            ["head", "q", "k", "v", "neuron", "resid"],
            method="atp*",
            pairs_per_chunk=1,
            remote=backend,
            checkpoint_dir=checkpoint_dir,
            progress=False,
        )

    uninterrupted = llama.exact_backend()
    reference = run(uninterrupted)
    assert uninterrupted.requests == 3

    failing = llama.exact_backend(failures={2: "emulated server failure"})
    with pytest.raises(ChunkFailedError) as err:
        run(failing, tmp_path)
    message = str(err.value)
    assert "chunk 2/3 failed" in message
    assert "1 finished chunk(s) are saved in" in message and str(tmp_path) in message
    assert "emulated server failure" in message
    assert isinstance(err.value.__cause__, RemoteError)
    assert err.value.done == 1 and err.value.checkpoint_dir == tmp_path
    assert failing.requests == 2
    assert (tmp_path / "chunk_00000.pt").exists()
    assert not (tmp_path / "chunk_00001.pt").exists()

    resumed_backend = llama.exact_backend()
    resumed = run(resumed_backend, tmp_path)
    assert resumed_backend.requests == 2  # chunk 1 came from its checkpoint
    assert sorted(p.name for p in tmp_path.glob("chunk_*.pt")) == [
        f"chunk_{i:05d}.pt" for i in range(3)
    ]
    np.testing.assert_array_equal(resumed.per_pair, reference.per_pair)
    assert resumed.metadata["base_metric"] == reference.metadata["base_metric"]

    again = llama.exact_backend()
    np.testing.assert_array_equal(run(again, tmp_path).per_pair, reference.per_pair)
    assert again.requests == 0


def test_checkpoint_dir_of_another_run_is_refused(llama: Setup, tmp_path: Path):
    attribute(llama.client, PAIRS, "q", method="atp", checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different run"):
        attribute(llama.client, PAIRS, "q", method="atp+qk", checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different run"):
        attribute(llama.client, PAIRS[:2], "q", method="atp", checkpoint_dir=tmp_path)


def test_failed_request_names_the_chunk(llama: Setup):
    backend = llama.exact_backend(failures={1: "emulated server failure on request 1"})
    with pytest.raises(ChunkFailedError) as err:
        patch(llama.client, PAIRS, "head", remote=backend, progress=False)
    message = str(err.value)
    assert message.startswith("exact patching: chunk 1/1 failed: the job failed on the server")
    assert "RuntimeError: emulated server failure on request 1" in message
    assert "saved in" not in message  # nothing finished, no checkpoint directory
    assert err.value.done == 0 and err.value.reason == "failed"


def test_server_model_mismatch_surfaces(llama: Setup):
    """A server whose module tree differs (e.g. another transformers version) fails to resolve
    the request's module references; the error comes back naming the chunk."""
    hf = tiny_hf_model("llama", n_layers=1, seed=SEED)
    other = make_server_model(hf, tiny_tokenizer(hf.config.vocab_size), bf16=False)
    backend = InProcessNDIFBackend(other, llama.client, policy=EXACT)
    with pytest.raises(ChunkFailedError, match=r"atp: chunk 1/2 failed: .*layers\.1"):
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
    backend = InProcessNDIFBackend(llama.exact_server, trainable, policy=EXACT)
    emulated = attribute(trainable, PAIRS, kinds, method="atp*", remote=backend, progress=False)
    _assert_same(local, frozen)
    _assert_same(local, emulated)
    assert all(p.grad is None for p in trainable._module.parameters())
