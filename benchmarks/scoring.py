"""Scoring requests as lm-eval sends them: the last scored text's cells reused, or not.

    python benchmarks/scoring.py [MODEL.gguf] [--questions 24] [--options 4] [--threads 2]

A multiple-choice loglikelihood task over the shared data's Natural Questions (test split):
each question's gold passage and question, then " Answer:", continued by each of `options`
answers (the gold one and others' answers, seeded). Every (context, answer) pair is one
`create_completion(token ids, max_tokens=1, echo=True, logprobs=1)`, as lm-eval's
`local-completions` model sends it, in two orders:
  - `lm-eval`: lm-eval's own (its Collator sorts the requests by descending length, then by
    their tokens), so a question's answers are neighbours only where their lengths agree;
  - `lm-eval, B a call`: the same with lm-eval's `batch_size` B, B prompts a request, which
    the server scores in the order of their prompts (openai_api.run_order);
  - `grouped`: a question's answers one after another (a tool that keeps a document's
    requests together; also lm-eval's order where the answers are one token each, as MMLU's).
Flash attention and batch-invariant attention, as `loopserve-edge serve` runs by default
(without batch invariance, flash attention on the CPU gives a row logits that depend on the
ubatch's size, so a text scored in other chunks differs by up to ~0.3 in a token's
log-probability on the default model, with or without reuse; `--no-batch-invariant`).
Each order runs with the scored text kept between calls (the default) and with it dropped
before each call (`drop_score_cache`: every text scored from its first token). Printed, for each
form of the answers (their text; letters, the answers listed in the context): the time, the
tokens decoded (prompt tokens less those reused) of all prompt tokens, the answers chosen by summed
log-probability, how often the two runs chose the same and the largest difference of a
summed log-probability between them.
"""
from __future__ import annotations

import argparse
import os
import random
import time

from loopserve_edge import Llama, LoopServeConfig, openai_api  # before numpy: see tests/conftest.py
from loopserve_edge.bench.data import Corpus
from loopserve_edge.paths import default_model


def requests(llm, n_questions: int, n_options: int, letters: bool,
             seed: int = 0) -> list[tuple[int, int, list[int], int]]:
    """(question, option, token ids, context length) for every pair; option 0 the right one.
    `letters`: the answers listed in the context under letters and each continuation a letter
    (MMLU's form, the gold one at a seeded place), else each continuation an answer's text."""
    items = [it for it in Corpus("test").nq if len(it.text) < 1200][:n_questions]
    rng = random.Random(seed)
    pool = [it.answers[0] for it in Corpus("test").nq]
    out = []
    for q, it in enumerate(items):
        others = [a for a in rng.sample(pool, 3 * n_options) if a not in it.answers][:n_options - 1]
        answers = [it.answers[0]] + others
        ctx = f"{it.title}\n{it.text}\n\nQuestion: {it.question}?\n"
        if letters:
            order = rng.sample(range(n_options), n_options)   # order[k]: the answer under letter k
            ctx += "".join(f"{'ABCDEFGH'[k]}. {answers[a]}\n" for k, a in enumerate(order))
            conts = {a: " " + "ABCDEFGH"[k] for k, a in enumerate(order)}
        else:
            conts = {a: " " + ans for a, ans in enumerate(answers)}
        ctx_ids = llm.tokenize(ctx + "Answer:", add_bos=llm.add_bos)
        for o in range(n_options):
            out.append((q, o, ctx_ids + llm.tokenize(conts[o]), len(ctx_ids)))
    return out


def context_chunk() -> int:
    from loopserve_edge import context
    return context.SCORE_CHUNK


def server_batches(reqs: list, size: int) -> list:
    """lm-eval's order sent `size` prompts a call: the order the server scores them in
    (openai_api.run_order, by their prompts within each call)."""
    out = []
    for k in range(0, len(reqs), size):
        part = reqs[k:k + size]
        body = {"prompt": [r[2] for r in part], "max_tokens": 1, "echo": True, "logprobs": 1}
        out += [part[i] for i in openai_api.run_order(openai_api.parse_texts(body, "m"))]
    return out


