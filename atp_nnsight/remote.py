"""Running method bodies locally or on NDIF, one nnsight session per chunk of pairs.

Methods never special-case remote execution: each chunk's work is a plain function of
``(model, chunk)`` that opens nnsight traces, reduces per-node values inside them and returns
saved tensors. :func:`run_chunks` runs that function inside ``model.session(...)`` with the
backend chosen by ``remote``:

* ``False`` — local execution (the session is a plain in-process block);
* ``"local"`` — nnsight's serialize/deserialize dry run of a remote request, executed locally;
* ``True`` — NDIF (needs an API key and a model deployed there);
* an nnsight backend object — used as given (tests use an in-process emulated server).

**API key** (``remote=True``), first found wins: the ``api_key`` argument, :func:`set_api_key`,
the ``NDIF_API_KEY`` environment variable *read at call time*, ``nnsight.CONFIG.API.APIKEY``.
The key is handed to nnsight's ``RemoteBackend(api_key=...)``, which sends it as the
``ndif-api-key`` header of every request (nnsight itself reads ``NDIF_API_KEY`` only once, at
import). It is kept in memory only: never in results, checkpoints, logs, messages or payloads.
The host is ``NDIF_HOST`` (read at call time) or ``nnsight.CONFIG.API.HOST``.

**Before the first request** (:func:`check_remote`): key present, model built from a Hub id,
service reachable, model deployed (else the deployed models are listed), and local versions of
Python, torch, transformers and nnsight compared with the server's (a
:class:`RemoteVersionWarning` on a mismatch that matters). Failures raise
:class:`RemoteSetupError`, failed chunks :class:`ChunkFailedError`; both carry a ``reason``
(:data:`REASONS`) and a one-line message naming the problem and the fix.

**Checkpoints**: with ``checkpoint_dir`` finished chunks are written there; a failed run keeps
them, and rerunning the same call resumes from them instead of recomputing. The folder records
a fingerprint of its run (``run.json``), so a different call pointed at it fails instead of
silently reusing the other run's chunks. NDIF runs checkpoint by default.

**Shipping code**: NDIF does not have ``atp_nnsight`` installed, and nnsight ships by value only
modules that are *not* installed (``nnsight.ndif.pull_env``); so every remote run registers
``atp_nnsight`` for pickling by value (:func:`ship_by_value`), otherwise the server cannot
unpickle the chunk bodies (``ModuleNotFoundError: No module named 'atp_nnsight'``).

**Request sizes**: inside ``with record_transfers() as log:`` every request made by
:func:`run_chunks` appends its payload and result sizes (bytes, as sent) and seconds to ``log``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nnsight
import torch
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError
from tqdm.auto import tqdm

Remote = bool | str | Any

LOGIN_URL = "https://login.ndif.us"

REASONS = (
    "no-api-key",
    "not-a-hub-model",
    "unreachable",
    "service-error",
    "model-not-deployed",
    "api-key-rejected",
    "request-rejected",
    "timeout",
    "failed",
)
"""Values of ``reason`` on :class:`RemoteSetupError` and :class:`ChunkFailedError`."""

_VERSIONED_PACKAGES = ("torch", "transformers", "nnsight")


class RemoteSetupError(RuntimeError):
    """Remote execution cannot start; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class ChunkFailedError(RuntimeError):
    """One chunk of a run failed; finished chunks are kept in ``checkpoint_dir``.

    ``done`` counts the chunks finished before it; ``reason`` is one of :data:`REASONS`.
    """

    def __init__(
        self, message: str, checkpoint_dir: Path | None, done: int, reason: str = "failed"
    ):
        super().__init__(message)
        self.checkpoint_dir = checkpoint_dir
        self.done = done
        self.reason = reason


class RemoteVersionWarning(UserWarning):
    """Local and NDIF versions of Python, torch, transformers or nnsight differ."""


# ---- API key and host ----------------------------------------------------------------------

_session_api_key: str | None = None


def set_api_key(key: str | None) -> None:
    """Use ``key`` for the NDIF requests of this process (``None`` forgets it).

    Kept in memory only (unlike ``nnsight.login``, which writes it to nnsight's config file).
    """
    global _session_api_key
    _session_api_key = key or None


def resolve_api_key(api_key: str | None = None) -> str | None:
    """The key NDIF requests use: ``api_key``, :func:`set_api_key`, ``$NDIF_API_KEY``, config."""
    from nnsight import CONFIG

    return api_key or _session_api_key or os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY


