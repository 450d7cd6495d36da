"""On a CUDA machine: the bundled model split between ``cuda:0`` and the CPU gives the results of
the single-device (CPU) model, and a bf16 run on the GPU ranks nodes as fp32 does. Skipped
without CUDA; ``benchmarks/gpu_check.py`` runs these (``pytest -m cuda``).

Two ways of splitting, as users do it:

* ``split`` — accelerate's ``dispatch_model`` with ``main_device="cpu"``: the first half of the
  layers (with the embeddings and the tied LM head) *computes* on ``cuda:0`` and the second half
  on the CPU, so activations and gradients cross devices twice per pass.
* ``offload`` — ``load_model(device_map=...)`` with ``"cpu"`` entries: transformers/accelerate
  keep those weights on the CPU and stream them to ``cuda:0`` to compute.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from atp_nnsight import attribute, ioi_pairs, keep_correct, load_model, patch
from atp_nnsight.models.loading import ensure_bundled_cache

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU = 0
"""The GPU in accelerate's ``device_map`` notation."""
KINDS = "head,q,k,v,neuron"
N_PAIRS = 4
SPLITS = ("split", "offload")


@pytest.fixture(scope="module", autouse=True)
def full_fp32_matmuls():
    """No TF32: fp32 on the GPU then differs from the CPU by summation order only."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@functools.cache
def single_device():
    """The bundled model on the CPU in fp32: the reference."""
    return load_model()


@functools.cache
def pairs() -> list:
    model = single_device()
    return keep_correct(model, ioi_pairs(3 * N_PAIRS, tokenizer=model.tokenizer))[:N_PAIRS]


def device_map(n_layers: int) -> dict[str, int | str]:
    """Embeddings, tied LM head and the first half of the layers on the GPU, the rest on CPU."""
    layers = {f"model.layers.{i}": GPU if i < n_layers // 2 else "cpu" for i in range(n_layers)}
    return {
        "model.embed_tokens": GPU,
        "lm_head": GPU,  # tied to the embeddings (as device_map="auto" keeps it)
        **layers,
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
    }


@functools.cache
def split_model(how: str):
    n_layers = single_device()._module.config.num_hidden_layers
    if how == "offload":
        return load_model(device_map=device_map(n_layers))
    from accelerate import dispatch_model
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ensure_bundled_cache(), dtype=torch.float32)
    hf = dispatch_model(hf, device_map=device_map(n_layers), main_device="cpu")
    hf.eval()
    hf.requires_grad_(False)
    return TransformersModel(hf, tokenizer=single_device().tokenizer)


def assert_close_fp32(gpu: np.ndarray, cpu: np.ndarray) -> None:
    """Same math in fp32, other kernels: agree to 1e-3 of the largest value."""
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-3 * float(np.abs(cpu).max()))


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(np.float64)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


@functools.cache
def single_attribution(method: str):
    return attribute(single_device(), pairs(), KINDS, method=method, progress=False)


@pytest.mark.parametrize("how", SPLITS)
def test_the_split_computes_on_both_devices(how):
    """Guards the other tests: the layers really run where the device map says."""
    m = split_model(how)
    with m.trace(pairs()[0].clean):
        first = str(m.model.layers[0].output.device)
        last = str(m.model.layers[len(m.model.layers) - 1].output.device)
        first, last = first.save(), last.save()
    assert first == "cuda:0"
    assert last == ("cpu" if how == "split" else "cuda:0")


@pytest.mark.parametrize("method", ["atp", "atp*"])
@pytest.mark.parametrize("how", SPLITS)
def test_attribute_matches_single_device(how, method):
    split = attribute(split_model(how), pairs(), KINDS, method=method, progress=False)
    reference = single_attribution(method)
    assert_close_fp32(split.per_pair, reference.per_pair)
    assert_close_fp32(
        np.asarray(split.metadata["base_metric"]), np.asarray(reference.metadata["base_metric"])
    )


@functools.cache
def boundary_layers() -> tuple[int, ...]:
    """The first and last layers, and the two where the split changes device."""
    n = single_device()._module.config.num_hidden_layers
    return (0, n // 2 - 1, n // 2, n - 1)


@pytest.mark.parametrize("how", SPLITS)
def test_patch_matches_single_device(how):
    layers = list(boundary_layers())
    split = patch(split_model(how), pairs(), "head,resid", layers=layers, progress=False)
    reference = patch(single_device(), pairs(), "head,resid", layers=layers, progress=False)
    assert_close_fp32(split.per_pair, reference.per_pair)


@pytest.mark.parametrize("method", ["atp", "atp*"])
def test_bf16_on_cuda_ranks_like_fp32(method):
    """bf16 keeps ~3 digits: finite scores, same ranking (on CPU, bf16 vs fp32 gave Spearman
    >= 0.997 per kind and the same top 20)."""
    m = load_model(dtype="bf16", device_map=GPU)
    result = attribute(m, pairs(), KINDS, method=method, progress=False)
    reference = single_attribution(method)
    assert np.isfinite(result.per_pair).all()
    for kind in KINDS.split(","):
        rows = (reference.nodes["kind"] == kind).to_numpy()
        assert spearman(result.scores[rows], reference.scores[rows]) > 0.95, kind
    top = 20
    overlap = set(np.argsort(-result.scores)[:top]) & set(np.argsort(-reference.scores)[:top])
    assert len(overlap) >= 15
