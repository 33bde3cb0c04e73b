"""Difficulty calibration on the dev split: for each family and context length, the
hardest level of its ladder at which full attention scores at least `target` (mean over
cases). A small model cannot do what a large one does; a family that full attention fails
everywhere cannot tell methods apart, so each model gets the hardest version it can do.

    python -m loopserve_edge.bench.calibrate MODEL --ctx 2K --cases 8 --out levels.json

The levels file is then given to the benchmark (`loopserve-edge bench --levels FILE`);
only dev cases are ever run here. A family that stays under the target at its easiest
level is recorded as such (the report says which families stay at floor).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from .dialogues import Tokens
from .harness import BenchSpec, llama_kwargs, resolve_format, run_dialogue
from .levels import model_key
from .methods import METHODS, Run
from .tasks import FAMILIES, TASKS, generate_all

TARGET = 0.5


def choose(tried: list[dict], target: float = TARGET) -> dict:
    """The level to use, from the levels tried hardest first: the first that reaches the
    target; if none does, the one full scored best on (the hardest of equals): a family at
    floor still runs at the level where it tells most."""
    for t in tried:
        if t["score"] >= target:
            return t["knobs"]
    return max(tried, key=lambda t: t["score"])["knobs"]  # max keeps the first of equals


def calibrate(model: str, ctxs, cases: int, tasks=TASKS, *, turns: int = 2, seed: int = 0,
              prompt_format: str = "auto", target: float = TARGET, n_gpu_layers: int = 0,
              threads: int | None = None, flash_attn: bool = False, log=print) -> dict:
    from ..config import LoopServeConfig
    from ..llama import Llama

    full = Run(METHODS["full"])
    spec = BenchSpec(model=model, n_gpu_layers=n_gpu_layers, threads=threads, flash_attn=flash_attn)
    with Llama(model, loopserve=LoopServeConfig(max_resident=1), n_ctx=256, n_threads=threads) as probe:
        fmt = resolve_format(prompt_format, probe.metadata)
        key = model_key(probe.metadata)
    out = {"model": key, "format": fmt, "target": target, "cases": cases, "turns": turns, "split": "dev",
           "levels": {}, "tried": {}}
    with Llama(model, loopserve=LoopServeConfig(max_resident=1), n_ctx=256, n_threads=threads,
               prompt_format=fmt) as small:
        tokens = Tokens(small)
        for ctx in ctxs:
            chosen, tried = {}, {}
            with Llama(model, loopserve=full.config(), prompt_format=fmt, **llama_kwargs(spec, full, ctx)) as llm:
                for task in tasks:
                    if FAMILIES[task].versus_full:
                        continue  # full scores 1 against itself: nothing to calibrate
                    tried[task] = []
                    for level in FAMILIES[task].ladder or ({},):
                        t0 = time.perf_counter()
                        cs = generate_all([task], ctx=ctx, turns=turns, seed=seed, cases_per_task=cases,
                                          tokens=tokens, split="dev", fmt=fmt, levels={task: level})
                        scores = [run_dialogue(llm, c, full)[0]["score"] for c in cs]
                        mean = statistics.fmean(scores)
                        tried[task].append({"knobs": level, "score": round(mean, 4)})
                        log(f"{key} ctx {ctx} {task} {json.dumps(level)}: full {mean:.2f} "
                            f"({len(cs)} cases, {time.perf_counter() - t0:.0f} s)")
                        if mean >= target:
                            break
                    chosen[task] = choose(tried[task], target)
            out["levels"][str(ctx)] = chosen
            out["tried"][str(ctx)] = tried
    return out


def main(argv=None) -> None:
    from .cli import _numbers

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--ctx", default="2K")
    ap.add_argument("--cases", type=int, default=8, help="dev cases per family and level")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--format", dest="prompt_format", default="auto", choices=["auto", "chat", "completion"])
    ap.add_argument("--target", type=float, default=TARGET)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--flash-attn", action="store_true")
    a = ap.parse_args(argv)
    tasks = TASKS if a.tasks == "all" else tuple(a.tasks.split(","))
    res = calibrate(a.model, _numbers(a.ctx, "--ctx"), a.cases, tasks, turns=a.turns,
                    prompt_format=a.prompt_format, target=a.target, n_gpu_layers=a.n_gpu_layers,
                    threads=a.threads, flash_attn=a.flash_attn, log=lambda m: print(m, file=sys.stderr, flush=True))
    res["command"] = " ".join(["python -m loopserve_edge.bench.calibrate"] + (argv or sys.argv[1:]))
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["levels"], indent=1))


if __name__ == "__main__":
    main()