def api_key_source(api_key: str | None = None) -> str | None:
    """Where :func:`resolve_api_key` finds the key (never the key itself), or ``None``."""
    from nnsight import CONFIG

    sources = (
        ("the api_key argument", api_key),
        ("set_api_key()", _session_api_key),
        ("NDIF_API_KEY", os.environ.get("NDIF_API_KEY")),
        ("nnsight.CONFIG.API.APIKEY", CONFIG.API.APIKEY),
    )
    return next((name for name, value in sources if value), None)


def ndif_host() -> str:
    """The NDIF host: ``$NDIF_HOST`` if set now, else ``nnsight.CONFIG.API.HOST``.

    nnsight reads ``NDIF_HOST`` once, at import; a value exported later is copied into
    ``CONFIG.API.HOST`` here so that nnsight's own calls use it too.
    """
    from nnsight import CONFIG

    env = os.environ.get("NDIF_HOST")
    if env and env != CONFIG.API.HOST:
        CONFIG.API.HOST = env
    return CONFIG.API.HOST


# ---- classifying failures ------------------------------------------------------------------


def _causes(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _http_status(err: BaseException) -> tuple[int, str] | None:
    """``(status, server message)`` of an HTTP answer anywhere in ``err``'s causes."""
    import httpx
    import websocket

    for e in _causes(err):
        if isinstance(e, httpx.HTTPStatusError):
            try:
                body = e.response.json()
                detail = body.get("detail") if isinstance(body, dict) else body
            except ValueError:
                detail = e.response.text
            return e.response.status_code, str(detail or e.response.reason_phrase)
        if isinstance(e, websocket.WebSocketBadStatusException):
            return e.status_code, str(e.status_message or e)
    return None


def _unreachable(err: BaseException) -> BaseException | None:
    """The network-level failure (DNS, refused, timeout) in ``err``'s causes, if any."""
    import httpx
    import websocket

    network = (
        httpx.TransportError,
        websocket.WebSocketAddressException,
        websocket.WebSocketTimeoutException,
        websocket.WebSocketConnectionClosedException,
        ConnectionError,
        TimeoutError,
        OSError,
    )
    for e in _causes(err):
        if isinstance(e, network) and not isinstance(e, (FileNotFoundError, PermissionError)):
            return e
    return None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _unreachable_message(host: str, cause: BaseException) -> str:
    kind = "timed out" if "timeout" in type(cause).__name__.lower() else "failed"
    return (
        f"cannot reach NDIF at {host} (connection {kind}: {_one_line(cause)}); check the "
        "network (DNS, proxy, firewall), or point NDIF_HOST / nnsight.CONFIG.API.HOST at the "
        "right host"
    )


def _server_message(text: str) -> str:
    """The line of a server-side error report that names the exception (else its last line)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "no message"
    named = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*", line)]
    return named[-1] if named else lines[-1]


def _classify(err: BaseException, host: str) -> tuple[str, str]:
    """``(reason, message)`` for a failed NDIF call (see :data:`REASONS`)."""
    status = _http_status(err)
    if status is not None:
        code, detail = status
        if code in (401, 403):
            return "api-key-rejected", (
                f"NDIF rejected the API key (HTTP {code}: {detail}); get a valid key at "
                f"{LOGIN_URL} and pass api_key=..., or set NDIF_API_KEY"
            )
        if code >= 500:
            return "service-error", (
                f"NDIF at {host} answered HTTP {code} ({detail}); the service is down or busy, "
                "try again later"
            )
        return "request-rejected", f"NDIF rejected the request (HTTP {code}): {detail}"
    job_error = next((e for e in _causes(err) if isinstance(e, RemoteError)), None)
    if job_error is not None and job_error.__cause__ is None:  # the job ran and failed
        report = str(job_error)
        message = _server_message(report)
        if re.search(r"longer than timeout|timed out", report, re.IGNORECASE):
            return "timeout", f"the job hit the server's time limit ({message})"
        return "failed", f"the job failed on the server: {message}"
    cause = _unreachable(err)
    if cause is not None:
        return "unreachable", _unreachable_message(host, cause)
    return "failed", _one_line(job_error or err)


# ---- checks before the first request -------------------------------------------------------


def hub_repo(model: Any) -> str:
    """The Hugging Face id the model was built from (raises if it was built otherwise)."""
    repo = getattr(model, "repo_id", None) or getattr(model._module.config, "_name_or_path", "")
    if not repo or os.path.isdir(str(repo)):
        raise RemoteSetupError(
            f"remote=True needs a model built from its Hugging Face id (got {repo!r}); use "
            "load_model('org/name', remote=True)",
            "not-a-hub-model",
        )
    return str(repo)


def running_models(status: Mapping[str, Any]) -> list[str]:
    """Repo ids RUNNING in a raw NDIF ``/status`` answer, sorted."""
    ids = {
        str(d.get("repo_id") or name)
        for name, d in status.get("deployments", {}).items()
        if d.get("application_state") == "RUNNING"
    }
    return sorted(ids)


def _same_repo(repo: str, deployed: str) -> bool:
    """Case-insensitive match; an id without an org matches any org (``gpt2``)."""
    repo, deployed = repo.lower(), deployed.lower()
    return repo == deployed or ("/" not in repo and deployed.endswith("/" + repo))


def _fetch_status(host: str) -> dict:
    """NDIF's raw ``/status`` (``nnsight.ndif._get``), failures as :class:`RemoteSetupError`."""
    from nnsight import ndif

    try:
        return ndif._get("/status")
    except Exception as err:
        reason, message = _classify(err, host)
        if reason not in ("unreachable", "service-error"):
            reason, message = "service-error", f"NDIF status check failed: {_one_line(err)}"
        raise RemoteSetupError(message, reason) from None


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def version_mismatches(remote_env: Mapping[str, Any]) -> list[str]:
    """Differences that matter between this process and NDIF's ``/env`` answer.

    Python and torch: major.minor; transformers and nnsight: the exact version (module paths
    and the request format follow them).
    """
    from importlib.metadata import PackageNotFoundError, version

    found = []
    local_py = _minor(sys.version.split()[0])
    remote_words = str(remote_env.get("python_version", "")).split()
    remote_py = _minor(remote_words[0]) if remote_words else None
    if remote_py and local_py != remote_py:
        found.append(f"Python {local_py} here, {remote_py} on NDIF")
    packages = remote_env.get("packages", {})
    for name in _VERSIONED_PACKAGES:
        if name not in packages:
            continue
        try:
            local = version(name)
        except PackageNotFoundError:
            local = "not installed"
        remote = str(packages[name])
        differs = _minor(local) != _minor(remote) if name == "torch" else local != remote
        if differs:
            found.append(f"{name} {local} here, {remote} on NDIF")
    return found


_versions_checked: set[str] = set()


def warn_on_version_mismatch(host: str) -> None:
    """Compare versions with NDIF's (``nnsight.ndif.get_remote_env``) once per host."""
    from nnsight import ndif

    if host in _versions_checked:
        return
    _versions_checked.add(host)
    try:
        remote_env = ndif.get_remote_env()
    except Exception as err:
        warnings.warn(
            f"could not compare versions with NDIF at {host} ({_one_line(err)}); "
            "run nnsight.compare() to check them",
            RemoteVersionWarning,
            stacklevel=3,
        )
        return
    found = version_mismatches(remote_env)
    if found:
        warnings.warn(
            "local and NDIF versions differ: "
            + "; ".join(found)
            + " — requests may be rejected or results differ; install the server's versions "
            "(nnsight.compare() lists them)",
            RemoteVersionWarning,
            stacklevel=3,
        )


def check_remote(model: Any, remote: Remote, api_key: str | None = None) -> str | None:
    """Fail early, with the fix, when ``remote=True`` cannot work; returns the API key.

    Order: key, Hub id, service reachable, model deployed, versions (a warning only).
    Other ``remote`` settings need none of this and return ``None``.
    """
    if remote is not True:
        return None
    key = resolve_api_key(api_key)
    if not key:
        raise RemoteSetupError(
            f"remote=True needs an NDIF API key: get one at {LOGIN_URL}, then pass api_key=..., "
            "or `export NDIF_API_KEY=...`, or set nnsight.CONFIG.API.APIKEY; to test the "
            "request offline use remote='local'",
            "no-api-key",
        )
    repo = hub_repo(model)
    host = ndif_host()
    running = running_models(_fetch_status(host))
    if not any(_same_repo(repo, deployed) for deployed in running):
        listed = ", ".join(running) if running else "none"
        raise RemoteSetupError(
            f"model {repo!r} is not deployed on NDIF ({host}); running now: {listed} — load "
            "one of those with load_model(ID, remote=True)",
            "model-not-deployed",
        )
    warn_on_version_mismatch(host)
    return key


# ---- request sizes -------------------------------------------------------------------------


class Transfers:
    """Per request of :func:`run_chunks`: payload and result bytes (as sent) and seconds.

    ``result_bytes`` is ``None`` for a ``remote="local"`` dry run (no result is sent).
    """

    def __init__(self) -> None:
        self.payload_bytes: list[int] = []
        self.result_bytes: list[int | None] = []
        self.seconds: list[float] = []

    def __len__(self) -> int:
        return len(self.seconds)


_recorders: list[Transfers] = []


@contextmanager
def record_transfers() -> Iterator[Transfers]:
    """Record the size of every request :func:`run_chunks` makes inside the block."""
    log = Transfers()
    _recorders.append(log)
    try:
        yield log
    finally:
        _recorders.remove(log)


class _SizeNotes:
    """What one session sent and received, filled in by the backends below."""

    def __init__(self) -> None:
        self.payload: int | None = None
        self.result: int | None = None


class NdifBackend(RemoteBackend):
    """nnsight's ``RemoteBackend`` that notes payload and result sizes of its request."""

    notes: _SizeNotes | None = None

    def _serialize(self, tracer: Any) -> bytes:
        blob = super()._serialize(tracer)
        if self.notes is not None:
            self.notes.payload = len(blob)
        return blob

    def finalize(self, content: bytes) -> Any:
        if self.notes is not None:
            self.notes.result = len(content)
        return super().finalize(content)


class _MeasuredLocalBackend(LocalSimulationBackend):
    """``remote="local"`` that also notes the (compressed) size the request would have."""

    notes: _SizeNotes | None = None

    def __call__(self, tracer: Any) -> None:
        from nnsight.ndif import pull_env
        from nnsight.schema.request import RequestModel

        if self.notes is not None:
            pull_env()
            self.notes.payload = len(RequestModel.serialize(tracer, compress=True))
        return super().__call__(tracer)


def _session_backend(model: Any, remote: Remote, api_key: str | None, model_key: str | None):
    """The backend of one session (one request), or ``None`` to run locally."""
    if not is_remote(remote):
        return None
    if remote is True:
        return NdifBackend(
            model_key, host=ndif_host(), api_key=api_key, env=model._remoteable_get_env()
        )
    if remote == "local":
        return _MeasuredLocalBackend(model)
    return remote


def _check_setting(remote: Remote) -> None:
    if isinstance(remote, str) and remote != "local":
        raise ValueError(
            f"unknown remote setting {remote!r}; use False, True, 'local' or a backend"
        )


def is_remote(remote: Remote) -> bool:
    return remote is not False and remote is not None


def ship_by_value() -> None:
    """Register ``atp_nnsight`` so nnsight pickles its code by value in remote requests.

    The request references the chunk body (``_atp_body``/``_patch_body``), the chunk's
    objects and the metric; pickled by reference they need ``atp_nnsight`` importable on the
    server, which NDIF does not provide. nnsight's automatic registration skips installed
    packages, and ``remote="local"`` cannot catch this (it keeps every module whose name
    contains ``"nnsight"``). Idempotent; affects only cloudpickle, not ``torch.save``.
    """
    import atp_nnsight

    nnsight.register(atp_nnsight)


# ---- fingerprints and checkpoints ----------------------------------------------------------


def _feed(h: Any, obj: Any, depth: int = 0) -> None:
    """Hash ``obj`` by content: tensors/arrays by bytes, dataclasses by fields, code by code."""
    if depth > 50:
        raise ValueError("object too deeply nested to fingerprint")
    d = depth + 1
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:{t.device.type};".encode())
        if t.device.type != "meta":
            h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif type(obj).__module__ == "numpy" and hasattr(obj, "tobytes"):
        h.update(f"ndarray:{obj.dtype}:{getattr(obj, 'shape', ())};".encode())
        h.update(obj.tobytes())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"dc:{type(obj).__module__}.{type(obj).__qualname__};".encode())
        for f in dataclasses.fields(obj):
            h.update(f.name.encode())
            _feed(h, getattr(obj, f.name), d)
    elif isinstance(obj, Mapping):
        h.update(b"map;")
        for k in sorted(obj, key=repr):
            _feed(h, k, d)
            _feed(h, obj[k], d)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}:{len(obj)};".encode())
        for x in obj:
            _feed(h, x, d)
    elif isinstance(obj, (set, frozenset)):
        h.update(f"set:{len(obj)};".encode())
        for x in sorted(obj, key=repr):
            _feed(h, x, d)
    elif isinstance(obj, functools.partial):
        h.update(b"partial;")
        _feed(h, (obj.func, obj.args, obj.keywords), d)
    elif isinstance(obj, types.CodeType):
        h.update(obj.co_code)
        h.update(repr(obj.co_names).encode())
        _feed(h, tuple(c for c in obj.co_consts), d)
    elif isinstance(obj, (types.FunctionType, types.MethodType)):
        func = getattr(obj, "__func__", obj)
        h.update(f"fn:{func.__module__}.{func.__qualname__};".encode())
        _feed(h, func.__code__, d)
        _feed(h, (func.__defaults__, func.__kwdefaults__), d)
        for cell in func.__closure__ or ():
            try:
                _feed(h, cell.cell_contents, d)
            except ValueError:  # empty cell
                h.update(b"empty-cell;")
        if obj is not func:
            _feed(h, obj.__self__, d)
    elif isinstance(obj, (type, types.BuiltinFunctionType, types.ModuleType)):
        name = obj.__qualname__ if isinstance(obj, type) else obj.__name__
        h.update(f"ref:{getattr(obj, '__module__', '')}.{name};".encode())
    elif hasattr(obj, "__dict__"):
        h.update(f"obj:{type(obj).__module__}.{type(obj).__qualname__};".encode())
        _feed(h, vars(obj), d)
    elif hasattr(obj, "__slots__"):
        h.update(f"obj:{type(obj).__module__}.{type(obj).__qualname__};".encode())
        for name in obj.__slots__:
            h.update(name.encode())
            _feed(h, getattr(obj, name, None), d)
    else:
        h.update(f"{type(obj).__qualname__}:{obj!r};".encode())


