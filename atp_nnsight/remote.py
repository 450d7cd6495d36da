"""Running method bodies locally or on NDIF, one nnsight session per chunk of pairs.

Methods never special-case remote execution: each chunk's work is a plain function of
``(model, chunk)`` that opens nnsight traces, reduces per-node values inside them and returns
saved tensors. :func:`run_chunks` runs that function inside ``model.session(...)`` with the
backend chosen by ``remote``:

* ``False`` — local execution (the session is a plain in-process block);
* ``"local"`` — nnsight's serialize/deserialize dry run of a remote request, executed locally;
* ``True`` — NDIF (needs an API key and a model deployed there);
* an nnsight backend object — used as given (tests use an in-process emulated server).

With ``checkpoint_dir`` finished chunks are written there; a failed run keeps them, and
rerunning the same call resumes from them instead of recomputing. The folder records a
fingerprint of its run (``run.json``), so a different call pointed at it fails instead of
silently reusing the other run's chunks.

NDIF does not have ``atp_nnsight`` installed, and nnsight ships by value only modules that are
*not* installed (``nnsight.ndif.pull_env``); so every remote run registers ``atp_nnsight`` for
pickling by value (:func:`ship_by_value`), otherwise the server cannot unpickle the chunk
bodies (``ModuleNotFoundError: No module named 'atp_nnsight'``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nnsight
import torch
from tqdm.auto import tqdm

Remote = bool | str | Any


class RemoteSetupError(RuntimeError):
    """Remote execution cannot start (no API key, model not deployed, ...)."""


class ChunkFailedError(RuntimeError):
    """One chunk of a run failed; finished chunks are kept in ``checkpoint_dir``."""

    def __init__(self, message: str, checkpoint_dir: Path | None, done: int):
        super().__init__(message)
        self.checkpoint_dir = checkpoint_dir
        self.done = done


def is_remote(remote: Remote) -> bool:
    return remote is not False and remote is not None


def session_kwargs(remote: Remote) -> dict[str, Any]:
    """Keyword arguments of ``model.session`` for a ``remote`` setting."""
    if not is_remote(remote):
        return {}
    if remote is True or remote == "local":
        return {"remote": remote}
    if isinstance(remote, str):
        raise ValueError(
            f"unknown remote setting {remote!r}; use False, True, 'local' or a backend"
        )
    return {"backend": remote}


def check_remote(model: Any, remote: Remote) -> None:
    """Fail early, with instructions, when ``remote=True`` cannot work."""
    if remote is not True:
        return
    from nnsight import CONFIG

    if not (os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY):
        raise RemoteSetupError(
            "remote=True needs an NDIF API key: get one at https://login.ndif.us and set it with "
            "`export NDIF_API_KEY=...` (or `nnsight.CONFIG.set_default_api_key(key)`); to test "
            "the request offline use remote='local'"
        )
    repo = getattr(model, "repo_id", None) or getattr(model._module.config, "_name_or_path", "")
    if not repo or os.path.isdir(str(repo)):
        raise RemoteSetupError(
            f"remote=True needs a model built from its Hugging Face id (got {repo!r}); use "
            "load_model('org/name', remote=True)"
        )
    try:
        running = nnsight.is_model_running(repo)
    except Exception as err:  # network or service errors: report, do not guess
        raise RemoteSetupError(f"could not reach NDIF to check {repo!r}: {err}") from None
    if not running:
        raise RemoteSetupError(
            f"model {repo!r} is not running on NDIF; see nnsight.status() for deployed models"
        )


def ship_by_value() -> None:
    """Register ``atp_nnsight`` so nnsight pickles its code by value in remote requests.

    The request references the chunk body (``_atp_body``/``_patch_body``) and the chunk's
    dataclasses and metric; pickled by reference they need ``atp_nnsight`` importable on the
    server, which NDIF does not provide. nnsight's automatic registration skips installed
    packages, and ``remote="local"`` cannot catch this (it keeps every module whose name
    contains ``"nnsight"``). Idempotent; affects only cloudpickle, not ``torch.save``.
    """
    import atp_nnsight

    nnsight.register(atp_nnsight)


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
) -> list[Any]:
    """Run ``body(model, chunk)`` for every chunk, each inside one nnsight session.

    ``body`` returns (nested lists/dicts of) reduced CPU tensors. With ``checkpoint_dir`` each
    finished chunk is stored as ``chunk_<i>.pt`` and reused when present; runs on NDIF
    (``remote=True``) checkpoint by default under the cache folder, named by the run's
    fingerprint, so rerunning a failed call resumes it. ``grad=False`` runs local sessions
    without autograd (remote servers decide for themselves).
    """
    check_remote(model, remote)
    kwargs = session_kwargs(remote)
    if is_remote(remote):
        ship_by_value()
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
        try:
            with torch.set_grad_enabled(grad):
                with model.session(**kwargs):
                    out = body(model, chunk)
                    out = nnsight.save(out)
        except Exception as err:
            where = (
                f"; {i} finished chunk(s) are kept in {folder} and rerunning the same call "
                "resumes from them"
                if folder is not None and i
                else ""
            )
            raise ChunkFailedError(
                f"{desc or 'run'}: chunk {i + 1}/{len(chunks)} failed: "
                f"{type(err).__name__}: {err}{where}",
                folder,
                i,
            ) from err
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
