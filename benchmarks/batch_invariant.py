"""Batch-invariant CPU attention (LoopServeConfig.batch_invariant, `serve --batch-invariant`):
what it changes and what it costs.

    python benchmarks/batch_invariant.py [--model M.gguf] [--threads 2] [--repeats 3]

Invariance: 4 dialogues (real passages of the shared data, ~600 tokens each) are decoded
greedily for 32 tokens each, alone (nothing else in the pool) and together (one llama_decode
per step for the 4, their cells side by side in the pool); the table counts the replies
that are token for token the same and the largest difference in any logit up to the step
where a pair of replies first parts.
Cost: the time to first token of one prompt of 512 and 2048 tokens and the decode speed
after the longer one, alone, off against on, alternating, medians over --repeats.
"""
from __future__ import annotations

import argparse
import statistics
import time

from loopserve_edge.bench.data import passages_and_questions  # (llama.cpp before numpy)
import numpy as np  # noqa: E402


def lockstep(llm, prompts: list[list[int]], n: int) -> tuple[list[list[int]], list[list[np.ndarray]]]:
    """Greedy replies of n tokens of the prompts, decoded together, one step for all."""
    ds = [llm.dialogue() for _ in prompts]
    last = [llm.decode(d, p, list(range(len(p)))) for d, p in zip(ds, prompts)]
    toks, logits = [[] for _ in ds], [[lg] for lg in last]
    for i in range(n):
        steps = [(d, int(np.argmax(lg[-1])), len(p) + i) for d, p, lg in zip(ds, prompts, logits)]
        for t, (_, tok, _) in zip(toks, steps):
            t.append(tok)
        for lg, new in zip(logits, llm.decode_batch(steps)):
            lg.append(new)
    for d in ds:
        d.close()
    return toks, logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from loopserve_edge import Llama, LoopServeConfig
    from loopserve_edge.paths import default_model

    model = a.model or str(default_model())
    llms = {on: Llama(model, loopserve=LoopServeConfig(max_resident=4, batch_invariant=on), n_ctx=4096,
                      n_threads=a.threads, flash_attn=True) for on in (False, True)}
    texts = [text for _, text, _ in passages_and_questions(40)]
    tok = llms[False].tokenize
    prompts = []
    for t in texts:
        ids = tok(t)
        if prompts and len(prompts[-1]) < 600:
            prompts[-1] += ids
        elif len(prompts) < 4:
            prompts.append(ids)
    prompts = [p[:600] for p in prompts[:4]]
    print(f"{model.rsplit('/', 1)[-1]}, {a.threads} threads, flash attention, CPU\n")
    print("| batch_invariant | replies equal alone and together | largest logit difference until they part |")
    print("|---|---:|---:|")
    for on, llm in llms.items():
        alone = [lockstep(llm, [p], 32) for p in prompts]
        together = lockstep(llm, prompts, 32)
        same = sum(alone[i][0][0] == together[0][i] for i in range(4))
        diff = 0.0   # over the steps before the two replies part (after, the contexts differ)
        for i in range(4):
            a_toks, t_toks = alone[i][0][0], together[0][i]
            n = next((k for k, (x, y) in enumerate(zip(a_toks, t_toks)) if x != y), len(a_toks))
            for x, y in zip(alone[i][1][0][:n + 1], together[1][i][:n + 1]):
                diff = max(diff, float(np.abs(x - y).max()))
        print(f"| {'on' if on else 'off'} | {same} of 4 | {diff:.3g} |")
    long = [t for p in prompts for t in p] * 2
    times = {(on, n): [] for on in llms for n in (512, 2048)}
    speed = {on: [] for on in llms}
    for _ in range(a.repeats):
        for on, llm in llms.items():
            for n in (512, 2048):
                d = llm.dialogue()
                t0 = time.perf_counter()
                llm.decode(d, long[:n], list(range(n)))
                times[on, n].append(time.perf_counter() - t0)
                if n == 2048:
                    t0 = time.perf_counter()
                    for i in range(64):
                        llm.decode_batch([(d, 100 + i, n + i)])
                    speed[on].append(64 / (time.perf_counter() - t0))
                d.close()
    print(f"\n| batch_invariant | prefill 512 tokens s | prefill 2048 tokens s | decode tok/s after 2048 |")
    print("|---|---:|---:|---:|")
    for on in llms:
        med = statistics.median
        print(f"| {'on' if on else 'off'} | {med(times[on, 512]):.2f} | {med(times[on, 2048]):.2f} | {med(speed[on]):.1f} |")
    off, on = (statistics.median(times[k, 2048]) for k in (False, True))
    print(f"\nprefill 2048 on/off: {on / off:.2f}x; decode on/off: "
          f"{statistics.median(speed[True]) / statistics.median(speed[False]):.2f}x")


if __name__ == "__main__":
    main()
