"""An in-process stand-in for NDIF that keeps nnsight's real client code path.

:class:`InProcessNDIFBackend` subclasses the library's ``NdifBackend`` (nnsight's
``RemoteBackend``) and replaces only the network step (``request``): the session is serialized
exactly as the real client would POST it (``RemoteBackend._serialize``: by-value registration of
local modules, source + referenced names, cloudpickle, zstd), then a "server" thread
deserializes the blob against a *separate* model (same weights, frozen like NDIF's), executes
it, ``torch.save``s + zstd-compresses the saved values and hands the bytes to the client's
``finalize`` — the same tail a real download takes. A server-side exception comes back as an
ERROR status whose description is laid out like the server's (traceback, then the message),
i.e. nnsight's ``RemoteError``.

What the server enforces, modelled on the public NDIF source (``ndif-team/ndif``:
``nn/security/protected_environment.py``, ``deployments/modeling/base.py``) and configurable
through :class:`ServerPolicy`:

* **Import allowlist while deserializing**: every global the payload names (pickle
  ``find_class``) and every module it imports (cloudpickle's ``subimport``) must be on
  ``deserialization_modules`` — the server's list plus what nnsight 0.8.1's own request format
  needs (:data:`NNSIGHT_OWN_MODULES`, measured on a payload of an empty session). Matching is
  the server's: a strict entry equals the module name, a loose one is a prefix of it. So a
  module pickled by value (its ``__spec__``/``__loader__`` from ``_frozen_importlib*``) or a
  dataclass (``dataclasses``) fails here as it would there.
* **Builtins and imports of shipped code**: functions rebuilt from shipped source run with only
  the server's whitelisted builtins, and their ``import`` statements are checked against
  ``execution_modules``. (The server swaps the builtins of the whole process; doing that here
  would also restrict nnsight's and pytest's own code, so the traced block itself and nnsight
  keep the real builtins.)
* **Numerics** (``bf16=True``): the server's weights are bf16 (checked), the default dtype is
  ``torch.bfloat16`` while the request is deserialized and run, and it runs under autocast
  (CPU autocast here; the server uses CUDA autocast). The previous default dtype is restored.
  ``bf16=False`` keeps fp32 for exact-number tests of the serialization path.
* **Frozen weights**: the server model must have ``requires_grad=False`` parameters.
* **Missing packages**: while the request is deserialized, what nnsight's ``remote="local"``
  hides (modules and ``sys.path`` entries outside site-packages); while it is deserialized
  *and* executed, ``server_missing`` (default ``atp_nnsight``): packages installed here but not
  on NDIF, removed from ``sys.modules`` with their import blocked.

This emulates the NDIF *trusted* path (code runs next to the model). Not emulated: the
untrusted runner's copy semantics, the API's client-version checks, queueing and time limits
(``failures`` makes chosen requests fail with a given server message instead).
"""

from __future__ import annotations

import builtins
import importlib.abc
import io
import json
import linecache
import sys
import threading
import traceback
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from nnsight.intervention import serialization
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.intervention.serialization import CustomCloudUnpickler
from nnsight.modeling.transformers import TransformersModel
from nnsight.schema.request import RequestModel
from nnsight.schema.response import ResponseModel, Status
from nnsight.tracing import tracer as _tracer

from atp_nnsight.remote import NdifBackend

Allowed = tuple[str, bool]
"""``(module name, strict)``: strict entries match the name exactly, loose ones as a prefix."""

SERVER_EXECUTION_MODULES: tuple[Allowed, ...] = (
    ("builtins", True),
    ("torch", False),
    ("collections", False),
    ("nnsight.intervention.envoy", False),
    ("time", False),
    ("numpy", False),
    ("sympy", False),
    ("nnterp", False),
    ("math", False),
    ("einops", False),
    ("urllib3", False),
    ("typing", False),
    ("_operator", True),
    ("operator", True),
    ("pandas", False),
    ("enum", False),
)
"""The server's ``WHITELISTED_MODULES`` (imports while a request runs)."""

SERVER_DESERIALIZATION_MODULES: tuple[Allowed, ...] = (
    ("pickle", False),
    ("cloudpickle", False),
    ("copyreg", False),
    ("nnsight.schema.request", True),
    ("nnsight.modeling.mixins.remoteable", True),
    ("nnsight.intervention.tracing.base", True),
    ("nnsight.intervention.interleaver", True),
    ("nnsight.intervention.batching", True),
    ("nnsight.modeling", False),
    *SERVER_EXECUTION_MODULES,
)
"""The server's ``WHITELISTED_MODULES_DESERIALIZATION`` (written for an older nnsight)."""

