"""Decode speed at depth and fidelity to full attention, per KV eviction policy.

    python benchmarks/decode.py speed [--model M] [--depths 0,16384,65536] [--budget 2048] [--n-gpu-layers -1]
    python benchmarks/decode.py fidelity [--model M] [--budgets 256,512,1024] [--prompts 3]

speed: a dialogue is prefilled with `depth` tokens of Wikipedia passages, then generates
`--tokens` tokens; decode tokens/s for `full` and for `loopserve` at the budget (which
compresses after the prefill and every `interval` tokens while decoding). The last columns
are the speed relative to full attention at the first depth (0) and to the same method there
(where it decodes the same cells as full). Every method's context is made first and
their runs alternate (so each holds a KV cache of the deepest depth at once: three on the GPU
box's default, ~2 GB each at the 1B shape and 64K).

fidelity: for each long prompt, `full` generates `--tokens` greedy tokens; every other
policy then reads the same prompt and is teacher-forced along full's tokens, and at each
step its next-token distribution is compared with full's: the share of steps whose greedy
choice equals full's token, and the mean KL(full || policy).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import loopserve_edge  # noqa: F401  before numpy: see tests/conftest.py
from loopserve_edge import LoopServeConfig
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from turns import passages_and_questions  # noqa: E402


def long_text(n_tokens: int, count_tokens, skip: int = 0) -> str:
    parts, total = [], 0
    for i, (title, text, _) in enumerate(passages_and_questions(100000)):
        if i < skip:
            continue
        parts.append(f"{title}: {text}")
        total += count_tokens(text) + 8
        if total >= n_tokens:
            break
    return "\n\n".join(parts)


def make(model, cfg, a, n_ctx):
    from loopserve_edge import Llama

    return Llama(model, loopserve=cfg, n_ctx=n_ctx, n_gpu_layers=a.n_gpu_layers,
                 n_threads=a.threads, flash_attn=a.flash_attn, n_batch=2048, n_ubatch=512)


def speed(a, model):
    depths = [int(x) for x in a.depths.split(",")]
    n_ctx = max(depths) + a.tokens + 1024
    methods = {"full": LoopServeConfig(max_resident=1)}
    no_hold = set()  # rows decoded with the runtime's n_kv hold off (LOOPSERVE_N_KV_HOLD=0)
    for gran in a.granularity.split(","):
        for ds, dc, alloc, sq, hold, iv in itertools.product(a.defer_scored.split(","), a.defer_cut.split(","),
                                                             a.allocation.split(","), a.saved_queries.split(","),
                                                             a.n_kv_hold.split(","), a.interval.split(",")):
            if alloc != "uniform" and gran != "head":
                continue  # an allocation shares a head-wise cut's tokens
            # head-wise cuts move each head's K/V rows in a graph: a cut costs more than
            # cell-wise; "-sN": the deferred cut scored by the reply's first N tokens only
            # (defer_scored); "-ada"/"-pyramid": per-head shares, each KV head then attending
            # apart with its own mask, in about twice the budget's cells; "-eager": each
            # scored decode scores as it runs (saved_queries off); "-dN": the cut after the
            # prefill waits for N generated tokens instead of the default defer_cut; "-nohold":
            # the decode graph's n_kv follows every cut down (patch 0012's hold off); "-iN": a
            # compression every N generated tokens instead of the default interval's
            name = (f"loopserve@{a.budget}" + ("-head" if gran == "head" else "")
                    + ("" if ds == "all" else f"-s{ds}") + ("" if dc == "default" else f"-d{dc}")
                    + ("" if alloc == "uniform" else f"-{alloc}") + ("" if sq == "on" else "-eager")
                    + ("" if hold == "on" else "-nohold") + ("" if iv == "default" else f"-i{iv}"))
            if hold != "on":
                no_hold.add(name)
            methods[name] = LoopServeConfig(
                max_resident=1, policy="loopserve", budget=a.budget, window=a.window,
                interval=None if iv == "default" else int(iv),
                granularity=gran, cupy_select=a.cupy_select, defer_scored=None if ds == "all" else int(ds),
                defer_cut=None if dc == "default" else int(dc), allocation=alloc, saved_queries=sq == "on")
    print(f"| method | depth | cells while decoding | decode tok/s{' (median, range)' if a.repeats > 1 else ''} "
          f"| vs. full @ {depths[0]} | vs. itself @ {depths[0]} | vs. itself @ {depths[0]}, by repeat (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    # every method's context is made first and the runs alternate between them (depth by
    # depth, repeat by repeat), so that a drift of the machine (clocks, other load) during the
    # run falls on every method alike: run one after the other, rows of the H200 differed by
    # up to ~10% between two runs of the same build (decode.md, session 17)
    llms = {name: make(model, cfg, a, n_ctx) for name, cfg in methods.items()}
    first = next(iter(llms.values()))
    count = lambda t: len(first.tokenize(t))  # noqa: E731
    toks = first.tokenize(long_text(max(depths) + 512, count))
    eog = np.array([first.is_eog(t) for t in range(first.n_vocab)])
    no_stop = lambda l: int(np.argmax(np.where(eog, -np.inf, l)))  # noqa: E731  full length

    def hold_env(name: str) -> None:  # read by the runtime at every ubatch
        os.environ["LOOPSERVE_N_KV_HOLD"] = "0" if name in no_hold else "1"

    for name, llm in llms.items():
        hold_env(name)
        warm = llm.dialogue()  # GPU clocks, CUDA graphs and allocations settle before timing
        warm.send("Hello.", max_tokens=64, temperature=0, token_fn=no_stop)
        warm.close()
    rows = {}
    # the prompt is cut at `depth` tokens of text: a user message of that size
    msgs = {depth: first.detokenize(toks[:max(depth - 16, 8)], special=False) for depth in depths}
    # the depths alternate too, repeat by repeat: the ratios to depth 0 are the targets, and one
    # H200 ran a row 10% faster or slower some minutes later (decode.md, session 26), which a
    # block of depth-0 runs before a block of deep ones took into the ratios
    for _ in range(a.repeats):
        for depth in depths:
            msg = msgs[depth]
            for name, llm in llms.items():  # each run in a new dialogue; the median is reported
                hold_env(name)
                d = llm.dialogue()
                d.send(msg, max_tokens=4, temperature=0)  # prefill (+ compression) and warm-up
                stamps: list[float] = []

                def timed(l):
                    stamps.append(time.perf_counter())
                    return no_stop(l)

                d.send("Continue.", max_tokens=a.tokens, temperature=0, token_fn=timed)
                rows.setdefault((name, depth), []).append(
                    (d.last_stats.decode_tps, d.last_stats.kv_cells, np.diff(stamps)))
                d.close()
    for llm in llms.values():
        llm.close()
    median = {k: sorted(runs, key=lambda r: r[0])[len(runs) // 2] for k, runs in rows.items()}
    base = median["full", depths[0]][0]
    for name, cfg in methods.items():
        for depth in depths:
            runs = rows[name, depth]
            tps, cells, dt = median[name, depth]
            spread = f" ({min(r[0] for r in runs):.1f}-{max(r[0] for r in runs):.1f})" if len(runs) > 1 else ""
            # against the method's own first depth too: full's own runs there drift as much as
            # any other row's (decode.md, session 22), and both rows decode the same cells there
            own = median[name, depths[0]][0]
            # and paired by repeat: each run against the same method's run at the first depth
            # just before it, whose median holds less of the machine's drift than two medians
            paired = np.median([r[0] / r0[0] for r, r0 in zip(runs, rows[name, depths[0]])])
            print(f"| {name} | {depth} | {cells} | {tps:.1f}{spread} | {tps / base:.0%} | {tps / own:.0%} "
                  f"| {paired:.0%} |", flush=True)
            if a.profile:
                # a dialogue that reached the budget was cut at the end of the first turn, so the
                # timed turn's prefill took it past the budget: its first defer_cut steps are
                # scored for the cut after that prefill, whatever their phase in the interval
                profile_line(dt, cfg, deferred=cfg.policy == "loopserve" and cells >= a.budget)


def profile_line(dt: np.ndarray, cfg, deferred: bool = False) -> None:
    """Where decode time goes inside an interval. Step g (between sampling generated
    tokens g and g+1) decodes token g, then runs the hooks after it: at the window's start
    they turn scoring on, so the next `window` decodes are scored; every `interval` tokens
    the last of them is followed by the compression, which turns scoring off. With `deferred`
    the turn's first `defer_cut` decodes are scored too and the last of them ends with the
    cut after the prefill: they are counted apart (session 19 counted them as plain)."""
    g = np.arange(len(dt))
    phase = (g + 1) % cfg.interval
    start = cfg.interval - min(cfg.window, cfg.interval)
    first = g < (cfg.defer_cut if deferred else 0)
    groups = {"deferred: scored": first & (g < cfg.defer_cut - 1),
              "deferred: scored + cut": first & (g == cfg.defer_cut - 1),
              "scored + compress": ~first & (phase == 0), "scoring on": ~first & (phase == start),
              "scored": ~first & (phase > start), "plain": ~first & (phase < start) & (phase != 0)}
    parts = [f"{k} {1e3 * np.mean(dt[m]):.2f} ms x{int(m.sum())}" for k, m in groups.items() if m.any()]
    print(f"|   | per step (mean) | {', '.join(parts)} | | | | |", flush=True)


def fidelity(a, model):
    from loopserve_edge.bench.fidelity import GreedyRecorder, TeacherForcer, summary

    budgets = [int(x) for x in a.budgets.split(",")]
    policies = ["streaming", "snapkv", "h2o", "loopserve"]
    n_ctx = a.prompt_tokens + a.tokens + 256
    full = make(model, LoopServeConfig(max_resident=1), a, n_ctx)
    count = lambda t: len(full.tokenize(t))  # noqa: E731
    prompts = [long_text(a.prompt_tokens, count, skip=40 * i) + "\n\nSummarise the documents above."
               for i in range(a.prompts)]
    refs = []
    for p in prompts:
        d = full.dialogue()
        rec = GreedyRecorder(top_k=None)  # the whole distribution: exact KL
        d.send(p, max_tokens=a.tokens, token_fn=rec)
        refs.append(rec.steps)
        d.close()
    full.close()
    print(f"prompts: {a.prompts} x ~{a.prompt_tokens} tokens, {a.tokens} teacher-forced tokens each")
    print()
    print("| policy | budget | same greedy token | mean KL(full ‖ policy) |")
    print("|---|---:|---:|---:|")
    for policy in policies:
        for budget in budgets:
            cfg = LoopServeConfig(max_resident=1, policy=policy, budget=budget)
            llm = make(model, cfg, a, n_ctx)
            forcers = []
            for p, steps in zip(prompts, refs):
                d = llm.dialogue()
                forcers.append(TeacherForcer(steps))
                d.send(p, max_tokens=len(steps), token_fn=forcers[-1])
                d.close()
            s = summary(forcers)
            print(f"| {policy} | {budget} | {s['same_greedy']:.1%} | {s['mean_kl']:.4f} |", flush=True)
            llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["speed", "fidelity"])
    ap.add_argument("--model")
    ap.add_argument("--depths", default="0,2048,4096")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--budgets", default="256,512,1024")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1,
                    help="speed: runs per row, each in a new dialogue; the median (and the range) is printed")
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--profile", action="store_true", help="speed: per-step times by phase")
    ap.add_argument("--interval", default="default",
                    help="speed: loopserve's intervals, e.g. default,128 (rows -i128 beside the default's)")
    ap.add_argument("--window", type=int, default=LoopServeConfig.window, help="speed: loopserve's window")
    ap.add_argument("--defer-scored", default="all",
                    help="speed: loopserve's defer_scored values, e.g. all,4 (all: every token the deferred "
                         "cut waits for scores it)")
    ap.add_argument("--defer-cut", default="default",
                    help="speed: loopserve's defer_cut values, e.g. default,32 (rows -dN)")
    ap.add_argument("--granularity", default="cell", help="speed: loopserve's granularities, e.g. cell,head")
    ap.add_argument("--allocation", default="uniform",
                    help="speed: head-wise rows with each allocation, e.g. uniform,ada (LoopServeConfig.allocation)")
    ap.add_argument("--n-kv-hold", default="on", choices=["on", "off", "on,off", "off,on"],
                    help="speed: loopserve rows with the runtime's n_kv hold (patch 0012), without "
                         "(-nohold rows), or both")
    ap.add_argument("--saved-queries", default="on", choices=["on", "off", "on,off", "off,on"],
                    help="speed: loopserve rows with saved query rows (LoopServeConfig.saved_queries), "
                         "without (-eager rows), or both")
    ap.add_argument("--cupy-select", default="auto", choices=["auto", "on", "off"],
                    help="speed: where head-wise cuts choose (LoopServeConfig.cupy_select; off: the host's C++)")
    a = ap.parse_args()

    from loopserve_edge import runtime_info
    from loopserve_edge.paths import default_model

    model = Path(a.model) if a.model else default_model()
    print(f"# decode benchmark ({a.what}): {model.name}, backend {runtime_info()['backend']}, "
          f"n_gpu_layers {a.n_gpu_layers}, flash_attn {a.flash_attn}, threads {a.threads or 'default'}")
    print()
    (speed if a.what == "speed" else fidelity)(a, model)


if __name__ == "__main__":
    main()
