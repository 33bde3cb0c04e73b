"""Where a periodic cut's time goes while decoding, per granularity and per place of the choice.

    python benchmarks/cut_parts.py --model M.gguf --n-gpu-layers -1 --flash-attn \\
        [--depth 16384] [--budget 2048] [--tokens 512] [--methods cell,head-host,head-cupy]

A dialogue holding `--depth` tokens of passages generates `--tokens` tokens with `loopserve` at
the budget (interval and window as configured by default), for each method:
- `cell`: cell-wise cuts;
- `head-host`: head-wise cuts, each head's choice on the host (the runtime's C++,
  cupy_select "off");
- `head-cupy`: head-wise cuts, the choice on the device through cupy (cupy_select "on"; skipped
  without cupy).
The parts of each cut after the first (the one from `--depth` cells) are timed apart: reading
the scores, the choice (head-wise: each head's own cells; cell-wise: the scores aggregated, then
one choice), the move (head-wise: llama_loopserve_seq_keep_per_head; cell-wise: the cells
removed), each followed by llama_synchronize so that the device's work is counted where it is
queued, and the whole cut. Beside them the decode steps by kind: the one that ends with a cut,
the one right after it, the scored ones and the plain ones (means, ms).

With LOOPSERVE_TRACE_CUTS set in the environment, the runtime prints on stderr the parts of each
cut that Python sees as one call: the flush of the saved query rows (the graph's build,
allocation, mask, run, read-back) and, head-wise, the index building, the move (the device graph's
allocation, index upload and run; the host's copies; the cells' bookkeeping) and the scores that
follow their tokens.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import loopserve_edge  # noqa: F401  before numpy: see tests/conftest.py
from loopserve_edge import LoopServeConfig, cupy_device, eviction
from loopserve_edge.context import Context
import llama_cpp.llama_cpp as llama_c
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import long_text, make  # noqa: E402

METHODS = {"cell": dict(granularity="cell"),
           "head-host": dict(granularity="head", cupy_select="off"),
           "head-cupy": dict(granularity="head", cupy_select="on")}


class Timers:
    """Wraps functions so that their time adds up under a name while `on`."""

    def __init__(self):
        self.on = False
        self.total = collections.defaultdict(float)
        self.calls = collections.Counter()

    def wrap(self, owner, name: str, part: str, sync=None):
        real = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = real(*args, **kwargs)
            if sync is not None:
                sync(args[0])
            if self.on:
                self.total[part] += time.perf_counter() - t0
                self.calls[part] += 1
            return out

        setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--depth", type=int, default=16384)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--methods", default="cell,head-host,head-cupy")
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--flash-attn", action="store_true")
    a = ap.parse_args()

    timers = Timers()
    sync = lambda llm: llama_c.llama_synchronize(llm._ctx.ctx)  # noqa: E731
    timers.wrap(Context, "attention_scores_by_head", "scores")
    timers.wrap(eviction, "choose_keep_rows", "choice")
    timers.wrap(eviction, "aggregate", "choice")
    timers.wrap(eviction, "choose_keep", "choice")
    timers.wrap(Context, "keep_per_head", "move", sync)
    timers.wrap(Context, "remove_cells", "move", sync)
    timers.wrap(eviction.Evictor, "compress", "cut")

    print(f"# where a cut's time goes: {Path(a.model).name}, n_gpu_layers {a.n_gpu_layers}, flash_attn "
          f"{a.flash_attn}, depth {a.depth}, budget {a.budget}, {a.tokens} generated tokens; ms, means per cut "
          f"(the cut from {a.depth} cells left out) and per step (from the second interval on)\n")
    print("| method | cuts | scores | choice | move | whole cut | step with the cut | next step | scored step "
          "| plain step | tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in a.methods.split(","):
        if name == "head-cupy" and cupy_device.module() is None:
            print(f"| {name} | no cupy or no CUDA device: skipped | | | | | | | | | |")
            continue
        cfg = LoopServeConfig(max_resident=1, policy="loopserve", budget=a.budget, **METHODS[name])
        llm = make(a.model, cfg, a, a.depth + a.tokens + 1024)
        toks = llm.tokenize(long_text(a.depth + 512, lambda t: len(llm.tokenize(t))))
        msg = llm.detokenize(toks[:a.depth - 16], special=False)
        eog = np.array([llm.is_eog(t) for t in range(llm.n_vocab)])
        no_stop = lambda l: int(np.argmax(np.where(eog, -np.inf, l)))  # noqa: E731
        warm = llm.dialogue()
        warm.send("Hello.", max_tokens=64, temperature=0, token_fn=no_stop)
        warm.close()
        d = llm.dialogue()
        d.send(msg, max_tokens=4, temperature=0)  # the prefill and its cut
        stamps: list[float] = []

        def step(logits):
            stamps.append(time.perf_counter())
            return no_stop(logits)

        timers.total.clear()
        timers.calls.clear()
        timers.on = True
        d.send("Continue.", max_tokens=a.tokens, temperature=0, token_fn=step)
        timers.on = False
        # the cut from `depth` cells ended the first turn (a reply of 4 tokens), untimed; this
        # turn's cuts (the deferred one after defer_cut tokens, then every interval) are all
        # from about budget + interval cells
        # a compress that finds the dialogue within the budget cuts nothing (at budget 512 the
        # deferred cut and the first periodic one fall on the same token): count the moves
        n_cuts = timers.calls["move"]
        dt = np.diff(stamps)
        phase = np.arange(1, len(dt) + 1) % cfg.interval
        start = cfg.interval - min(cfg.window, cfg.interval)
        first = cfg.defer_cut or 0
        late = np.arange(1, len(dt) + 1) > max(first, cfg.interval)
        kinds = {"cut": (phase == 0) & late, "next": (phase == 1) & late, "scored": (phase > start) & late,
                 "plain": (phase > 1) & (phase < start) & late}
        per = lambda m: f"{1e3 * np.mean(dt[m]):.2f}" if m.any() else "-"  # noqa: E731
        cuts = int(kinds["cut"].sum())
        part = lambda k: f"{1e3 * timers.total[k] / max(1, n_cuts):.2f}"  # noqa: E731
        print(f"| {name} | {n_cuts} ({cuts} timed as steps) | {part('scores')} | {part('choice')} | {part('move')} "
              f"| {part('cut')} | {per(kinds['cut'])} | {per(kinds['next'])} | {per(kinds['scored'])} "
              f"| {per(kinds['plain'])} | {d.last_stats.decode_tps:.1f} |", flush=True)
        d.close()
        llm.close()


if __name__ == "__main__":
    main()
