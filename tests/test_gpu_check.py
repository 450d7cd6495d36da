"""``benchmarks/gpu_check.py`` stays runnable: without CUDA it skips the GPU parts, says so, and
runs its benchmark code on a tiny CPU model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path even on a GPU machine
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "CUDA is not available: skipping the CUDA tests (pytest -m cuda)" in out
    for run in ("plain 2F+1B", "atp", "plain 2F+L*B", "atp*"):
        assert f"\n{run} " in out
    assert "ratio atp / plain 2F+1B:" in out and "ratio atp* / plain 2F+L*B:" in out
