"""Running method bodies locally or on NDIF, one nnsight session per chunk of pairs.

Methods never special-case remote execution: each chunk's work is a plain function of
``(model, chunk)`` that opens nnsight traces, reduces per-node values inside them and returns
saved tensors. :func:`run_chunks` runs that function inside ``model.session(...)`` with the
backend chosen by ``remote``:

* ``False`` — local execution (the session is a plain in-process block);
* ``"local"`` — nnsight's serialize/deserialize dry run of a remote request, executed locally;
* ``True`` — NDIF (needs an API key and a model deployed there);
* an nnsight backend object — used as given (tests use an in-process emulated server).

Finished chunks are written to a checkpoint directory (by default for remote runs); a failed
run keeps them, and rerunning the same call resumes from them instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
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


def run_key(**parts: Any) -> str:
    """A stable hash of a run's inputs (tensors by content), naming its checkpoint folder."""
    h = hashlib.sha256()
    for name in sorted(parts):
        value = parts[name]
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(value, sort_keys=True, default=repr).encode())
    return h.hexdigest()[:20]


def default_checkpoint_dir(key: str) -> Path:
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
) -> list[Any]:
    """Run ``body(model, chunk)`` for every chunk, each inside one nnsight session.

    ``body`` returns (nested lists/dicts of) reduced CPU tensors. With ``checkpoint_dir`` each
    finished chunk is stored as ``chunk_<i>.pt`` and reused when present.
    """
    check_remote(model, remote)
    kwargs = session_kwargs(remote)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    results: list[Any] = []
    bar = tqdm(total=len(chunks), desc=desc, disable=not progress or len(chunks) <= 1, leave=False)
    for i, chunk in enumerate(chunks):
        path = folder / f"chunk_{i:05d}.pt" if folder is not None else None
        if path is not None and path.exists():
            results.append(torch.load(path, weights_only=False))
            bar.update()
            continue
        try:
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
            tmp = path.with_suffix(".tmp")
            torch.save(out, tmp)
            tmp.replace(path)
        results.append(out)
        bar.update()
    bar.close()
    return results
