"""A CPU stand-in for a model split over several GPUs: finds every op that would mix devices.

A model dispatched with accelerate (``device_map="auto"``, also how NDIF loads models) has its
decoder layers on several devices, and any op combining tensors of two of them fails on CUDA.
On a CPU-only machine nothing fails, so this module makes those ops visible:

* :class:`VirtualDevices` is a ``TorchFunctionMode`` that tags tensors with a *virtual device*
  ``i`` (shown as ``torch.device("cpu", i)``; untagged tensors are the real CPU). It sees every
  torch call made in its thread, which includes the nnsight trace body: nnsight runs it in a
  greenlet of the same thread, and torch keeps the mode stack per thread.

  - ``t.device`` reports ``cpu:i``; ``t.to(cpu:i)`` tags the result ``i`` (a copy, or ``t``
    itself when it is already there); ``t.cpu()`` / ``t.to("cpu")`` untag; factory calls with
    ``device=cpu:i`` tag ``i``; ``t.type_as(u)`` moves to ``u``'s device (as on CUDA).
  - Any other op must get all its tensors from one device, as on CUDA; the output inherits it.
    Exceptions mirror PyTorch: untagged 0-dim CPU tensors mix with anything; indexing takes
    index tensors on the real CPU or on the indexed tensor's device
    (``check_indices_on_cpu_or_selfdevice``); advanced-index assignment takes indices from
    anywhere and values from the same device or 0-dim (``_index_put_impl_``); slice
    assignment and ``copy_`` copy across devices; ``.numpy()`` needs the real CPU.
  - Autograd runs in C++ where no mode sees it, so ``torch.autograd.grad``, ``backward`` and
    ``Tensor.backward`` are re-run here with the mode kept active (backward hooks, which
    nnsight's ``.grad`` uses, stay checked): a ``grad_outputs`` entry must be on its output's
    device (0-dim excepted, as autograd moves those; an output or input given as a
    ``GradientEdge`` has the device of the tensor it was taken from, recorded in its autograd
    node's ``metadata``); returned gradients, hook gradients and
    ``.grad`` get their tensor's device; a hook that returns a gradient on another device is
    flagged.

* :func:`split_model` places an nnsight-wrapped model: decoder layer ``ℓ`` on
  :func:`layer_devices` ``[ℓ]``, modules built before the layers (embeddings) on the first
  device, modules after them (final norm, rotary embedding, LM head) on the last, tied weights
  where their first owner is — as accelerate's ``device_map="auto"`` does. Each placed module
  gets accelerate's own ``AlignDevicesHook`` (and the root one with ``io_same_device``), by
  default as ``_hf_hook``, which nnsight 0.8 applies inside its module controller exactly as
  for a really dispatched model: as in production, a module's ``.input`` is what its caller
  passed (``layers[ℓ].input`` is still on layer ``ℓ-1``'s device) and the forward sees the
  moved tensors. ``align="torch"`` attaches the same hook as torch forward (pre-)hooks, which
  run before nnsight sees the input (``layers[ℓ].input`` already on layer ``ℓ``'s device):
  device-safe code must pass under both.

Violations are recorded (op, devices, the innermost frames of this project) and reported by
:meth:`VirtualDevices.report`; :func:`split_model` raises :class:`DeviceMixingError` on exit.

Limits: only ops that reach Python in the calling thread are seen (not custom C++/CUDA
kernels, ``torch.compile`` or other threads); tensors created by deserialisation or from numpy
are the real CPU; gradients of ``is_grads_batched`` calls are not re-run under the mode (their
results are placed on their inputs' devices, unchecked inside); a
module placed on one device is assumed to hold all its parameters there.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nnsight  # noqa: F401  (patches Tensor.backward; both versions are handled)
import torch
from accelerate.hooks import AlignDevicesHook
from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
from torch.autograd.graph import GradientEdge, _engine_run_backward
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

Tag = int | None
"""A virtual device index; ``None`` is the real CPU."""

_NODE_KEY = "virtual_device"
"""Key of a tensor's tag in its autograd node's ``metadata`` (read for ``GradientEdge``s)."""

_HERE = str(Path(__file__).resolve())
_ROOT = str(Path(__file__).resolve().parents[1]) + "/"
_SKIPPED_PATHS = ("/torch/", "/greenlet/", "/nnsight/", "/accelerate/", "/contextlib.py")
_ORIGINAL_TENSOR_BACKWARD = getattr(torch.Tensor.backward, "__wrapped__", torch.Tensor.backward)
_GRAD_SIGNATURE = inspect.signature(torch.autograd.grad)
_BACKWARD_SIGNATURE = inspect.signature(torch.autograd.backward)
_TENSOR_BACKWARD_SIGNATURE = inspect.signature(_ORIGINAL_TENSOR_BACKWARD)


def device_name(tag: Tag) -> str:
    return "cpu" if tag is None else f"cpu:{tag}"


@dataclass
class Violation:
    """One kind of device-mixing op, at one place in the code."""

    op: str
    detail: str
    frames: tuple[str, ...]
    count: int = 1

    def describe(self) -> str:
        where = "\n".join(f"        {f}" for f in self.frames) or "        (no Python frame)"
        times = f" (x{self.count})" if self.count > 1 else ""
        return f"    {self.op}: {self.detail}{times}\n{where}"


class DeviceMixingError(AssertionError):
    """Ops that would fail on a model split over several devices."""


class VirtualDevices(TorchFunctionMode):
    """The torch function mode that tags tensors with virtual devices (module docstring).

    ``project`` names the package whose frames a violation report shows first.
    """

    def __init__(self, project: str = "atp_nnsight", n_frames: int = 4) -> None:
        super().__init__()
        self.project = project
        self.n_frames = n_frames
        self.tags = WeakTensorKeyDictionary()
        self.violations: dict[tuple, Violation] = {}
        self._special: dict[Any, Callable[[Any, tuple, dict], Any]] = {
            torch.Tensor.device.__get__: self._device,
            torch.Tensor.get_device: self._get_device,
            torch.Tensor.to: self._to,
            torch.Tensor.cpu: self._cpu,
            torch.Tensor.type_as: self._type_as,
            torch.Tensor.copy_: self._copy,
            torch.Tensor.__getitem__: self._index,
            torch.Tensor.__setitem__: self._setitem,
            torch.Tensor.index_put_: self._index_put,
            torch.Tensor.index_put: self._index_put,
            torch.index_put: self._index_put,
            torch.Tensor.numpy: self._numpy,
            torch.Tensor.__array__: self._numpy,
            torch.Tensor.grad.__get__: self._grad_attribute,
            torch.Tensor.register_hook: self._register_hook,
            torch.autograd.grad: self._autograd_grad,
            torch.autograd.backward: self._autograd_backward,
            _ORIGINAL_TENSOR_BACKWARD: self._tensor_backward,
            torch.Tensor.backward: self._tensor_backward,  # nnsight's patch of it
        }

    # ---- tags -------------------------------------------------------------------------------
    def place(self, tensor: torch.Tensor, tag: Tag) -> torch.Tensor:
        """Put ``tensor`` on virtual device ``tag`` (``None``: the real CPU), in place."""
        if tag is None:
            self.tags.pop(tensor, None)
        else:
            self._set(tensor, tag)
        return tensor

    def _set(self, tensor: torch.Tensor, tag: Tag) -> None:
        """Tag ``tensor``, and its autograd node, so a ``GradientEdge`` to it has a device."""
        self.tags[tensor] = tag
        if tensor.grad_fn is not None:
            tensor.grad_fn.metadata[_NODE_KEY] = tag

    def tag_of(self, x: Any) -> Tag:
        """The tag of a tensor, or of the tensor a ``GradientEdge`` leads to."""
        if isinstance(x, GradientEdge):
            return x.node.metadata.get(_NODE_KEY)
        return self.tags.get(x)

    def tag(self, tensor: torch.Tensor) -> Tag:
        return self.tags.get(tensor)

    @property
    def clean(self) -> bool:
        return not self.violations

    def report(self) -> str:
        """All violations, readable; empty when there are none."""
        if not self.violations:
            return ""
        lines = [f"{len(self.violations)} device-mixing op(s) found:"]
        lines += [v.describe() for v in self.violations.values()]
        return "\n".join(lines)

    def assert_clean(self) -> None:
        if self.violations:
            raise DeviceMixingError(self.report())

    # ---- recording --------------------------------------------------------------------------
    def _frames(self) -> tuple[str, ...]:
        """The innermost frames of the project (else of any non-library code), short form."""
        ours, others = [], []
        frame = sys._getframe(1)
        while frame is not None:
            path = frame.f_code.co_filename
            if path != _HERE and not any(p in path for p in _SKIPPED_PATHS):
                text = f"{_short(path)}:{frame.f_lineno} in {frame.f_code.co_name}"
                (ours if f"/{self.project}/" in path else others).append(text)
            frame = frame.f_back
        return tuple((ours or others)[: self.n_frames])

    def _violation(self, op: str, detail: str) -> None:
        frames = self._frames()
        key = (op, detail, frames)
        if key in self.violations:
            self.violations[key].count += 1
        else:
            self.violations[key] = Violation(op, detail, frames)

    # ---- the mode ---------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        special = self._special.get(func)
        if special is not None:
            return special(func, args, kwargs)
        return self._default(func, args, kwargs)

    def _default(self, func: Any, args: tuple, kwargs: dict) -> Any:
        target = _device_argument(kwargs)
        if target is not None:  # factories and conversions: the result goes where it's asked
            return self._tag_all(func(*args, **kwargs), target[0])
        tags = self._tensor_tags((args, kwargs))
        tag = self._common(_name(func), tags)
        return self._tag_all(func(*args, **kwargs), tag)

    def _tensor_tags(self, tree: Any) -> list[tuple[Tag, bool]]:
        """``(tag, is an untagged 0-dim tensor)`` of every tensor in ``tree``."""
        out = []
        for leaf in tree_flatten(tree)[0]:
            if isinstance(leaf, torch.Tensor):
                tag = self.tags.get(leaf)
                out.append((tag, tag is None and leaf.dim() == 0))
        return out

    def _common(self, op: str, tags: list[tuple[Tag, bool]]) -> Tag:
        """The one device of ``tags`` (CPU scalars aside); records a violation if several."""
        devices = sorted({t for t, scalar in tags if not scalar}, key=lambda t: (t is not None, t))
        if len(devices) > 1:
            self._violation(op, "tensors on " + " and ".join(device_name(t) for t in devices))
        if devices:
            return devices[-1]
        return next((t for t, _ in tags if t is not None), None)

    def _tag_all(self, out: Any, tag: Tag) -> Any:
        if tag is not None:
            for leaf in tree_flatten(out)[0]:
                if isinstance(leaf, torch.Tensor):
                    self._set(leaf, tag)
        return out

    # ---- devices and moves ----------------------------------------------------------------
    def _device(self, func: Any, args: tuple, kwargs: dict) -> torch.device:
        tag = self.tags.get(args[0])
        return func(*args, **kwargs) if tag is None else torch.device("cpu", tag)

    def _get_device(self, func: Any, args: tuple, kwargs: dict) -> int:
        tag = self.tags.get(args[0])
        return func(*args, **kwargs) if tag is None else tag

    def _move(self, src: torch.Tensor, out: torch.Tensor, target: Tag) -> torch.Tensor:
        """``out`` (the real op's result) on ``target``; across devices always a copy."""
        source = self.tags.get(src)
        if source != target:
            out = _Move.apply(out, self, source)
        return self.place(out, target)

    def _to(self, func: Any, args: tuple, kwargs: dict) -> Any:
        src = args[0]
        copy = kwargs.get("copy", False)
        options = {k: v for k, v in kwargs.items() if k != "copy"}
        if args[1:] and isinstance(args[1], torch.Tensor):  # t.to(other): other's device
            other = args[1]
            target, dtype = (self.tags.get(other),), other.dtype
            non_blocking = args[2] if args[2:] else options.get("non_blocking", False)
            memory_format = torch.preserve_format
        else:
            device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(
                *args[1:], **options
            )
            if device is not None and device.type != "cpu":
                raise NotImplementedError(f"virtual devices are CPU only, got .to({device})")
            target = None if device is None else (device.index,)
        if target is None:  # dtype or layout only
            return self._tag_all(func(*args, **kwargs), self.tags.get(src))
        out = func(
            src,
            device=torch.device("cpu"),
            dtype=dtype or src.dtype,
            non_blocking=non_blocking,
            copy=copy,
            memory_format=memory_format or torch.preserve_format,
        )
        return self._move(src, out, target[0])

    def _cpu(self, func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        return self._move(args[0], func(*args, **kwargs), None)

    def _type_as(self, func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        return self._move(args[0], func(*args, **kwargs), self.tags.get(args[1]))

    def _copy(self, func: Any, args: tuple, kwargs: dict) -> Any:
        return func(*args, **kwargs)  # copies across devices; the destination keeps its tag

    def _numpy(self, func: Any, args: tuple, kwargs: dict) -> Any:
        tag = self.tags.get(args[0])
        if tag is not None:
            self._violation(_name(func), f"a tensor on {device_name(tag)} (needs .cpu() first)")
        return func(*args, **kwargs)

    # ---- indexing ---------------------------------------------------------------------------
    def _check_indices(self, op: str, tag: Tag, index: Any) -> None:
        for t, _ in self._tensor_tags(index):
            if t is not None and t != tag:
                self._violation(op, f"index on {device_name(t)} for a tensor on {device_name(tag)}")

    def _check_value(self, op: str, tag: Tag, value: Any) -> None:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            t = self.tags.get(value)
            if t != tag:
                self._violation(op, f"value on {device_name(t)} for a tensor on {device_name(tag)}")

    def _index(self, func: Any, args: tuple, kwargs: dict) -> Any:
        tag = self.tags.get(args[0])
        self._check_indices(_name(func), tag, (args[1:], kwargs))
        return self._tag_all(func(*args, **kwargs), tag)

    def _setitem(self, func: Any, args: tuple, kwargs: dict) -> Any:
        self_, index, value = args
        tags = self._tensor_tags(index)
        if tags:  # advanced indexing: index_put_ (indices are moved, values are not)
            self._check_value("__setitem__", self.tags.get(self_), value)
        return func(*args, **kwargs)

    def _index_put(self, func: Any, args: tuple, kwargs: dict) -> Any:
        bound = dict(zip(("self", "indices", "values"), args, strict=False)) | kwargs
        tag = self.tags.get(bound["self"])
        self._check_value(_name(func), tag, bound.get("values"))
        return self._tag_all(func(*args, **kwargs), tag)

    # ---- autograd ---------------------------------------------------------------------------
    def _grad_attribute(self, func: Any, args: tuple, kwargs: dict) -> Any:
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and self.tags.get(out) is None:
            self.place(out, self.tags.get(args[0]))
        return out

    def _register_hook(self, func: Any, args: tuple, kwargs: dict) -> Any:
        tensor, hook = args[0], args[1]
        tag = self.tags.get(tensor)

        def placed_hook(grad: torch.Tensor) -> Any:
            self.place(grad, tag)
            out = hook(grad)
            if isinstance(out, torch.Tensor) and out.dim() > 0 and self.tags.get(out) != tag:
                self._violation(
                    "gradient hook",
                    f"returned a gradient on {device_name(self.tags.get(out))} for a tensor "
                    f"on {device_name(tag)}",
                )
            return out

        return func(tensor, placed_hook, *args[2:], **kwargs)

    def _check_grad_outputs(self, op: str, outputs: tuple, grads: tuple) -> None:
        for i, (out, g) in enumerate(zip(outputs, grads, strict=True)):
            if isinstance(out, torch.Tensor | GradientEdge) and isinstance(g, torch.Tensor):
                if g.dim() == 0:
                    continue
                t_out, t_g = self.tag_of(out), self.tags.get(g)
                if t_out != t_g:
                    self._violation(
                        op,
                        f"gradient [{i}] on {device_name(t_g)} for an output on "
                        f"{device_name(t_out)}",
                    )

    def _run_engine(
        self,
        outputs: tuple,
        grads: tuple,
        retain: bool,
        create: bool,
        inputs: tuple,
        allow_unused: bool,
        accumulate: bool,
    ) -> tuple:
        """The C++ engine, with this mode pushed again so that backward hooks are checked."""
        with self:
            grads = _make_grads(outputs, grads, is_grads_batched=False)
            return _engine_run_backward(
                outputs, grads, retain, create, inputs, allow_unused, accumulate_grad=accumulate
            )

    def _autograd_grad(self, func: Any, args: tuple, kwargs: dict) -> Any:
        a = _GRAD_SIGNATURE.bind(*args, **kwargs)
        a.apply_defaults()
        p = a.arguments
        if isinstance(p["inputs"], dict):
            return func(*args, **kwargs)  # not re-run under the mode (see Limits)
        if p["is_grads_batched"]:  # not re-run under the mode; results go to their inputs
            result = func(*args, **kwargs)
            inputs = _as_tuple(p["inputs"])
            return tuple(
                g if g is None else self.place(g, self.tag_of(inp))
                for g, inp in zip(result, inputs, strict=True)
            )
        outputs = _as_tuple(p["outputs"])
        inputs = _as_tuple(p["inputs"])
        grads = _tensor_or_tensors_to_tuple(p["grad_outputs"], len(outputs))
        self._check_grad_outputs("torch.autograd.grad", outputs, grads)
        allow_unused = p["allow_unused"]
        if allow_unused is None:
            allow_unused = p["materialize_grads"]
        retain = p["create_graph"] if p["retain_graph"] is None else p["retain_graph"]
        result = self._run_engine(
            outputs, grads, retain, p["create_graph"], inputs, allow_unused, accumulate=False
        )
        placed = []
        for g, inp in zip(result, inputs, strict=True):
            if g is None and p["materialize_grads"]:
                g = torch.zeros_like(inp, requires_grad=p["create_graph"])
            placed.append(g if g is None else self.place(g, self.tag_of(inp)))
        return tuple(placed)

    def _backward(self, tensors: Any, grads: Any, retain: Any, create: bool, inputs: Any) -> None:
        tensors = _as_tuple(tensors)
        grads = _tensor_or_tensors_to_tuple(grads, len(tensors))
        self._check_grad_outputs("backward", tensors, grads)
        retain = create if retain is None else retain
        inputs = () if inputs is None else _as_tuple(inputs)
        self._run_engine(tensors, grads, retain, create, inputs, True, accumulate=True)

    def _autograd_backward(self, func: Any, args: tuple, kwargs: dict) -> None:
        a = _BACKWARD_SIGNATURE.bind(*args, **kwargs)
        a.apply_defaults()
        p = a.arguments
        grads = p["grad_tensors"] if p["grad_tensors"] is not None else p["grad_variables"]
        self._backward(p["tensors"], grads, p["retain_graph"], p["create_graph"], p["inputs"])

    def _tensor_backward(self, func: Any, args: tuple, kwargs: dict) -> None:
        a = _TENSOR_BACKWARD_SIGNATURE.bind(*args, **kwargs)
        a.apply_defaults()
        p = a.arguments
        self._backward(p["self"], p["gradient"], p["retain_graph"], p["create_graph"], p["inputs"])


class _Move(torch.autograd.Function):
    """A copy to another virtual device whose gradient is a copy back on the source device, as
    autograd's backward of a real device move gives (never the same tensor on two devices)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mode: VirtualDevices, source: Tag) -> torch.Tensor:
        ctx.mode, ctx.source = mode, source
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.mode.place(grad.clone(), ctx.source), None, None


def _as_tuple(x: Any) -> tuple:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def _name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    owner = getattr(func, "__objclass__", None) or getattr(func, "__self__", None)
    if name == "__get__" and owner is not None:
        return f"Tensor.{getattr(owner, '__name__', owner)}"
    return name


def _short(path: str) -> str:
    """A path relative to the repository or to site-packages."""
    if path.startswith(_ROOT):
        return path[len(_ROOT) :]
    return path.split("/site-packages/", 1)[-1]


def _device_argument(kwargs: dict) -> tuple[Tag] | None:
    """``(tag,)`` when ``kwargs`` name a device (``device=``), else None."""
    device = kwargs.get("device")
    if device is None:
        return None
    device = torch.device(device)
    if device.type != "cpu":
        raise NotImplementedError(f"virtual devices are CPU only, got device={device}")
    return (device.index,)


# ---- placing a model --------------------------------------------------------------------------
def layer_devices(n_layers: int, n_devices: int) -> list[int]:
    """Contiguous, balanced placement of ``n_layers`` decoder layers on ``n_devices``."""
    if not 1 <= n_devices <= n_layers:
        raise ValueError(f"cannot split {n_layers} layers over {n_devices} devices")
    return [layer * n_devices // n_layers for layer in range(n_layers)]


def decoder_layers(root: torch.nn.Module, path: str | None = None) -> str:
    """Path of the decoder layers: ``path`` if given, else the longest ``ModuleList`` not inside
    another one (not, e.g., a layer's experts), the last of equally long ones (a multimodal
    model's language layers come after its vision tower)."""
    if path is not None:
        return path
    lists = [n for n, m in root.named_modules() if isinstance(m, torch.nn.ModuleList)]
    top = [n for n in lists if not any(n.startswith(f"{other}.") for other in lists)]
    if not top:
        raise ValueError(f"{type(root).__name__} has no ModuleList of decoder layers")
    return max(reversed(top), key=lambda n: len(root.get_submodule(n)))


def placement(
    root: torch.nn.Module, n_devices: int, layers_path: str | None = None
) -> list[tuple[torch.nn.Module, int]]:
    """``(module, device)`` units as ``device_map="auto"`` would place them (module docstring),
    in registration order; ``layers_path`` as in :func:`decoder_layers`."""
    name = decoder_layers(root, layers_path)
    layers = root.get_submodule(name)
    devices = layer_devices(len(layers), n_devices)
    units = [(layer, devices[i]) for i, layer in enumerate(layers)]
    parent = root
    for child_name in name.split("."):  # the siblings along the path to the layers
        before = True
        for n, child in parent.named_children():
            if n == child_name:
                before = False
            else:
                units.append((child, 0 if before else n_devices - 1))
        parent = parent.get_submodule(child_name)
    order = {id(m): i for i, m in enumerate(root.modules())}
    return sorted(units, key=lambda unit: order[id(unit[0])])


ALIGNMENTS = ("accelerate", "torch")
"""How :func:`split_model` moves a placed module's inputs to its device (module docstring)."""


@contextmanager
def split_model(
    model: Any,
    n_devices: int = 2,
    *,
    align: str | None = "accelerate",
    strict: bool = True,
    layers_path: str | None = None,
) -> Iterator[VirtualDevices]:
    """Run ``model`` (nnsight-wrapped or a plain ``nn.Module``) as if split over ``n_devices``.

    Yields the :class:`VirtualDevices` mode. On exit the placement is undone; with ``strict``
    a :class:`DeviceMixingError` listing every violation is raised (if the body raised, the
    report is attached to that exception as a note instead).

    ``align`` chooses how accelerate's ``AlignDevicesHook`` is attached: ``"accelerate"`` as
    ``_hf_hook``, which nnsight applies inside its module controller as for a dispatched model
    (``.input`` is what the caller passed); ``"torch"`` as torch forward (pre-)hooks, which run
    outside the controller (``.input`` is already on the module's device); ``None`` leaves
    them out (then the forward itself mixes devices: a check of the checker).
    ``layers_path`` names the decoder layers' ``ModuleList`` (default: :func:`decoder_layers`).
    """
    if align is not None and align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS} or None, got {align!r}")
    root = getattr(model, "_module", model)
    mode = VirtualDevices()
    undo: list[Callable[[], None]] = []
    for module, device in placement(root, n_devices, layers_path):
        tied = [mode.tag(p) for p in module.parameters() if mode.tag(p) is not None]
        device = tied[0] if tied else device
        for tensor in [*module.parameters(), *module.buffers()]:
            if mode.tag(tensor) is None:
                mode.place(tensor, device)
        if align is not None:
            undo.append(_attach(module, AlignDevicesHook(torch.device("cpu", device)), align))
    if align is not None:
        undo.append(_attach(root, AlignDevicesHook(io_same_device=True), align))
    try:
        with mode:
            yield mode
    except BaseException as error:
        if mode.violations:
            error.add_note(mode.report())
        raise
    finally:
        for remove in undo:
            remove()
    if strict:
        mode.assert_clean()


def _attach(module: torch.nn.Module, hook: AlignDevicesHook, align: str) -> Callable[[], None]:
    """Attach ``hook`` to ``module``; returns what removes it."""
    if "_hf_hook" in module.__dict__:
        raise ValueError(f"{type(module).__name__} is already dispatched by accelerate")
    if align == "accelerate":
        module._hf_hook = hook
        return lambda: delattr(module, "_hf_hook")
    handles = [
        module.register_forward_pre_hook(
            lambda m, args, kwargs: hook.pre_forward(m, *args, **kwargs), with_kwargs=True
        ),
        module.register_forward_hook(lambda m, args, output: hook.post_forward(m, output)),
    ]

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove
