"""Peak memory of one call on the CPU, measured in this process: live heap bytes read after
every aten op and by a sampling thread (used by the memory benchmarks and by the test of
:mod:`atp_nnsight.plan`).

The measure is glibc's ``mallinfo2`` (bytes in use: heap chunks + mmapped chunks), which
torch's CPU allocator goes through: unlike the resident set size it is not inflated by memory
the allocator keeps after a free, and unlike ``ru_maxrss`` it can be measured after a warm-up.
Run with ``MALLOC_ARENA_MAX=1`` (see :data:`ENV`) so every thread allocates from the arena
``mallinfo2`` reports. The *activation peak* of a call is its peak minus the value before it.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

ENV = {"MALLOC_ARENA_MAX": "1"}
"""Environment for measuring subprocesses: one malloc arena."""


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2]:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2


def live_bytes() -> int:
    """Bytes currently allocated through malloc (heap in use + mmapped chunks); glibc only."""
    info = _mallinfo2()()
    return int(info.uordblks + info.hblkhd)


class _PeakAfterEachOp(TorchDispatchMode):
    """Records live bytes after every aten op on this thread (forward and backward): peaks that
    last less than the sampler's interval are not missed on a busy machine."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, live_bytes())
        return out


def peak_during(
    fn: Callable[[], Any], interval: float = 0.0005, per_op: bool = True
) -> tuple[Any, int, int, float]:
    """Run ``fn``; return ``(result, live bytes before, peak live bytes during, seconds)``.

    The peak is the larger of a sampling thread's (every ``interval`` seconds; sees memory
    held inside an op) and, with ``per_op``, the value after every aten op (deterministic;
    a few µs per op, so leave it off when ``seconds`` is the measurement)."""
    before = live_bytes()
    peak = [before]
    done = threading.Event()
    after_op = _PeakAfterEachOp() if per_op else None

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], live_bytes())
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        if after_op is None:
            result = fn()
        else:
            with after_op:
                result = fn()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    op_peak = after_op.peak if after_op is not None else 0
    return result, before, max(peak[0], op_peak, live_bytes()), seconds