NNSIGHT_OWN_MODULES: tuple[Allowed, ...] = (
    ("nnsight", True),
    ("nnsight.tracing", False),
    ("nnsight.intervention.serialization", True),
)
"""What nnsight 0.8.1's request format references beyond the server's list: the package
itself (a block calling ``nnsight.save``), the tracer and its frame (``nnsight.tracing``) and
the rebuilding of functions shipped as source (``nnsight.intervention.serialization``)."""

SERVER_BUILTINS = frozenset(
    """BaseExceptionGroup ArithmeticError AssertionError AttributeError BaseException
    BlockingIOError BrokenPipeError BufferError BytesWarning ChildProcessError
    ConnectionAbortedError ConnectionError ConnectionRefusedError ConnectionResetError
    DeprecationWarning EOFError Ellipsis EncodingWarning EnvironmentError Exception False
    FileExistsError FileNotFoundError FloatingPointError FutureWarning GeneratorExit IOError
    ImportError ImportWarning IndentationError IndexError InterruptedError IsADirectoryError
    KeyError KeyboardInterrupt LookupError MemoryError ModuleNotFoundError NameError None
    NotADirectoryError NotImplemented NotImplementedError OSError OverflowError
    PendingDeprecationWarning PermissionError ProcessLookupError RecursionError ReferenceError
    ResourceWarning RuntimeError RuntimeWarning StopAsyncIteration StopIteration SyntaxError
    SyntaxWarning SystemError SystemExit TabError TimeoutError True TypeError
    UnboundLocalError UnicodeDecodeError UnicodeEncodeError UnicodeError
    UnicodeTranslateError UnicodeWarning UserWarning ValueError Warning ZeroDivisionError
    __doc__ __import__ __loader__ __name__ __package__ __spec__ __build_class__ abs aiter all
    anext any ascii bool bytearray bytes callable chr classmethod complex copyright credits
    delattr dict dir divmod enumerate filter float format frozenset getattr hasattr hash hex id
    int isinstance issubclass iter len list map max min next object oct ord pow print property
    range repr reversed round set setattr slice sorted staticmethod str sum super tuple type
    vars zip memoryview globals input eval""".split()
)
"""The server's ``WHITELISTED_BUILTINS``: no ``open``, ``exec``, ``compile``, ``locals``..."""


@dataclass
class ServerPolicy:
    """What the emulated server enforces (see the module docstring)."""

    deserialization_modules: tuple[Allowed, ...] = SERVER_DESERIALIZATION_MODULES
    nnsight_modules: tuple[Allowed, ...] = NNSIGHT_OWN_MODULES
    execution_modules: tuple[Allowed, ...] = SERVER_EXECUTION_MODULES
    builtins: frozenset[str] | None = SERVER_BUILTINS
    bf16: bool = True
    server_missing: tuple[str, ...] = ("atp_nnsight",)

    def check(self, module: str, stage: str) -> None:
        """Raise ``ImportError`` like the server when ``module`` is not allowed at ``stage``."""
        allowed = (
            self.deserialization_modules + self.nnsight_modules
            if stage == "deserialization"
            else self.execution_modules
        )
        if not any(
            module == name if strict else module.startswith(name) for name, strict in allowed
        ):
            raise ImportError(f"Module {module} is not whitelisted")


LENIENT = ServerPolicy(
    deserialization_modules=(("", False),),
    execution_modules=(("", False),),
    builtins=None,
    bf16=False,
)
"""No allowlist and fp32: only nnsight's serialization round trip and the frozen copy."""

EXACT = ServerPolicy(bf16=False)
"""The server's allowlists and builtins with fp32 numerics (exact-number comparisons)."""

STRICT = ServerPolicy()
"""The server's allowlists, builtins and bf16 numerics (the default)."""


def _guarded_import(policy: ServerPolicy) -> Callable[..., Any]:
    """``__import__`` for shipped code: only ``policy.execution_modules``, no relative import."""

    def guarded(
        name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
    ) -> Any:
        if level:
            raise ImportError(f"relative import of {name!r} in shipped code is not allowed")
        policy.check(name, "execution")
        return builtins.__import__(name, globals, locals, fromlist, level)

    return guarded


