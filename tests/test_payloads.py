"""What a request ships: only source-backed code, no module objects, nothing Python-specific.

nnsight ships a function as its *source* when it can read it; a function without a source file
(a dataclass's generated ``__init__``/``__eq__``/``__repr__``..., ``exec``'d code, a wrapper
whose ``__wrapped__`` has no source) falls back to cloudpickle's *bytecode*, which another
Python minor version (the server runs 3.12) cannot load — measured: ``TypeError`` in
``__init__`` and interpreter crashes. A module object referenced by shipped code is pickled by
value with its ``__spec__``/``__loader__`` (``_frozen_importlib*``), which the server's import
allowlist refuses.

Every method × node kind × granularity below is serialized through nnsight's real client path
(``RemoteBackend._serialize``) and its payload walked: every code object rebuilt from bytecode
and every module rebuilt by value is reported.
"""

from __future__ import annotations

import io
import types
from collections import Counter
from typing import Any

import nnsight
import pytest
import zstandard
from nnsight.intervention.backends.remote import RemoteBackend
from nnsight.intervention.serialization import CustomCloudUnpickler
from remote_setup import ALL_KINDS, PAIRS, build_setup

from atp_nnsight.methods.atp import METHODS, attribute
from atp_nnsight.methods.exact import patch, patch_sets
from atp_nnsight.remote import ChunkFailedError
from atp_nnsight.types import Node


class _Captured(Exception):
    """Raised after the payload is taken: nothing needs to run."""


class CapturingBackend(RemoteBackend):
    """Serializes each request as nnsight's client would POST it, keeps it, runs nothing."""

    def __init__(self) -> None:
        super().__init__("capture:model", host="http://127.0.0.1:9")
        self.display.enabled = False
        self.payloads: list[bytes] = []

    def request(self, request: Any, tracer: Any) -> Any:
        blob = self._serialize(tracer)
        self.payloads.append(
            zstandard.ZstdDecompressor().decompress(blob) if self.compress else blob
        )
        raise _Captured


class PayloadContents:
    """What unpickling a payload rebuilt: bytecode, modules by value, source-shipped functions."""

    def __init__(self) -> None:
        self.bytecode: Counter = Counter()
        self.modules_by_value: Counter = Counter()
        self.source_functions: Counter = Counter()

    def problems(self) -> list[str]:
        found = [
            f"bytecode: {name} (from {filename}) x{n}"
            for (filename, name), n in sorted(self.bytecode.items())
        ]
        found += [f"module by value: {name}" for name in sorted(self.modules_by_value)]
        return found


def inspect_payload(payload: bytes, persistent_objects: dict) -> PayloadContents:
    """Unpickle ``payload`` while recording what cloudpickle and nnsight rebuild."""
    contents = PayloadContents()

    class Recording(CustomCloudUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            found = super().find_class(module, name)
            if (module, name) == ("cloudpickle.cloudpickle", "_builtin_type"):
                return lambda type_name: _recording_type(found(type_name), type_name)
            if (module, name) == ("cloudpickle.cloudpickle", "dynamic_subimport"):
                return _recording_module(found)
            if (module, name) == ("nnsight.intervention.serialization", "_load_function"):
                return _recording_source(found)
            return found

    def _recording_type(built: Any, type_name: str) -> Any:
        if type_name != "CodeType":
            return built

        def make_code(*args: Any) -> types.CodeType:
            code = built(*args)
            contents.bytecode[(code.co_filename, code.co_qualname)] += 1
            return code

        return make_code

    def _recording_module(make: Any) -> Any:
        def dynamic_subimport(name: str, variables: dict) -> types.ModuleType:
            contents.modules_by_value[name] += 1
            return make(name, variables)

        return dynamic_subimport

    def _recording_source(load: Any) -> Any:
        def load_function(*args: Any) -> types.FunctionType:
            contents.source_functions[(args[5], args[1])] += 1
            return load(*args)

        return load_function

    Recording(io.BytesIO(payload), persistent_objects).load()
    return contents


@pytest.fixture(scope="module")
def llama() -> Any:
    return build_setup("llama")


def _payload(model: Any, run: Any) -> bytes:
    backend = CapturingBackend()
    with pytest.raises(ChunkFailedError) as err:
        run(backend)
    assert isinstance(err.value.__cause__, _Captured), err.value
    return backend.payloads[0]


def _assert_portable(model: Any, payload: bytes) -> PayloadContents:
    contents = inspect_payload(payload, model._remoteable_persistent_objects())
    assert contents.source_functions, "nothing was shipped as source: the walk saw no code"
    problems = contents.problems()
    assert not problems, "the payload is not portable across Python versions:\n" + "\n".join(
        problems
    )
    return contents


@pytest.mark.parametrize("per_position", [False, True], ids=["summed", "per-position"])
@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("method", ["exact", *METHODS])
def test_payload_ships_only_source(llama: Any, method: str, kind: str, per_position: bool):
    client = llama.client

    def run(backend: Any) -> Any:
        if method == "exact":
            return patch(client, PAIRS, kind, per_position=per_position, remote=backend)
        return attribute(
            client, PAIRS, kind, method=method, per_position=per_position, remote=backend
        )

    _assert_portable(client, _payload(client, run))


def test_patch_sets_payload_ships_only_source(llama: Any):
    sets = [[Node("head", 0, 1), Node("neuron", 1, 5, 2)], [Node("resid", 1, 0)]]
    client = llama.client
    _assert_portable(client, _payload(client, lambda b: patch_sets(client, PAIRS, sets, remote=b)))


def test_walk_finds_bytecode_and_modules_by_value(llama: Any):
    """The walk is not blind: a dataclass's generated methods are bytecode, a module object
    referenced by shipped code travels by value."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Generated:
        value: int

    client = llama.client

    def run(backend: Any) -> Any:
        thing = Generated(1)
        module = types.ModuleType("shipped_helpers")
        module.SEED = 3
        with client.session(backend=backend):
            out = nnsight.save((thing.value, module.SEED))
        return out

    contents = inspect_payload(_payload_of_session(run), client._remoteable_persistent_objects())
    problems = "\n".join(contents.problems())
    assert "bytecode: __create_fn__.<locals>.__init__ (from <string>)" in problems
    assert "module by value: shipped_helpers" in problems


def _payload_of_session(run: Any) -> bytes:
    backend = CapturingBackend()
    with pytest.raises(_Captured):
        run(backend)
    return backend.payloads[0]
