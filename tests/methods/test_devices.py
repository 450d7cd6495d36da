"""Device safety without a GPU: every method runs under a virtual 2- and 3-device split of tiny
models (``tests/device_check.py``) without an op that mixes devices, and gives the results it
gives unsplit. First, the checker itself: it must catch what CUDA would reject and pass what
CUDA accepts."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch_reference as ref  # noqa: E402
from device_check import (  # noqa: E402
    DeviceMixingError,
    VirtualDevices,
    layer_devices,
    placement,
    split_model,
)

from atp_nnsight import attribute, patch, patch_sets  # noqa: E402
from atp_nnsight.evaluation import diagnose, verify  # noqa: E402
from atp_nnsight.methods import baselines  # noqa: E402
from atp_nnsight.methods.atp import METHODS  # noqa: E402
from atp_nnsight.models import get_adapter  # noqa: E402
from atp_nnsight.models.tiny import tiny_model  # noqa: E402
from atp_nnsight.types import Node  # noqa: E402

FAMILIES = ("llama", "gpt2", "gpt_neox")
SPLITS = (2, 3)
ALIGNED_SPLITS = [(2, "accelerate"), (3, "accelerate"), (3, "torch")]
"""``(devices, align)``: how ``.input`` sees moved tensors differs (``split_model``)."""
ALIGNED_IDS = ["2dev", "3dev", "3dev-torch-hooks"]
N_LAYERS = 4
KINDS = ["resid", "q", "k", "v", "head", "attn_out", "neuron", "mlp_out"]
PER_POSITION_KINDS = ["resid", "k", "head"]  # for exact patching (one forward per node)
BASELINE_KINDS = ["head", "k", "mlp_out"]
SUMMED_LENGTHS = (6, 5, 6)
PER_POSITION_LENGTHS = (5, 5)
IDS = torch.tensor([[3, 14, 15, 92, 65, 35]])


@functools.cache
def model(family: str):
    return tiny_model(family, n_layers=N_LAYERS, seed=11)


def pairs(family: str, per_position: bool = False) -> list[tuple[str, ...]]:
    lengths = PER_POSITION_LENGTHS if per_position else SUMMED_LENGTHS
    return ref.word_pairs(200 + FAMILIES.index(family), lengths)


def layers(family: str):
    return get_adapter(model(family)).layers(model(family))


def assert_same(split: np.ndarray, single: np.ndarray) -> None:
    """Virtual devices are all the CPU: splitting changes nothing but float32 rounding (the
    last position's logits are a row slice whose memory layout the split's hooks may change)."""
    np.testing.assert_allclose(split, single, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the checker
# ---------------------------------------------------------------------------------------------


def test_layer_devices_are_contiguous_and_balanced():
    assert layer_devices(4, 2) == [0, 0, 1, 1]
    assert layer_devices(4, 3) == [0, 0, 1, 2]
    assert layer_devices(3, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot split 2 layers over 3"):
        layer_devices(2, 3)


def test_placement_follows_device_map_auto():
    hf = model("llama")._module
    assert [(type(m).__name__, device) for m, device in placement(hf, 3)] == [
        ("Embedding", 0),
        ("LlamaDecoderLayer", 0),
        ("LlamaDecoderLayer", 0),
        ("LlamaDecoderLayer", 1),
        ("LlamaDecoderLayer", 2),
        ("LlamaRMSNorm", 2),
        ("LlamaRotaryEmbedding", 2),
        ("Linear", 2),
    ]


@pytest.mark.parametrize(("n_devices", "align"), ALIGNED_SPLITS, ids=ALIGNED_IDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_plain_forward_is_clean_and_placed_as_accelerate_places_it(family, n_devices, align):
    """No false positive on the model itself. With accelerate's hook, as for a model really
    dispatched by accelerate, ``.input`` is what the caller passed (the hook moves it inside
    nnsight's controller); with torch hooks it is already moved."""
    m = model(family)
    with m.trace(IDS):
        single = m.output.logits.save()
    with split_model(m, n_devices, align=align) as vd:
        with m.trace(IDS):
            seen = []
            for block in layers(family):
                seen.append((str(block.input.device), str(block.output.device)))
            seen = seen.save()
            logits = m.output.logits.save()
    assert vd.clean
    where = layer_devices(N_LAYERS, n_devices)
    before = [where[max(i - 1, 0)] for i in range(N_LAYERS)] if align == "accelerate" else where
    assert seen == [(f"cpu:{b}", f"cpu:{d}") for b, d in zip(before, where, strict=True)]
    # the root hook returns the outputs to the input's device (after nnsight sees them, with
    # torch hooks: then they are where the LM head is, tied to the embeddings in GPT-2)
    head = vd.tag(m._module.get_output_embeddings().weight)
    assert head == (0 if family == "gpt2" else n_devices - 1)
    assert vd.tag(logits) == (0 if align == "accelerate" else head)
    assert torch.equal(logits, single)


def test_mixing_op_in_trace_body_is_caught_and_moved_version_passes():
    """The trace body runs in a greenlet of the same thread, under the same mode."""
    m = model("llama")
    with pytest.raises(DeviceMixingError) as caught:
        with split_model(m, 2):
            with m.trace(IDS):
                first, last = layers("llama")[0].output, layers("llama")[3].output
                torch.cat([first, last]).save()
    report = str(caught.value)
    assert "cat: tensors on cpu:0 and cpu:1" in report
    assert f"tests/methods/{Path(__file__).name}:" in report  # the line that did it
    with split_model(m, 2) as vd:
        with m.trace(IDS):
            first, last = layers("llama")[0].output, layers("llama")[3].output
            joined = torch.cat([first.to(last.device), last]).save()
    assert vd.clean and vd.tag(joined) == 1


def test_graddrop_style_hand_off_of_gradients_is_caught_and_moved_version_passes():
    """The gradient at layer 3's input (device 1) fed to the backward from layer 2's input
    (still on device 0 when layer 2 reads it): the GradDrop hand-off of issue 8."""
    m = model("llama")

    def run(move: bool) -> VirtualDevices:
        with split_model(m, 2, strict=False) as vd:
            with m.trace(IDS):
                emb = layers("llama")[0].input
                emb.requires_grad_(True)
                pre_2, pre_3 = layers("llama")[2].input, layers("llama")[3].input
                metric = m.output.logits[0, -1, 7] - m.output.logits[0, -1, 3]
                g_3, g_2 = torch.autograd.grad(metric, [pre_3, pre_2], retain_graph=True)
                devices = [str(g_3.device), str(g_2.device)]
                g_out = g_3.to(pre_2.device) if move else g_3
                (g_emb,) = torch.autograd.grad(pre_2, emb, grad_outputs=g_out)
                devices.append(str(g_emb.device))
                devices = devices.save()
        assert devices == ["cpu:1", "cpu:0", "cpu:0"]  # gradients sit where their tensors do
        return vd

    wrong = run(move=False)
    assert "torch.autograd.grad: gradient [0] on cpu:1 for an output on cpu:0" in wrong.report()
    assert run(move=True).clean


def test_backward_block_and_hooks_run_under_the_mode():
    """``with metric.backward():`` reads gradients through hooks inside the C++ backward."""
    m = model("llama")
    with split_model(m, 2, strict=False) as vd:
        with m.trace(IDS):
            emb = layers("llama")[0].input
            emb.requires_grad_(True)
            h_1, h_3 = layers("llama")[1].output, layers("llama")[3].output
            metric = m.output.logits[0, -1, 7]
            with metric.backward():
                g_3 = h_3.grad
                g_1 = h_1.grad
                devices = [str(g_3.device), str(g_1.device)]
                (g_3.sum(-1) + g_1.sum(-1)).save()
                devices = devices.save()
    assert devices == ["cpu:1", "cpu:0"]
    assert [v.op for v in vd.violations.values()] == ["add"]


def test_forward_without_alignment_hooks_is_caught():
    """Without accelerate's hooks the model's own forward mixes devices: the mode sees it."""
    with pytest.raises(DeviceMixingError, match=r"transformers/models/llama/modeling_llama"):
        with split_model(model("llama"), 2, align=None):
            with model("llama").trace(IDS):
                model("llama").output.logits.save()


def test_rules_mirror_what_cuda_accepts():
    with VirtualDevices() as vd:
        a = vd.place(torch.arange(6.0), 0)
        b = vd.place(torch.arange(6.0), 1)
        cpu = torch.ones(6)
        idx = torch.tensor([0, 2])
        # accepted
        assert vd.tag(a * torch.tensor(2.0)) == 0  # a CPU scalar mixes with anything
        assert vd.tag(a[idx]) == 0  # CPU index tensors are moved
        a[idx] = torch.tensor(5.0)  # 0-dim value
        a[1:3] = cpu[:2]  # slice assignment copies across devices
        a.copy_(cpu)
        moved = b.to(a.device)
        assert vd.tag(moved) == 0 and vd.tag(b) == 1 and moved is not b
        assert b.to(b.device) is b and b.to(torch.float64).device == torch.device("cpu", 1)
        assert vd.tag(b.cpu()) is None and b.cpu().numpy().shape == (6,)
        assert vd.tag(torch.zeros(2, device=b.device)) == 1 and vd.tag(torch.zeros(2)) is None
        assert vd.tag(torch.zeros_like(b)) == 1 and b.get_device() == 1
        assert vd.tag(cpu.type_as(b)) == 1 and vd.tag(b.type_as(a)) == 0
        assert vd.clean
        # rejected
        _ = a + b
        _ = a + cpu
        _ = cpu + b.sum()  # a scalar on a GPU does not mix with a CPU tensor
        _ = cpu[idx.to(b.device)]  # a GPU index into a CPU tensor
        a[idx] = cpu[:2]  # advanced-index assignment needs the value on a's device
        _ = torch.cat([a, cpu])
        _ = b.numpy()
    ops = [(v.op, v.detail) for v in vd.violations.values()]
    assert ops == [
        ("add", "tensors on cpu:0 and cpu:1"),
        ("add", "tensors on cpu and cpu:0"),
        ("add", "tensors on cpu and cpu:1"),
        ("__getitem__", "index on cpu:1 for a tensor on cpu"),
        ("__setitem__", "value on cpu for a tensor on cpu:0"),
        ("cat", "tensors on cpu and cpu:0"),
        ("numpy", "a tensor on cpu:1 (needs .cpu() first)"),
    ]


def test_plain_backward_grads_and_hooks_are_placed_and_checked():
    with VirtualDevices() as vd:
        leaf = vd.place(torch.ones(3, requires_grad=True), 1)
        mid = leaf * 2
        seen = []
        mid.register_hook(lambda g: seen.append(vd.tag(g)))
        mid.register_hook(lambda g: g.cpu())  # a gradient moved off its tensor's device
        (mid.sum() * 3).backward()
        assert seen == [1] and vd.tag(leaf.grad) == 1
        assert vd.tag(torch.autograd.grad((leaf * 2).sum(), leaf)[0]) == 1
        # a move's gradient is a copy on each device, never one tensor for both
        moved = leaf.to(torch.device("cpu", 0))
        g_leaf, g_moved = torch.autograd.grad((moved * 2).sum(), [leaf, moved])
        assert (vd.tag(g_leaf), vd.tag(g_moved)) == (1, 0) and g_leaf is not g_moved
    assert [(v.op, v.detail) for v in vd.violations.values()] == [
        ("gradient hook", "returned a gradient on cpu for a tensor on cpu:1")
    ]


# ---------------------------------------------------------------------------------------------
# every method under a virtual split equals the single-device run
# ---------------------------------------------------------------------------------------------


@functools.cache
def single_attribution(family: str, method: str, per_position: bool):
    return attribute(
        model(family),
        pairs(family, per_position),
        KINDS,
        method=method,
        per_position=per_position,
        progress=False,
    )


@pytest.mark.parametrize("per_position", [False, True], ids=["summed", "per_position"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("n_devices", "align"), ALIGNED_SPLITS, ids=ALIGNED_IDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_attribute(family, n_devices, align, method, per_position):
    single = single_attribution(family, method, per_position)
    with split_model(model(family), n_devices, align=align):
        split = attribute(
            model(family),
            pairs(family, per_position),
            KINDS,
            method=method,
            per_position=per_position,
            progress=False,
        )
    assert_same(split.per_pair, single.per_pair)
    assert_same(split.scores, single.scores)


@functools.cache
def single_patch(family: str, per_position: bool):
    kinds = PER_POSITION_KINDS if per_position else KINDS
    return patch(
        model(family), pairs(family, per_position), kinds, per_position=per_position, progress=False
    )


@pytest.mark.parametrize("per_position", [False, True], ids=["summed", "per_position"])
@pytest.mark.parametrize("n_devices", SPLITS)
@pytest.mark.parametrize("family", FAMILIES)
def test_patch(family, n_devices, per_position):
    kinds = PER_POSITION_KINDS if per_position else KINDS
    with split_model(model(family), n_devices):
        split = patch(
            model(family),
            pairs(family, per_position),
            kinds,
            per_position=per_position,
            progress=False,
        )
    assert_same(split.per_pair, single_patch(family, per_position).per_pair)


SETS = [
    [Node("head", 0, 1), Node("neuron", 3, 5, 2)],  # one set across devices
    [Node("resid", 2), Node("k", 1, 1, 4), Node("mlp_out", 3)],
    [Node("q", 3, 0, 1), Node("v", 2, 1), Node("attn_out", 0)],
]


@pytest.mark.parametrize("n_devices", SPLITS)
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_sets(family, n_devices):
    single, _ = patch_sets(model(family), pairs(family), SETS, progress=False)
    with split_model(model(family), n_devices):
        split, _ = patch_sets(model(family), pairs(family), SETS, progress=False)
    assert_same(split, single)


BASELINES = {
    "subsampling": (baselines.subsampling, {"n_subsets": 8, "p": 0.2}),
    "blocks": (baselines.blocks, {"block_size": 6}),
    "hierarchical": (baselines.hierarchical, {"budget": 12}),
    "brute_force": (baselines.brute_force, {}),
}


@functools.cache
def single_baseline(family: str, name: str):
    fn, options = BASELINES[name]
    return fn(model(family), pairs(family), BASELINE_KINDS, progress=False, **options)


@pytest.mark.parametrize("name", list(BASELINES))
@pytest.mark.parametrize("n_devices", SPLITS)
@pytest.mark.parametrize("family", FAMILIES)
def test_baseline(family, n_devices, name):
    fn, options = BASELINES[name]
    with split_model(model(family), n_devices):
        split = fn(model(family), pairs(family), BASELINE_KINDS, progress=False, **options)
    single = single_baseline(family, name)
    assert_same(split.scores, single.scores)
    assert_same(split.per_pair, single.per_pair)


@pytest.mark.parametrize("n_devices", SPLITS)
@pytest.mark.parametrize("family", FAMILIES)
def test_verify(family, n_devices):
    result = single_attribution(family, "atp*", False)
    single = verify(model(family), None, result, budget=6, progress=False)
    with split_model(model(family), n_devices):
        split = verify(model(family), None, result, budget=6, progress=False)
    assert split.metadata["verified"]["order"] == single.metadata["verified"]["order"]
    assert_same(
        np.array(split.metadata["verified"]["per_pair"]),
        np.array(single.metadata["verified"]["per_pair"]),
    )


@functools.cache
def single_diagnosis(family: str):
    result = single_attribution(family, "atp*", False)
    return diagnose(model(family), None, result, verified=4, n_subsets=6, progress=False)


@pytest.mark.parametrize("n_devices", SPLITS)
@pytest.mark.parametrize("family", FAMILIES)
def test_diagnose(family, n_devices):
    """AtP* results are unsigned, so this also runs AtP+QK for the prediction."""
    result = single_attribution(family, "atp*", False)
    with split_model(model(family), n_devices):
        split = diagnose(model(family), None, result, verified=4, n_subsets=6, progress=False)
    single = single_diagnosis(family)
    assert split.metadata["estimate_source"].startswith("computed")
    assert_same(split.subset_per_pair, single.subset_per_pair)
    assert_same(split.nodes["estimate"].to_numpy(), single.nodes["estimate"].to_numpy())
    assert split.bound == pytest.approx(single.bound, rel=1e-5, abs=1e-6)
