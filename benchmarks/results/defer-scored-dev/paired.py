"""Paired differences on the same dialogues: each method against the reference, per measure.

    python benchmarks/results/defer-scored-dev/paired.py RUN_FOLDER REFERENCE METHOD... [--budget 256]
        [--ref-budget N]   (the reference at another budget, e.g. cell-wise at 2B against head-wise at B)

RUN_FOLDER holds runs.jsonl (a bench folder) or runs.jsonl.xz (as committed).

Means (the mean of the task means) with 95% intervals, and the paired difference with its 95%
interval (loopserve_edge.bench.report.paired: bootstrap over dialogues, resampled within tasks)."""
import argparse
import json
import lzma
from pathlib import Path

from loopserve_edge.bench import report, stats

ap = argparse.ArgumentParser()
ap.add_argument("folder")
ap.add_argument("reference")
ap.add_argument("methods", nargs="+")
ap.add_argument("--budget", type=int, default=256)
ap.add_argument("--ref-budget", type=int, default=None)
a = ap.parse_args()
ref_budget = a.ref_budget or a.budget
latest = {}
runs = Path(a.folder) / "runs.jsonl"
text = runs.read_text() if runs.exists() else lzma.open(f"{runs}.xz", "rt").read()
for line in text.splitlines():
    r = json.loads(line)
    latest[r["case"], r.get("method_name", r["method"]), r.get("budget")] = r  # the last record wins


def values(name, key, budget=a.budget):
    return report.case_values([r for (_, m, b), r in latest.items() if m == name and b == budget], key)


def pct(key, x):
    return f"{100 * x:+.2f}" if key in ("same_greedy", "later_same_greedy") else f"{x:+.4f}"


for name in a.methods:
    print(f"{name}@{a.budget} against {a.reference}@{ref_budget}:")
    for key in ("same_greedy", "later_same_greedy", "mean_kl", "score"):
        mine, ref = values(name, key), values(a.reference, key, ref_budget)
        m = stats.stratified_ci(report._by_task(mine))
        r = stats.stratified_ci(report._by_task(ref))
        d = report.paired(mine, ref)
        print(f"  {key}: {m[0]:.4f} [{m[1]:.4f}, {m[2]:.4f}] vs. {r[0]:.4f} (n={len(mine)}); "
              f"paired {pct(key, d[0])} [{pct(key, d[1])}, {pct(key, d[2])}]")
