"""Per method of bench runs files: how many first replies differ from full's in the same file
(greedy, so a method that decodes its first reply over the uncut input should differ in none),
and the share of full's greedy tokens in the first turn and in the turns after it.

    python benchmarks/results/n-kv-hold-gpu/first_replies.py RUNS [RUNS ...]   (runs.jsonl[.xz])
"""
import json
import lzma
import sys
from collections import defaultdict


def rows(path):
    with (lzma.open if path.endswith(".xz") else open)(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


print("file | method | dialogues | first replies unlike full's | first turn | later turns")
for path in sys.argv[1:]:
    rs = rows(path)
    full = {r["case"]: r["turns"][0]["reply"] for r in rs if r["method"] == "full"}
    acc = defaultdict(lambda: [0, 0, 0.0, 0, 0.0, 0])  # dialogues, unlike, same/steps first, later
    for r in rs:
        f = r.get("fidelity")
        if r["method"] == "full" or not f:
            continue
        a = acc[r["method"]]
        later = f["later_same_greedy"] * f["later_steps"]
        a[0] += 1
        a[1] += r["turns"][0]["reply"] != full[r["case"]]
        a[2] += f["same_greedy"] * f["steps"] - later
        a[3] += f["steps"] - f["later_steps"]
        a[4] += later
        a[5] += f["later_steps"]
    for m, a in sorted(acc.items()):
        print(f"{path} | {m} | {a[0]} | {a[1]} | {a[2] / a[3]:.3f} | {a[4] / a[5]:.3f}")
