"""Peak memory of one call on the CPU, measured in this process: live heap bytes sampled by a
thread (used by the memory benchmark and by the test of :mod:`atp_nnsight.plan`).

The measure is glibc's ``mallinfo2`` (bytes in use: heap chunks + mmapped chunks), which
torch's CPU allocator goes through: unlike the resident set size it is not inflated by memory
the allocator keeps after a free, and unlike ``ru_maxrss`` it can be measured after a warm-up.
Run with ``MALLOC_ARENA_MAX=1`` (see :data:`ENV`) so every thread allocates from the arena
``mallinfo2`` reports. The *activation peak* of a call is its peak minus the value before it.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from typing import Any

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


def live_bytes() -> int:
    """Bytes currently allocated through malloc (heap in use + mmapped chunks); glibc only."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def peak_during(fn: Callable[[], Any], interval: float = 0.0005) -> tuple[Any, int, int, float]:
    """Run ``fn``; return ``(result, live bytes before, peak live bytes during, seconds)``."""
    before = live_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], live_bytes())
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    return result, before, max(peak[0], live_bytes()), seconds
