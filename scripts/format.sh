#!/usr/bin/env bash
# Formats csrc/ (our C/C++) with llama.cpp's own .clang-format, as the pinned sdist has it
# (build/src, unpacked by scripts/build_runtime.py), with the clang-format that setup.sh pins.
# tests/test_sources.py checks the result. cuda/ keeps ggml-cuda's hand layout.
set -euo pipefail
cd "$(dirname "$0")/.."
style=build/src/vendor/llama.cpp/.clang-format
[ -f "$style" ] || { echo "format.sh: no $style; run ./scripts/setup.sh first" >&2; exit 1; }
exe=.venv/bin/clang-format; [ -x "$exe" ] || exe=clang-format
find csrc -name '*.c' -o -name '*.cpp' -o -name '*.h' | xargs "$exe" --style=file:"$style" -i