def run(llm, reqs, keep: bool) -> dict:
    sums, decoded = {}, 0
    llm.drop_score_cache()
    t0 = time.perf_counter()
    for q, o, ids, n_ctx in reqs:
        if not keep:
            llm.drop_score_cache()
        r = llm.create_completion(ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
        decoded += r["usage"]["prompt_tokens"] - r["usage"]["prompt_tokens_details"]["cached_tokens"]
        lps = r["choices"][0]["logprobs"]["token_logprobs"]
        sums[q, o] = sum(lps[n_ctx:len(ids)])   # the answer's tokens, as lm-eval sums them
    took = time.perf_counter() - t0
    questions = sorted({q for q, _ in sums})
    chosen = {q: max((o for qq, o in sums if qq == q), key=lambda o: sums[q, o]) for q in questions}
    return {"s": took, "decoded": decoded, "prompt": sum(len(r[2]) for r in reqs), "sums": sums,
            "chosen": chosen, "correct": sum(c == 0 for c in chosen.values()) / len(chosen)}


def table(llm, form: str, orders: dict) -> None:
    for name, rs in orders.items():
        off = run(llm, rs, keep=False)
        on = run(llm, rs, keep=True)
        same = sum(on["chosen"][q] == off["chosen"][q] for q in on["chosen"]) / len(on["chosen"])
        diff = max(abs(on["sums"][k] - off["sums"][k]) for k in on["sums"])
        for label, r in (("no", off), ("yes", on)):
            print(f"| {form} | {name} | {label} | {r['s']:.2f} | {r['decoded']} / {r['prompt']} | "
                  f"{off['s'] / r['s']:.2f}x | {r['correct']:.2f} | "
                  f"{'' if r is off else f'{same:.0%}'} | {'' if r is off else f'{diff:.1e}'} |", flush=True)


def row_costs(n_vocab: int, threads: int, rows: int = 128) -> None:
    """Host time a scored row's log-probabilities take: one row at a time in float64 (the
    computation before session 45, written out here) against sampling.logprobs_rows."""
    import numpy as np
    from loopserve_edge.sampling import logprobs_rows

    def one_row(x, tok, top):
        x = x.astype(np.float64)
        lse = x.max() + np.log(np.exp(x - x.max()).sum())
        idx = np.argpartition(-x, min(top, x.size - 1))[:top] if top else []
        return tok, x[tok] - lse, sorted((-x[i], i) for i in idx)

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((rows, n_vocab)) * 4).astype(np.float32)
    toks = rng.integers(0, n_vocab, rows)
    print(f"\nhost time of a row's log-probabilities, {n_vocab} tokens, {rows} rows a chunk "
          f"(ms a row, best of 5):\n")
    print(f"| best tokens | one row at a time, float64 | logprobs_rows, 1 thread | {threads} threads |")
    print("|---:|---:|---:|---:|")
    def best_of(f, n=5) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times) / rows * 1e3

    for top in (0, 1, 5, 20):
        old = best_of(lambda: [one_row(x[i], int(toks[i]), top) for i in range(rows)])
        new = best_of(lambda: logprobs_rows(x, toks, top))
        spread = best_of(lambda: logprobs_rows(x, toks, top, threads=threads))
        print(f"| {top} | {old:.3f} | {new:.3f} | {spread:.3f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--questions", type=int, default=24)
    ap.add_argument("--options", type=int, default=4)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8, help="prompts a call (lm-eval's batch_size)")
    ap.add_argument("--score-chunk", type=int, default=None,
                    help="rows of every-row logits a decode of the scoring pass takes (context.SCORE_CHUNK)")
    ap.add_argument("--no-rows", action="store_true", help="leave out the host-time table")
    ap.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                    help="the server's default: a row's logits do not depend on the ubatch it is in")
    a = ap.parse_args()
    model = a.model or default_model()
    if a.score_chunk:
        from loopserve_edge import context
        context.SCORE_CHUNK = a.score_chunk
    with Llama(model, n_ctx=a.n_ctx, n_threads=a.threads, n_threads_batch=a.threads,
               n_gpu_layers=a.n_gpu_layers, flash_attn=True,
               loopserve=LoopServeConfig(batch_invariant=a.batch_invariant)) as llm:
        print(f"model {os.path.basename(str(model))}, threads {a.threads}, n_gpu_layers {a.n_gpu_layers}, "
              f"flash attention, batch-invariant {'on' if a.batch_invariant else 'off'}, "
              f"scoring chunks of {min(llm.n_batch, context_chunk())} rows, "
              f"{a.questions} questions x {a.options} answers (Natural Questions, test split, gold passage "
              f"+ question; the other answers other questions')")
        print()
        print("| answers as | order | scored text kept | s | tokens decoded | speedup | answers right "
              "| same choice | max diff |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for letters in (False, True):
            reqs = requests(llm, a.questions, a.options, letters)
            lm_eval = sorted(reqs, key=lambda r: (-len(r[2]), tuple(r[2])))
            orders = {"lm-eval": lm_eval, f"lm-eval, {a.batch} a call": server_batches(lm_eval, a.batch),
                      "grouped": reqs}
            table(llm, "letters" if letters else "text", orders)
        if not a.no_rows:
            row_costs(llm.n_vocab, a.threads)


if __name__ == "__main__":
    main()
