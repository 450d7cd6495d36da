#!/usr/bin/env bash
# A second Python minor version (3.12, the public NDIF server's) with torch, nnsight and
# transformers at this environment's versions, for tests/test_cross_python.py: a request made
# here must load and run there. Uses pyenv's or the system's python3.12; packages come from PyPI
# (torch's Linux wheel there is the CUDA build: about 5 GB with its libraries, runs on the CPU).
# Usage: bash scripts/second_python.sh [ENV_DIR]   (default: the path the test looks at)
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-${ATP_NNSIGHT_SECOND_PYTHON_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/atp_nnsight/python3.12}}"
python312="$(command -v python3.12 || true)"
if [ -z "$python312" ] && command -v pyenv >/dev/null; then
    python312="$(pyenv root)/versions/$(pyenv versions --bare | grep -E '^3\.12(\.|$)' | tail -1)/bin/python"
fi
if [ -z "$python312" ] || [ ! -x "$python312" ]; then
    echo "no Python 3.12 found (python3.12 on PATH, or pyenv); nothing installed" >&2
    exit 1
fi
versions="$(python -c 'from importlib.metadata import version as v; print(" ".join(f"{p}=={v(p)}".split("+")[0] for p in ("torch", "nnsight", "transformers", "zstandard")))')"
"$python312" -m venv "$target"
"$target/bin/python" -m pip install -q $versions
"$target/bin/python" -c 'import sys, torch, nnsight, transformers; print(sys.version.split()[0], torch.__version__, nnsight.__version__, transformers.__version__)'
echo "second Python ready: $target/bin/python"
