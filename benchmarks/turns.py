"""Multi-turn cost: prefix reuse vs. re-prefilling the history, and restore-from-file vs.
re-prefill, over a 10-turn dialogue of real Wikipedia passages and questions.

    python benchmarks/turns.py [--model M.gguf] [--n-gpu-layers -1] [--turns 10] [--tokens 4000]

Each turn sends two Natural Questions gold passages and a question. For every turn it
prints the time to first token (TTFT) of the live dialogue, which prefills only the new
message, next to the TTFT of a fresh dialogue holding the same history, which must
prefill all of it. At the end the dialogue is saved; a new context restores it from the
file, and the time that takes (read, verify, load the KV state) is set against
prefilling the same history from scratch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# real passages and questions, read in place (LOOPSERVE_DATA); loads llama.cpp before numpy
from loopserve_edge.bench.data import passages_and_questions  # noqa: F401  (decode.py imports it from here)


def turn_messages(turns: int, tokens: int, count_tokens) -> list[str]:
    """`turns` user messages of about tokens/turns tokens each (replies excluded)."""
    per_turn = tokens // turns
    items = passages_and_questions(turns * 12)
    msgs = []
    for _ in range(turns):
        docs, question = [], ""
        while True:
            title, text, q = next(items)
            docs.append(f"Document ({title}): {text}")
            question = q
            if count_tokens("\n\n".join(docs)) >= per_turn * 0.9:
                break
        msgs.append("\n\n".join(docs) + f"\n\nQuestion: {question}?")
    return msgs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="GGUF path (default: the default model)")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=4000, help="approximate dialogue length")
    ap.add_argument("--reply-tokens", type=int, default=16)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--flash-attn", action="store_true")
    a = ap.parse_args()

    from loopserve_edge import Llama, LoopServeConfig, runtime_info
    from loopserve_edge.paths import default_model

    model = Path(a.model) if a.model else default_model()
    kw = dict(n_ctx=a.n_ctx, n_gpu_layers=a.n_gpu_layers, n_threads=a.threads,
              flash_attn=a.flash_attn, n_batch=2048, n_ubatch=512)
    llm = Llama(model, loopserve=LoopServeConfig(max_resident=2), **kw)
    info = runtime_info()
    print(f"# turns benchmark: {model.name}, backend {info['backend']}, "
          f"n_gpu_layers {a.n_gpu_layers}, threads {a.threads or 'default'}, "
          f"{a.turns} turns of ~{a.tokens // a.turns} tokens, replies {a.reply_tokens} tokens (greedy)")
    msgs = turn_messages(a.turns, a.tokens, lambda t: len(llm.tokenize(t)))
    sampling = dict(temperature=0, max_tokens=a.reply_tokens)

    live = llm.dialogue(system="Answer from the documents.")
    # first calls of each batch shape pay for allocation and (CUDA) graph capture
    warm = llm.dialogue()
    warm.send(msgs[0], temperature=0, max_tokens=4)
    warm.send(msgs[1], temperature=0, max_tokens=4)
    warm.close()
    print()
    print("| turn | history tok | new tok | TTFT reuse ms | TTFT re-prefill ms | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for k, msg in enumerate(msgs, start=1):
        history = list(live.messages)
        live.send(msg, **sampling)
        s = live.last_stats
        fresh = llm.dialogue(system=live.system)
        fresh.messages = history
        fresh.send(msg, temperature=0, max_tokens=1)
        f = fresh.last_stats
        # (a random-weight model's reply may re-tokenize to a few more or fewer tokens)
        assert f.reused_tokens == 0
        fresh.close()
        ratios.append(f.ttft_s / s.ttft_s)
        print(f"| {k} | {s.reused_tokens} | {s.prefilled_tokens} | {s.ttft_s * 1e3:.1f} | "
              f"{f.ttft_s * 1e3:.1f} | {f.ttft_s / s.ttft_s:.1f}x |")

    with tempfile.TemporaryDirectory() as tmp:
        path = live.save(Path(tmp) / "bench.lsd")
        size = path.stat().st_size
        n_tokens = len(live.tokens)
        history = list(live.messages)
        system = live.system
        llm.close()

        restore, reprefill = [], []
        for _ in range(3):
            llm = Llama(model, loopserve=LoopServeConfig(max_resident=1), **kw)
            t0 = time.perf_counter()
            d = llm.load_dialogue(path)
            restore.append(time.perf_counter() - t0)
            assert len(d.tokens) == n_tokens
            d.close()
            # the same history, prefilled: render it and decode every token
            cold = llm.dialogue(system=system)
            cold.messages = history[:-2]
            t0 = time.perf_counter()
            cold.send(history[-2]["content"], temperature=0, max_tokens=1)
            reprefill.append(time.perf_counter() - t0)
            cold_tokens = cold.last_stats.prompt_tokens
            llm.close()
    r, p = statistics.median(restore), statistics.median(reprefill)
    print()
    print(f"| restore vs. re-prefill ({n_tokens} tokens in the file; {cold_tokens} re-prefilled) | ms |")
    print("|---|---:|")
    print(f"| restore from state file ({size / 1e6:.1f} MB) | {r * 1e3:.1f} |")
    print(f"| re-prefill the history | {p * 1e3:.1f} |")
    print(f"| ratio | {p / r:.1f}x |")
    print()
    print(f"mean TTFT speed-up from reuse over turns 2-{a.turns}: {statistics.mean(ratios[1:]):.1f}x; "
          f"restore is {p / r:.1f}x faster than re-prefill (target >= 20x): "
          f"{'PASS' if p / r >= 20 else 'FAIL'}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
