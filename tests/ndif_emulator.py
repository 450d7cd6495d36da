"""An in-process stand-in for NDIF that keeps nnsight's real client code path.

:class:`InProcessNDIFBackend` subclasses nnsight's ``RemoteBackend`` and replaces only the
network step (``request``): the session is serialized exactly as the real client would POST
it (``RemoteBackend._serialize``: by-value registration of local modules, source + referenced
names, cloudpickle, zstd), then a "server" thread deserializes the blob against a *separate*
model (same weights, frozen like NDIF's: ``requires_grad_(False)``) while the modules the
server would not have are hidden, executes it, ``torch.save``s + zstd-compresses the saved
values and hands the bytes to the client's ``finalize`` — the same tail a real download takes.
A server-side exception comes back as an ERROR status, i.e. nnsight's ``RemoteError``.

Hidden on the "server":

* while the request is deserialized, what nnsight's own ``remote="local"`` hides (modules and
  ``sys.path`` entries outside site-packages);
* while it is deserialized *and* executed, ``server_missing`` (default: ``atp_nnsight``):
  packages installed here but not on NDIF, so a lazy ``import atp_nnsight...`` inside the
  shipped code fails as it would there.
  ``remote="local"`` does not hide ``atp_nnsight`` (its module filter keeps every name that
  contains ``"nnsight"``, and the editable install's meta-path finder would re-import it
  anyway), so this emulator removes those modules from ``sys.modules`` and blocks their import.

This emulates the NDIF *trusted* path (code runs next to the model). Not emulated: bf16
autocast, the untrusted runner's copy semantics, the import/builtins whitelist.
"""

from __future__ import annotations

import importlib.abc
import io
import linecache
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.intervention.backends.remote import RemoteBackend
from nnsight.schema.request import RequestModel
from nnsight.schema.response import ResponseModel, Status
from nnsight.tracing import tracer as _tracer


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


def serve(
    blob: bytes,
    server_model: Any,
    *,
    compress: bool,
    env: dict | None = None,
    server_missing: Sequence[str] = ("atp_nnsight",),
) -> bytes:
    """What an NDIF worker does with one request blob; returns the result blob.

    Runs in a fresh thread: nnsight's save set and trace depth are thread-local, so the
    server state never mixes with the client's (whose session ``__exit__`` is waiting).
    """
    out: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def work() -> None:
        if env:
            server_model._remoteable_set_env(env)
        lines = dict(linecache.cache)
        try:
            with server_environment(server_model, server_missing):
                tracer = RequestModel.deserialize(
                    blob, server_model._remoteable_persistent_objects(), compress
                )
            with server_environment(server_model, server_missing, hide_local=False):
                _tracer.inc()  # the server's execution is the outermost trace
                try:
                    tracer.execute(tracer.info.code)
                    saves = _tracer._saves()
                    result = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in saves}
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


class InProcessNDIFBackend(RemoteBackend):
    """An nnsight backend that runs each request (one session) on an emulated NDIF server.

    ``server_model`` is a separately built wrapper around a frozen copy of the client's
    weights; ``client_model`` supplies the request environment (attention implementation).
    ``fail_on`` (1-based request numbers) makes those requests fail server-side.
    ``requests`` counts requests, ``payload_bytes`` / ``result_bytes`` record their sizes and
    ``errors`` the server-side exceptions.
    """

    def __init__(
        self,
        server_model: Any,
        client_model: Any = None,
        *,
        compress: bool = True,
        server_missing: Sequence[str] = ("atp_nnsight",),
        fail_on: Sequence[int] = (),
    ):
        env = client_model._remoteable_get_env() if client_model is not None else {}
        super().__init__("emulated:model", host="http://127.0.0.1:9", env=env)
        self.compress = compress
        self.display.enabled = False
        self.server_model = server_model
        self.server_missing = tuple(server_missing)
        self.fail_on = set(fail_on)
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
            if self.requests in self.fail_on:
                raise RuntimeError(f"emulated server failure on request {self.requests}")
            data = serve(
                blob,
                self.server_model,
                compress=self.compress,
                env=request.env,
                server_missing=self.server_missing,
            )
        except Exception as err:
            self.errors.append(err)
            # What the server streams back for a failed job; note() raises RemoteError.
            response = ResponseModel(
                id=f"job-{self.requests}",
                status=Status.ERROR,
                description=f"{type(err).__name__}: {err}",
            )
            return self.handle(response)
        self.result_bytes.append(len(data))
        response = ResponseModel(id=f"job-{self.requests}", status=Status.COMPLETED, data=data)
        return self.handle(response)
