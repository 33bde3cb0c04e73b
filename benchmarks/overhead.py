"""What the patched runtime costs when LoopServe's features are off: prefill and decode
through the patched build against llama-cpp-python 0.3.36 built from the same sdist without
our patches (issue 18), side by side in one run, the settings alternating, on the same tokens.

    python benchmarks/overhead.py --stock-python /tmp/stock-venv/bin/python \\
        [--tokens 2048] [--decode 128] [--repeats 5] [--threads 2]
    # the GPU box: the unpatched build in a folder (scripts/build_runtime.py --unpatched DIR)
    python benchmarks/overhead.py --stock-path /tmp/stock-site --n-gpu-layers -1 --flash-attn ...

Three settings, each run in a process of its own:
- `unpatched`: llama-cpp-python's `Llama` on the unpatched build (the environment of
  --stock-python: the sdist installed with the CMake options of scripts/build_runtime.py);
- `patched`: the same calls on the patched build (this environment);
- `patched, controller`: loopserve-edge's `Context.decode` with the default configuration
  (policy full, sparse prefill off): the controller's own path on top;
- with `--raw`, `patched, controller's context, bare steps`: the controller's context (its KV
  pool: `kv_unified`, `max_resident` sequences), prefilled through `Context.decode`, its decode
  steps as bare ctypes calls (batch, llama_decode, logits copied): the context's cost apart from
  the controller's Python.
The prompt is real passages (the benchmark's shared data), prefilled in one call (n_batch 2048,
n_ubatch 512, flash attention off: llama-cpp-python's default); then `--decode` steps of one
token each (the next tokens of the same text, so every setting decodes the same tokens, with no
sampling). Each process prefills once untimed at full size (buffers, kernels) and then
`--prefills` times, timed, the median kept. The table gives medians over `--repeats`, and each
repeat's ratio to the `unpatched` run made just before it (median and range over the repeats).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, statistics, sys, time
mode, model, tokens_file, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
extra, inner = json.loads(sys.argv[5]), int(sys.argv[6])
if mode.startswith("controller"):
    import loopserve_edge  # noqa: F401  (llama.cpp's library before numpy)
import llama_cpp
d = json.load(open(tokens_file))
prompt, follow = d["prompt"], d["follow"]
kw = dict(n_ctx=len(prompt) + len(follow) + 64, n_threads=threads, n_batch=2048, verbose=False, **extra)
if mode.startswith("controller"):
    from loopserve_edge import Llama, LoopServeConfig
    llm = Llama(model, loopserve=LoopServeConfig(max_resident=1), **kw)
    times = []
    for k in range(inner + 1):   # the first, untimed, makes the full-size buffers and kernels
        dlg = llm.dialogue()
        t0 = time.perf_counter()
        llm.decode(dlg, prompt, list(range(len(prompt))))
        times.append(time.perf_counter() - t0)
        if k < inner:
            llm.forget(dlg)
    if mode == "controller":
        t2 = time.perf_counter()
        for i, tok in enumerate(follow):
            llm.decode(dlg, [tok], [len(prompt) + i])
        t3 = time.perf_counter()
    else:  # controller-raw: the controller's context, each step as bare ctypes calls
        import ctypes
        import numpy as np
        ctx, b, seq = llm._ctx.ctx, llm._batch, dlg._seq
        out = np.empty(llm.n_vocab, dtype=np.float32)
        t2 = time.perf_counter()
        for i, tok in enumerate(follow):
            b.n_tokens = 1
            b.token[0], b.pos[0], b.n_seq_id[0], b.logits[0] = tok, len(prompt) + i, 1, 1
            b.seq_id[0][0] = seq
            if llama_cpp.llama_decode(ctx, b) != 0:
                raise SystemExit("llama_decode failed")
            ctypes.memmove(out.ctypes.data, llama_cpp.llama_get_logits_ith(ctx, -1), out.nbytes)
        t3 = time.perf_counter()
else:
    llm = llama_cpp.Llama(model, **kw)
    times = []
    for k in range(inner + 1):
        llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
        t0 = time.perf_counter()
        llm.eval(prompt)
        times.append(time.perf_counter() - t0)
    t2 = time.perf_counter()
    for tok in follow:
        llm.eval([tok])
    t3 = time.perf_counter()
patched = hasattr(llama_cpp.llama_cpp._lib, "llama_loopserve_patch_hash")
print(json.dumps({"prefill_s": statistics.median(times[1:]), "decode_tps": len(follow) / (t3 - t2),
                  "patched": patched}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stock-python", help="python of an environment with the unpatched build")
    ap.add_argument("--stock-path", help="or a folder holding the unpatched build (build_runtime.py --unpatched "
                                         "DIR), put first on this Python's PYTHONPATH")
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefills", type=int, default=3,
                    help="timed prefills per process after an untimed one of the same size (median taken)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--raw", action="store_true",
                    help="one more setting: the controller's context, its decode steps as bare ctypes calls (what "
                         "the controller's context costs apart from its Python)")
    a = ap.parse_args()
    if (a.stock_python is None) == (a.stock_path is None):
        ap.error("give one of --stock-python and --stock-path")
    extra = {"n_ubatch": a.ubatch, "n_gpu_layers": a.n_gpu_layers, "flash_attn": a.flash_attn}

    from loopserve_edge import Llama, LoopServeConfig
    from loopserve_edge.bench.data import passages_and_questions
    from loopserve_edge.paths import default_model

    model = str(a.model or default_model())
    with Llama(model, loopserve=LoopServeConfig(max_resident=1), n_ctx=256) as llm:
        text = "\n\n".join(f"Document ({t}): {x}" for t, x, _ in passages_and_questions(400))
        ids = llm.tokenize(text)[: a.tokens + a.decode]
    if len(ids) < a.tokens + a.decode:
        raise SystemExit(f"the shared data gave only {len(ids)} tokens")
    stock_env = dict(os.environ)
    if a.stock_path:
        stock_env["PYTHONPATH"] = os.pathsep.join(x for x in (a.stock_path, os.environ.get("PYTHONPATH")) if x)
    settings = [("unpatched", a.stock_python or sys.executable, "stock"), ("patched", sys.executable, "stock"),
                ("patched, controller", sys.executable, "controller")]
    if a.raw:
        settings.append(("patched, controller's context, bare steps", sys.executable, "controller-raw"))
    got: dict[str, list[dict]] = {name: [] for name, _, _ in settings}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"prompt": ids[: a.tokens], "follow": ids[a.tokens:]}, f)
    try:
        for r in range(a.repeats):
            for name, python, mode in settings:
                out = subprocess.run([python, "-c", CHILD, mode, model, f.name, str(a.threads), json.dumps(extra),
                                      str(a.prefills)],
                                     capture_output=True, text=True, check=True,
                                     env=stock_env if name == "unpatched" else None)
                got[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                if got[name][-1]["patched"] != (name != "unpatched"):
                    raise SystemExit(f"the {name} setting loaded the {'un' * (name != 'unpatched')}patched "
                                     f"build: check --stock-python / --stock-path")
                print(f"  repeat {r + 1}: {name}: {got[name][-1]}", file=sys.stderr, flush=True)
    finally:
        Path(f.name).unlink()
    where = f"{a.n_gpu_layers} layers on the GPU" if a.n_gpu_layers else f"{a.threads} threads"
    print(f"{Path(model).name}, {where}, prompt {a.tokens} tokens (n_batch 2048, n_ubatch {a.ubatch}, "
          f"flash attention {'on' if a.flash_attn else 'off'}; each process: {a.prefills} timed prefills, their "
          f"median), {a.decode} decode steps; median of {a.repeats} runs, settings alternating\n")
    print("| setting | prefill s | time vs. unpatched: median [range] of the repeats | decode tok/s | "
          "speed vs. unpatched: median [range] |")
    print("|---|---:|---:|---:|---:|")
    for name, _, _ in settings:
        # each repeat's ratio to the unpatched run just before it (the machine's state drifts)
        rp = [x["prefill_s"] / u["prefill_s"] for x, u in zip(got[name], got["unpatched"])]
        rt = [x["decode_tps"] / u["decode_tps"] for x, u in zip(got[name], got["unpatched"])]
        p = statistics.median(x["prefill_s"] for x in got[name])
        t = statistics.median(x["decode_tps"] for x in got[name])
        print(f"| {name} | {p:.3f} | {statistics.median(rp):.3f} [{min(rp):.3f}, {max(rp):.3f}] | {t:.1f} | "
              f"{statistics.median(rt):.3f} [{min(rt):.3f}, {max(rt):.3f}] |")


if __name__ == "__main__":
    main()