def run_fingerprint(model: Any, chunks: Sequence[Any], body: Callable, desc: str) -> str:
    """A content hash of one :func:`run_chunks` call: model identity, body and all chunks.

    The model enters through its config and a small sample of its first and last parameters
    (skipped for weights on the meta device), not a hash of every weight.
    """
    h = hashlib.sha256()
    module = getattr(model, "_module", model)
    config = getattr(module, "config", None)
    h.update(repr(getattr(model, "repo_id", None)).encode())
    if config is not None:
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=repr).encode())
    params = list(module.parameters()) if isinstance(module, torch.nn.Module) else []
    for p in params[:1] + params[-1:]:
        _feed(h, p.detach().reshape(-1)[:256])
    _feed(h, body)
    h.update(desc.encode())
    _feed(h, list(chunks))
    return h.hexdigest()


def _check_folder(folder: Path, fingerprint: str) -> None:
    """Refuse a checkpoint folder that holds chunks of a different run."""
    manifest = folder / "run.json"
    if manifest.exists():
        stored = json.loads(manifest.read_text()).get("fingerprint")
        if stored == fingerprint:
            return
        raise ValueError(
            f"checkpoint_dir {folder} holds the chunks of a different run (other model, "
            "pairs, nodes, method or settings); use another checkpoint_dir or delete it"
        )
    if any(folder.glob("chunk_*.pt")):
        raise ValueError(
            f"checkpoint_dir {folder} holds chunk files without a run.json fingerprint; "
            "their run cannot be verified — use another checkpoint_dir or delete them"
        )


