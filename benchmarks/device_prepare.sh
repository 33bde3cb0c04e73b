#!/usr/bin/env bash
# Fills .carry/ (git-ignored) with what a run on the GPU box needs and cannot download:
# the slim runtime source, wheels the box lacks (click: for `loopserve-edge bench`),
# SmolLM2's tokenizer (a vocab-only GGUF, the 92 MB model itself does not fit the 64 MB
# carry limit) and the benchmark's data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p .carry/whl .carry/data/lost-in-the-middle
$PY scripts/build_runtime.py --write-slim .carry/slim.tar.gz
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .carry/whl \
    diskcache==5.6.3 platformdirs==4.14.7 gguf==0.19.0 click==8.5.1
# the servers of the serve-load step (ours and llama-cpp-python's), which the box lacks
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .carry/whl \
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic_core==2.50.5 \
    annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 sse-starlette==3.7.0 \
    starlette-context==0.5.1 pydantic-settings==2.16.3 python-dotenv==1.2.4 opentelemetry-api==1.45.2
$PY - <<'PY'
import gguf
from loopserve_edge.paths import default_model
from loopserve_edge.random_gguf import _copy_tokenizer
w = gguf.GGUFWriter(".carry/smollm2-tokenizer.gguf", "llama")
_copy_tokenizer(w, default_model())
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
PY
cp ../shared/data/lost-in-the-middle/nq-open-oracle.jsonl.gz \
   ../shared/data/lost-in-the-middle/kv-retrieval-75_keys.jsonl.gz .carry/data/lost-in-the-middle/
du -sh .carry
