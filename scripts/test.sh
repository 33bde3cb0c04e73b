#!/usr/bin/env bash
# Runs the test suite, setting up (and building the runtime) first when needed.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