def default_checkpoint_dir(key: str) -> Path:
    """``<cache>/runs/<key>``; the cache is ``$ATP_NNSIGHT_CACHE`` or the user cache folder."""
    from platformdirs import user_cache_dir

    root = os.environ.get("ATP_NNSIGHT_CACHE") or user_cache_dir("atp_nnsight")
    return Path(root) / "runs" / key


# ---- running chunks ------------------------------------------------------------------------


def _run_session(model: Any, body: Callable, chunk: Any, backend: Any, grad: bool) -> Any:
    """One session, i.e. one request: ``body(model, chunk)``, saved.

    The session block reads only ``nnsight``, ``body``, ``model`` and ``chunk``, and this
    frame holds nothing else by those names, so nothing of an earlier chunk (its result, say)
    travels with the request — nnsight ships every name the block reads.
    """
    kwargs = {} if backend is None else {"backend": backend}
    with torch.set_grad_enabled(grad):
        with model.session(**kwargs):
            out = nnsight.save(body(model, chunk))
    return out


def _model_key(model: Any) -> str:
    try:
        return model.to_model_key()
    except Exception as err:
        raise RemoteSetupError(
            f"could not build the NDIF model key of {hub_repo(model)!r} ({_one_line(err)}); "
            "the client needs the Hugging Face Hub for the model's config: check the network "
            "and the id",
            "not-a-hub-model",
        ) from None


