"""Eviction settings compared on a bench folder's dialogues, teacher-forced along its `full`
replies (the refs a `loopserve-edge bench` run stored): same greedy token and mean KL per
task and the mean over dialogues, as the bench's summary computes them, and the same over
the steps after the first `--late` of each turn (a cut deferred by N tokens gets those N
steps right for free). `--n-batch` smaller than the bench's 2048 makes a short prompt go to
llama.cpp in several batches, as long ones do.

    loopserve-edge bench --ctx 2K --tasks all --methods full --cases-per-task 1 --out F
    python benchmarks/evict_variants.py F --n-batch 512 \\
        '{"policy": "streaming", "budget": 256}' '{"policy": "loopserve", "budget": 256, "defer_cut": 4}'

Each variant is a JSON object of LoopServeConfig fields ("name" labels it, "n_ctx" sets the
context, by default the longest dialogue's: smaller makes long inputs go in as chunks). Each
variant after the first is also compared with the first, paired on the same dialogues
(difference in same greedy token, 95% bootstrap interval over dialogues).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import loopserve_edge  # noqa: E402,F401  (before numpy: see tests/conftest.py)
import numpy as np  # noqa: E402

from loopserve_edge import Llama, LoopServeConfig  # noqa: E402
from loopserve_edge.bench import fidelity  # noqa: E402
from loopserve_edge.bench.dialogues import Case  # noqa: E402
from loopserve_edge.bench.harness import read_jsonl, run_dialogue  # noqa: E402
from loopserve_edge.bench.methods import METHODS, Run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--n-batch", type=int, default=2048)
    ap.add_argument("--late", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    meta = json.loads((a.folder / "bench.json").read_text())
    cases = [Case.from_dict(c) for c in read_jsonl(a.folder / "cases.jsonl")]
    plain = fidelity.summary

    def summary(forcers):  # the bench's summary, and the same after the first steps
        d = plain(forcers)
        same = [s for f in forcers for s in f.same[a.late:]]
        kls = [k for f in forcers for k in f.kls[a.late:]]
        return dict(d, same_late=float(np.mean(same)) if same else None,
                    kl_late=float(np.mean(kls)) if kls else None)

    fidelity.summary = summary
    print(f"{a.folder}: {len(cases)} dialogues, n_batch {a.n_batch}")
    first = None
    for text in a.variants:
        v = json.loads(text)
        name = v.pop("name", text)
        n_ctx = v.pop("n_ctx", max(c.ctx for c in cases))
        cfg = LoopServeConfig(max_resident=1, **v)
        run = Run(METHODS[cfg.policy], cfg.budget)
        rows, t0 = [], time.time()
        with Llama(meta["spec"]["model"], loopserve=cfg, n_ctx=n_ctx,
                   n_threads=a.threads, n_batch=a.n_batch, n_ubatch=min(512, a.n_batch)) as llm:
            for c in cases:
                rec, _ = run_dialogue(llm, c, run, refs=fidelity.load_refs(a.folder / "refs" / f"{c.id}.npz"))
                rows.append((c.task, rec["fidelity"]))
        mean = lambda k: np.mean([f[k] for _, f in rows if f.get(k) is not None])  # noqa: E731
        print(f"{name}: same {mean('same_greedy'):.1%} KL {mean('mean_kl'):.3f}; after {a.late} steps "
              f"of each turn: same {mean('same_late'):.1%} KL {mean('kl_late'):.3f} ({time.time() - t0:.0f} s)")
        print("   " + " ".join(f"{t}:{f['same_greedy']:.0%}" for t, f in rows), flush=True)
        same = np.array([f["same_greedy"] for _, f in rows])
        if first is None:
            first = (name, same)
        else:
            diff = same - first[1]
            rng = np.random.default_rng(0)
            boot = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(4000)]
            lo, hi = np.percentile(boot, [2.5, 97.5]) * 100
            print(f"   paired against {first[0]}: {diff.mean() * 100:+.1f} points [{lo:+.1f}, {hi:+.1f}]", flush=True)


if __name__ == "__main__":
    main()
