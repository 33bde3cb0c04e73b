#!/usr/bin/env bash
# On the GPU box, after `device_run.sh build` and /tmp/smollm2.gguf joined (run through
# `device_run.sh 'cmd:bash benchmarks/results/n-kv-hold-gpu/check.sh'`, which sets up the
# environment): the first replies at budget 512 against full, three ways side by side,
# SmolLM2 2K, test split, 3 dialogues a task: the runtime as built (n_kv held in one-token
# ubatches only), the hold off (LOOPSERVE_N_KV_HOLD=0), and CUDA graphs off.
set -u
A="--ctx 2K --turns 2 --cases-per-task ${CHECK_CASES:-3} --tasks all --split test --levels benchmarks/results/calibration/smollm2-135m.json
   --budgets 512 --methods full,loopserve-d64,loopserve-d64-head --n-gpu-layers -1 --flash-attn --threads 1 --no-plots"
python3 -m loopserve_edge.cli bench /tmp/smollm2.gguf $A --out /tmp/hold-default > /tmp/hold-default.log 2>&1 &
LOOPSERVE_N_KV_HOLD=0 python3 -m loopserve_edge.cli bench /tmp/smollm2.gguf $A --out /tmp/hold-off > /tmp/hold-off.log 2>&1 &
GGML_CUDA_DISABLE_GRAPHS=1 python3 -m loopserve_edge.cli bench /tmp/smollm2.gguf $A --out /tmp/hold-nographs > /tmp/hold-nographs.log 2>&1 &
wait
for d in default off nographs; do
  tail -2 /tmp/hold-$d.log
  python3 benchmarks/results/fa-reference-cpu/turns.py /tmp/hold-$d/runs.jsonl
  cp /tmp/hold-$d/runs.jsonl "$OUT/runs-$d.jsonl"; cp /tmp/hold-$d/summary.md "$OUT/summary-$d.md"
done
