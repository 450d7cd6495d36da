"""A request made on this Python loads and runs on another minor version (NDIF runs 3.12).

The second interpreter is ``$ATP_NNSIGHT_SECOND_PYTHON`` or the environment
``scripts/second_python.sh`` builds (``<cache>/atp_nnsight/python3.12``); without one the test
is skipped. The request is serialized here exactly as for NDIF, run by
``cross_python_server.py`` in the other interpreter against the same weights (fp32, frozen), and
the result compared with a local run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from remote_setup import PAIRS, SEED

from atp_nnsight.methods.atp import attribute
from atp_nnsight.methods.exact import patch
from atp_nnsight.models.tiny import tiny_hf_model, tiny_model, tiny_tokenizer
from atp_nnsight.remote import NdifBackend

SERVER_SCRIPT = Path(__file__).with_name("cross_python_server.py")
TOLERANCE = 1e-4
"""Same torch version, other build (the PyPI wheel): CPU kernels may round differently."""


def second_python() -> str | None:
    """Path of a usable interpreter of another minor version, or ``None``."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    default = cache / "atp_nnsight" / "python3.12" / "bin" / "python"
    candidate = os.environ.get("ATP_NNSIGHT_SECOND_PYTHON") or str(default)
    if not Path(candidate).exists():
        return None
    probe = subprocess.run(
        [
            candidate,
            "-c",
            "import sys, torch, nnsight, transformers, zstandard; print(sys.version_info[1])",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0 or int(probe.stdout.split()[-1]) == sys.version_info[1]:
        return None
    return candidate


PYTHON = second_python()
pytestmark = pytest.mark.skipif(
    PYTHON is None,
    reason="no second Python minor version with torch/nnsight/transformers: run "
    "scripts/second_python.sh (about 5 GB from PyPI) or set ATP_NNSIGHT_SECOND_PYTHON",
)


class OtherPythonBackend(NdifBackend):
    """Sends each request to ``cross_python_server.py`` in the other interpreter."""

    def __init__(self, python: str, model_dir: Path, work: Path):
        super().__init__("other-python:model", host="http://127.0.0.1:9")
        self.display.enabled = False
        self.python, self.model_dir, self.work = python, model_dir, work
        self.requests = 0

    def request(self, request: Any, tracer: Any) -> Any:
        self.requests += 1
        blob_path = self.work / f"request_{self.requests}.bin"
        result_path = self.work / f"result_{self.requests}.bin"
        blob_path.write_bytes(self._serialize(tracer))
        done = subprocess.run(
            [
                self.python,
                str(SERVER_SCRIPT),
                str(self.model_dir),
                str(blob_path),
                str(result_path),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        tail = "\n".join(done.stderr.strip().splitlines()[-6:])
        assert done.returncode == 0, f"the request failed on the other Python:\n{tail}"
        return self.finalize(result_path.read_bytes())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    model_dir = tmp_path_factory.mktemp("server_model")
    tiny_hf_model("llama", seed=SEED).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    return tiny_model("llama", seed=SEED), model_dir, tmp_path_factory.mktemp("requests")


@pytest.mark.parametrize("method", ["exact", "atp*"])
def test_request_runs_on_another_python(served: tuple[Any, Path, Path], method: str):
    client, model_dir, work = served
    kinds = ["head", "q", "k", "neuron"]
    backend = OtherPythonBackend(PYTHON, model_dir, work)

    def run(remote: Any) -> Any:
        if method == "exact":
            return patch(client, PAIRS, kinds, remote=remote, progress=False)
        return attribute(client, PAIRS, kinds, method=method, remote=remote, progress=False)

    remote = run(backend)
    local = run(False)
    assert backend.requests >= 1
    assert np.abs(local.per_pair).max() > 1e-2
    np.testing.assert_allclose(remote.per_pair, local.per_pair, rtol=0, atol=TOLERANCE)