def _restricted_builtins(policy: ServerPolicy) -> dict[str, Any]:
    allowed = {k: getattr(builtins, k) for k in policy.builtins or () if hasattr(builtins, k)}
    allowed["__import__"] = _guarded_import(policy)
    return allowed


def allowlist_unpickler(policy: ServerPolicy) -> type:
    """An unpickler class (for ``RequestModel.deserialize``) that enforces ``policy``."""
    load_function = serialization._load_function
    safe_builtins = _restricted_builtins(policy) if policy.builtins is not None else None

    def checked_subimport(name: str) -> types.ModuleType:
        policy.check(name, "deserialization")
        __import__(name)
        return sys.modules[name]

    def restricted_load_function(*args: Any) -> types.FunctionType:
        func = load_function(*args)
        rebuilt = types.FunctionType(
            func.__code__,
            {"__builtins__": safe_builtins},
            func.__name__,
            func.__defaults__,
            func.__closure__,
        )
        rebuilt.__kwdefaults__ = func.__kwdefaults__
        rebuilt.__annotations__ = func.__annotations__
        return rebuilt

    class AllowlistUnpickler(CustomCloudUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            policy.check(module, "deserialization")
            if (module, name) == ("cloudpickle.cloudpickle", "subimport"):
                return checked_subimport
            if (module, name) == ("nnsight.intervention.serialization", "_load_function"):
                if safe_builtins is not None:
                    return restricted_load_function
            return super().find_class(module, name)

    return AllowlistUnpickler


class _BlockImports(importlib.abc.MetaPathFinder):
    """Makes ``import <root>...`` fail as it would where the package is not installed."""

    def __init__(self, roots: Sequence[str]):
        self.roots = set(roots)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.split(".")[0] in self.roots:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


@contextmanager
def server_environment(
    server_model: Any, server_missing: Sequence[str], *, hide_local: bool = True
) -> Iterator[None]:
    """Hide what the server does not have.

    ``server_missing`` packages are removed from ``sys.modules`` and their import is blocked;
    with ``hide_local`` also what nnsight's ``remote="local"`` hides (every module and
    ``sys.path`` entry outside site-packages — including installed third-party packages such
    as pytest, which is why that part is only applied while deserializing, like nnsight does).
    """
    hider = LocalSimulationBackend(server_model)
    hidden = hider._hide_local_modules() if hide_local else None
    roots = set(server_missing)
    extra = {n: sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] in roots}
    blocker = _BlockImports(roots)
    sys.meta_path.insert(0, blocker)
    try:
        yield
    finally:
        sys.meta_path.remove(blocker)
        sys.modules.update(extra)
        if hidden is not None:
            hider._restore(hidden)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` for the block; the previous one is restored."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def make_server_model(hf_model: torch.nn.Module, tokenizer: Any, *, bf16: bool = True) -> Any:
    """Wrap a separately built copy of the client's weights as NDIF would load it.

    Frozen (``requires_grad_(False)``) and, with ``bf16``, cast to ``torch.bfloat16``.
    """
    hf_model.requires_grad_(False)
    if bf16:
        hf_model.to(torch.bfloat16)
    return TransformersModel(hf_model, tokenizer=tokenizer)


def serve(
    blob: bytes, server_model: Any, *, compress: bool, env: dict | None, policy: ServerPolicy
) -> bytes:
    """What an NDIF worker does with one request blob; returns the result blob.

    Runs in a fresh thread: nnsight's save set and trace depth, grad mode and autocast are
    thread-local, so the server state never mixes with the client's (whose session
    ``__exit__`` is waiting).
    """
    out: dict[str, bytes] = {}
    errors: list[BaseException] = []
    unpickler = allowlist_unpickler(policy)
    dtype = torch.bfloat16 if policy.bf16 else torch.get_default_dtype()

    def work() -> None:
        if env:
            server_model._remoteable_set_env(env)
        lines = dict(linecache.cache)
        try:
            with default_dtype(dtype):
                with server_environment(server_model, policy.server_missing):
                    tracer = RequestModel.deserialize(
                        blob, server_model._remoteable_persistent_objects(), compress, unpickler
                    )
                with server_environment(server_model, policy.server_missing, hide_local=False):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=policy.bf16):
                        _tracer.inc()  # the server's execution is the outermost trace
                        try:
                            tracer.execute(tracer.info.code)
                            saves = _tracer._saves()
                            frame = tracer.info.frame.f_locals
                            result = {k: v for k, v in frame.items() if id(v) in saves}
                        finally:
                            _tracer.dec()
        finally:
            linecache.cache.clear()
            linecache.cache.update(lines)
        buf = io.BytesIO()
        torch.save(result, buf, pickle_protocol=4)
        data = buf.getvalue()
        if compress:
            import zstandard as zstd

            data = zstd.ZstdCompressor(level=6).compress(data)
        out["data"] = data

    def run() -> None:
        try:
            work()
        except BaseException as err:  # reported to the client as an ERROR status
            errors.append(err)

    thread = threading.Thread(target=run, name="emulated-ndif")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out["data"]


class InProcessNDIFBackend(NdifBackend):
    """An nnsight backend that runs each request (one session) on an emulated NDIF server.

    ``server_model`` is a separately built wrapper around a frozen copy of the client's
    weights (:func:`make_server_model`); ``client_model`` supplies the request environment
    (attention implementation). ``policy`` is what the server enforces (default
    :data:`STRICT`: allowlists, builtins, bf16). ``failures`` maps 1-based request numbers to
    the message the server fails them with. ``requests`` counts requests, ``payload_bytes`` /
    ``result_bytes`` record their sizes and ``errors`` the server-side exceptions.
    """

    def __init__(
        self,
        server_model: Any,
        client_model: Any = None,
        *,
        policy: ServerPolicy = STRICT,
        compress: bool = True,
        failures: Mapping[int, str] | None = None,
    ):
        env = client_model._remoteable_get_env() if client_model is not None else {}
        super().__init__("emulated:model", host="http://127.0.0.1:9", env=env)
        params = list(server_model._module.parameters())
        if any(p.requires_grad for p in params):
            raise ValueError("the server model must be frozen like NDIF's: requires_grad_(False)")
        if policy.bf16 and any(p.dtype != torch.bfloat16 for p in params):
            raise ValueError("policy.bf16 needs bf16 server weights: make_server_model(bf16=True)")
        self.compress = compress
        self.display.enabled = False
        self.server_model = server_model
        self.policy = policy
        self.failures = dict(failures or {})
        self.requests = 0
        self.payload_bytes: list[int] = []
        self.result_bytes: list[int] = []
        self.errors: list[BaseException] = []

    def request(self, request: RequestModel, tracer: Any) -> Any:
        """Replaces subscribe + POST + status stream + download; everything else is real."""
        self.requests += 1
        blob = self._serialize(tracer)  # exactly what would be POSTed
        self.payload_bytes.append(len(blob))
        try:
            if self.requests in self.failures:
                raise RuntimeError(self.failures[self.requests])
            data = serve(
                blob,
                self.server_model,
                compress=self.compress,
                env=request.env,
                policy=self.policy,
            )
        except Exception as err:
            self.errors.append(err)
            # The server's ERROR description: the traceback, then the message.
            report = "".join(traceback.format_exception(err))
            response = ResponseModel(
                id=f"job-{self.requests}", status=Status.ERROR, description=f"{report}\n{err}"
            )
            return self.handle(response)  # note() raises RemoteError
        self.result_bytes.append(len(data))
        response = ResponseModel(id=f"job-{self.requests}", status=Status.COMPLETED, data=data)
        return self.handle(response)


# --------------------------------------------------------------------------------------------
# the web service around it: what nnsight's real RemoteBackend.request talks to
# --------------------------------------------------------------------------------------------

INVALID_KEY_DETAIL = (
    "Missing or invalid API key. Please visit https://login.ndif.us/ to create a new one."
)
"""The server's answer (HTTP 401) to a request with an unknown key."""


class _Answer:
    """The part of an ``httpx.Response`` nnsight's ``_post`` reads."""

    def __init__(self, url: str, status: int, body: dict):
        import httpx

        self.response = httpx.Response(status, json=body, request=httpx.Request("POST", url))
        self.text = self.response.text

    def raise_for_status(self) -> None:
        self.response.raise_for_status()


class _Socket:
    """The ``/subscribe`` websocket: the session id, then the job's status updates."""

    def __init__(self, messages: list[Any]):
        self.messages = messages

    def settimeout(self, seconds: float) -> None:
        pass

    def recv(self) -> Any:
        return self.messages.pop(0)

    def close(self) -> None:
        pass


class FakeNDIFService:
    """NDIF's web service in-process, behind nnsight's real client transport.

    :meth:`install` replaces ``websocket.create_connection`` (``/subscribe``), the
    ``httpx.Client.post`` of nnsight's ``_post`` (``/request``) and ``nnsight.ndif._get``
    (``/status``, ``/env``); everything in nnsight's ``RemoteBackend`` above them runs as is.
    Requests run on :func:`serve` against ``server_model`` under ``policy``.

    ``deployed``: repo ids reported RUNNING by ``/status``. ``valid_keys``: keys ``/request``
    accepts (others get the server's HTTP 401). ``reject``: an HTTP ``(status, detail)`` every
    ``/request`` gets. ``job_errors``: 1-based job number → the server's error message for that
    job (e.g. its timeout message). ``unreachable``: an exception every call raises (no
    network). ``headers`` records the headers of each ``/request`` and ``subscribe_headers``
    those of each websocket; ``payloads`` the request blobs.
    """

    def __init__(
        self,
        server_model: Any,
        *,
        policy: ServerPolicy = STRICT,
        deployed: Sequence[str] = (),
        valid_keys: Sequence[str] = (),
        remote_env: Mapping[str, Any] | None = None,
        reject: tuple[int, str] | None = None,
        job_errors: Mapping[int, str] | None = None,
        unreachable: BaseException | None = None,
    ):
        self.server_model = server_model
        self.policy = policy
        self.deployed = list(deployed)
        self.valid_keys = set(valid_keys)
        self.remote_env = dict(remote_env or {})
        self.reject = reject
        self.job_errors = dict(job_errors or {})
        self.unreachable = unreachable
        self.headers: list[dict] = []
        self.subscribe_headers: list[dict | None] = []
        self.payloads: list[bytes] = []
        self._socket: _Socket | None = None

    def install(self, monkeypatch: Any) -> FakeNDIFService:
        import httpx
        import websocket
        from nnsight import ndif

        monkeypatch.setattr(websocket, "create_connection", self._subscribe)
        # a bound method as the class attribute: `client.post(url, ...)` calls self._post(url)
        monkeypatch.setattr(httpx.Client, "post", self._post)
        monkeypatch.setattr(ndif, "_get", self._get)
        monkeypatch.setattr(ndif, "_REMOTE_ENV", None)  # nnsight caches /env per process
        return self

    def _get(self, path: str, timeout: Any = None, headers: Any = None) -> dict:
        if self.unreachable is not None:
            raise self.unreachable
        if path == "/status":
            return {
                "deployments": {
                    repo: {
                        "repo_id": repo,
                        "deployment_level": "HOT",
                        "application_state": "RUNNING",
                        "model_key": f"nnsight.modeling.language.LanguageModel:{repo}",
                    }
                    for repo in self.deployed
                }
            }
        if path == "/env":
            return self.remote_env
        raise AssertionError(f"unexpected GET {path}")

    def _subscribe(self, url: str, header: dict | None = None, **_: Any) -> _Socket:
        if self.unreachable is not None:
            raise self.unreachable
        self.subscribe_headers.append(header)
        self._socket = _Socket([json.dumps({"session_id": f"session-{len(self.payloads)}"})])
        return self._socket

    def _post(self, url: str, *, data: Any, files: Any, headers: dict) -> _Answer:
        self.headers.append(dict(headers))
        if headers.get("ndif-api-key") not in self.valid_keys:
            return _Answer(url, 401, {"detail": INVALID_KEY_DETAIL})
        if self.reject is not None:
            return _Answer(url, self.reject[0], {"detail": self.reject[1]})
        request = json.loads(data["data"])
        blob = files["blob"][1]
        self.payloads.append(blob)
        job = len(self.payloads)
        try:
            if job in self.job_errors:
                raise RuntimeError(self.job_errors[job])
            result = serve(
                blob,
                self.server_model,
                compress=request["compress"],
                env=request.get("env"),
                policy=self.policy,
            )
            update = ResponseModel(id=f"job-{job}", status=Status.COMPLETED, data=result)
            self._socket.messages.append(update.pickle())
        except Exception as err:
            report = "".join(traceback.format_exception(err))
            update = ResponseModel(
                id=f"job-{job}", status=Status.ERROR, description=f"{report}\n{err}"
            )
            self._socket.messages.append(update.model_dump_json())
        received = ResponseModel(id=f"job-{job}", status=Status.RECEIVED, description="received")
        return _Answer(url, 200, json.loads(received.model_dump_json()))