def _chunk_error(
    err: Exception, desc: str, i: int, n: int, folder: Path | None, host: str | None
) -> ChunkFailedError:
    """A :class:`ChunkFailedError` naming the chunk, the reason and what was kept."""
    kept = (
        f"; {i} finished chunk(s) are saved in {folder} and rerunning the same call resumes "
        "from them"
        if folder is not None and i
        else ""
    )
    if host is None:  # local run or dry run: the error is this process's own
        reason, message = "failed", _one_line(err)
    else:
        reason, message = _classify(err, host)
    if reason == "timeout":
        message += "; use fewer pairs per chunk (pairs_per_chunk) or fewer nodes per request"
    return ChunkFailedError(
        f"{desc or 'run'}: chunk {i + 1}/{n} failed: {message}{kept}", folder, i, reason
    )


def run_chunks(
    model: Any,
    chunks: Sequence[Any],
    body: Callable[[Any, Any], Any],
    *,
    remote: Remote = False,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "",
    grad: bool = True,
    api_key: str | None = None,
) -> list[Any]:
    """Run ``body(model, chunk)`` for every chunk, each inside one nnsight session.

    ``body`` returns (nested lists/dicts of) reduced CPU tensors. With ``checkpoint_dir`` each
    finished chunk is stored as ``chunk_<i>.pt`` and reused when present; runs on NDIF
    (``remote=True``) checkpoint by default under the cache folder, named by the run's
    fingerprint, so rerunning a failed call resumes it. ``grad=False`` runs local sessions
    without autograd (remote servers decide for themselves). ``api_key`` is used only for
    ``remote=True`` (see the module docstring for where else the key may come from).
    """
    _check_setting(remote)
    key = check_remote(model, remote, api_key)
    if is_remote(remote):
        ship_by_value()
    host = ndif_host() if remote is True else getattr(remote, "host", None)
    model_key = _model_key(model) if remote is True else None
    fingerprint = None
    if checkpoint_dir is None and remote is True:
        fingerprint = run_fingerprint(model, chunks, body, desc)
        checkpoint_dir = default_checkpoint_dir(fingerprint[:24])
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        fingerprint = fingerprint or run_fingerprint(model, chunks, body, desc)
        if folder.exists():
            _check_folder(folder, fingerprint)
    results: list[Any] = []
    bar = tqdm(total=len(chunks), desc=desc, disable=not progress or len(chunks) <= 1, leave=False)
    for i, chunk in enumerate(chunks):
        path = folder / f"chunk_{i:05d}.pt" if folder is not None else None
        if path is not None and path.exists():
            results.append(torch.load(path, weights_only=False))
            bar.update()
            continue
        backend = _session_backend(model, remote, key, model_key)
        notes = _SizeNotes()
        if _recorders and isinstance(backend, (NdifBackend, _MeasuredLocalBackend)):
            backend.notes = notes
        start = time.perf_counter()
        try:
            out = _run_session(model, body, chunk, backend, grad)
        except Exception as err:
            raise _chunk_error(err, desc, i, len(chunks), folder, host) from err
        for log in _recorders:
            if notes.payload is not None:
                log.payload_bytes.append(notes.payload)
                log.result_bytes.append(notes.result)
                log.seconds.append(time.perf_counter() - start)
        if path is not None:
            folder.mkdir(parents=True, exist_ok=True)
            manifest = folder / "run.json"
            if not manifest.exists():
                manifest.write_text(json.dumps({"fingerprint": fingerprint, "desc": desc}))
            tmp = path.with_suffix(".tmp")
            torch.save(out, tmp)
            tmp.replace(path)
        results.append(out)
        bar.update()
    bar.close()
    return results
