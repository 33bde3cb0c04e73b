"""The later turns' same-greedy-token share by task: the oracle against the method, per budget.

    python benchmarks/results/oracle-cpu/by_task.py benchmarks/results/oracle-cpu/fa   # by_task.txt

Each task's mean over its dialogues (2 a task here), sorted by the oracle's gain."""
import collections
import json
import lzma
import sys
from pathlib import Path

from loopserve_edge.bench import report

folder = Path(sys.argv[1])
runs = folder / "runs.jsonl"
text = runs.read_text() if runs.exists() else lzma.open(f"{runs}.xz", "rt").read()
latest = {}
for line in text.splitlines():
    r = json.loads(line)
    latest[r["case"], r.get("method_name", r["method"]), r.get("budget")] = r
budgets = sorted({b for (_, m, b) in latest if m == "d64h-oracle"})
for b in budgets:
    def later(name):
        return report.case_values([r for (_, m, bb), r in latest.items() if m == name and bb == b], "later_same_greedy")
    oracle, method = later("d64h-oracle"), later("loopserve-d64-head")
    by = collections.defaultdict(list)
    for case, (task, v) in method.items():
        if case in oracle and v is not None and oracle[case][1] is not None:
            by[task].append((v, oracle[case][1]))
    print(f"budget {b}: the turns after the first, same greedy token as full (method / oracle / gain, points)")
    for task, xs in sorted(by.items(), key=lambda kv: -sum(o - v for v, o in kv[1]) / len(kv[1])):
        m, o = (100 * sum(x[i] for x in xs) / len(xs) for i in (0, 1))
        print(f"  {task:18s} {len(xs)} dialogues  {m:5.1f}%  {o:5.1f}%  {o - m:+5.1f}")

# the replies themselves (free-running, not teacher-forced): the second turn's task score
print("second turn's task score (own replies), by task: full / method / oracle, sums over the dialogues")
cases = {}
for (case, m, b), r in latest.items():
    cases.setdefault(case, {})[m if b is None else f"{m}@{b}"] = r
for b in budgets:
    sums = {}
    for d in cases.values():
        if f"d64h-oracle@{b}" not in d or "full" not in d:
            continue
        row = sums.setdefault(d["full"]["task"], [0.0, 0.0, 0.0])
        for i, name in enumerate(("full", f"loopserve-d64-head@{b}", f"d64h-oracle@{b}")):
            # the second question turn: a dialogue whose material comes in a turn of its own
            # has a turn without a score before it
            asked = [t for t in d[name]["turns"] if "score" in t]
            row[i] += asked[1]["score"] or 0.0
    print(f"budget {b}:")
    for task, (f, m, o) in sorted(sums.items()):
        print(f"  {task:18s} {f:4.1f} {m:4.1f} {o:4.1f}")
    print(f"  {'all':18s} {sum(v[0] for v in sums.values()):4.1f} {sum(v[1] for v in sums.values()):4.1f} "
          f"{sum(v[2] for v in sums.values()):4.1f}")
