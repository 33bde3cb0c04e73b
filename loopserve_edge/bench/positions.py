"""Does a budgeted dialogue keep working far past the model's trained context?

Turns of ~400 tokens of real text (Natural Questions passages), each ending with "Repeat this
sentence exactly: ..."; the reply is teacher-forced to that sentence and its mean token
log-probability measured. A model that attends well copies at about 0 whatever the turn;
past its trained positions it no longer does.

    python -m loopserve_edge.bench.positions [MODEL] --budget 512 --times 3 [--compact auto|always|never]
        [--n-ctx 2048]
"""
from __future__ import annotations

import argparse

import numpy as np

from .data import nq_items
from .fidelity import log_softmax

ANIMALS = ("heron", "otter", "badger", "lynx", "stork", "marten", "ibis", "vole")
PLACES = ("old mill", "stone bridge", "north gate", "salt marsh", "clock tower", "orchard")


def sentence(k: int) -> str:
    return (f"The {ANIMALS[k % len(ANIMALS)]} counted {17 + 7 * k} pebbles near the "
            f"{PLACES[k % len(PLACES)]} on day {k + 1}.")


class CopyScorer:
    """token_fn: feeds the sentence's tokens as the reply and keeps their log-probabilities."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.logp = tokens, []

    def __call__(self, logits) -> int:
        tok = self.tokens[len(self.logp)]
        self.logp.append(float(log_softmax(logits)[tok]))
        return tok


def copy_dialogue(llm, total_tokens: int) -> list[dict]:
    """Turns until `total_tokens` went through one dialogue; per turn: the tokens it added,
    the highest position and the cells after it, and the copy's mean log-probability."""
    passages = [f"{it.title}. {it.text}" for it in nq_items()[:600]]
    d = llm.dialogue(system="You repeat sentences exactly.")
    turns, seen, k = [], 0, 0
    while seen < total_tokens:
        s = sentence(k)
        f = CopyScorer(llm.tokenize(s))
        text = "\n\n".join(passages[3 * k % len(passages):][:3])
        d.send(f"{text}\n\nRepeat this sentence exactly: {s}", token_fn=f, max_tokens=len(f.tokens))
        st = d.last_stats
        size = st.prefilled_tokens + st.decode_tokens
        seen += size
        turns.append({"turn": k + 1, "tokens": seen, "added": size, "top_position": d.positions[-1],
                      "cells": d.n_cells, "copy_logp": float(np.mean(f.logp))})
        k += 1
    d.close()
    return turns


def main(argv=None) -> None:
    from ..config import LoopServeConfig
    from ..llama import Llama
    from ..paths import default_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--times", type=float, default=3.0, help="tokens in all, in trained contexts")
    ap.add_argument("--compact", default="auto", choices=["auto", "always", "never"],
                    help="compact_positions")
    ap.add_argument("--n-ctx", type=int, default=2048,
                    help="context cells (Gemma 3: above a window per resident dialogue plus a ubatch, 2560 "
                         "by default, its window cache is window-sized)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    a = ap.parse_args(argv)
    cfg = LoopServeConfig(policy="loopserve", budget=a.budget, compact_positions=a.compact)
    with Llama(a.model or default_model(), n_ctx=a.n_ctx, n_threads=a.threads, n_gpu_layers=a.n_gpu_layers,
               loopserve=cfg) as llm:
        turns = copy_dialogue(llm, int(a.times * llm.n_ctx_train))
        print(f"# copy test: budget {a.budget}, compact_positions {cfg.compact_positions}, "
              f"trained context {llm.n_ctx_train}, n_ctx {a.n_ctx} (llama.cpp can shift: {llm.can_shift}, "
              f"can compact: {llm.can_compact})")
        print("\n| turn | tokens so far | highest position | cells | copy log-prob |\n|---:|---:|---:|---:|---:|")
        for t in turns:
            print(f"| {t['turn']} | {t['tokens']} | {t['top_position']} | {t['cells']} | {t['copy_logp']:.3f} |")


if __name__ == "__main__":
    main()
