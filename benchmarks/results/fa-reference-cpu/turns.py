"""Same greedy token as full per method, over the first turn and the turns after it, from the
fidelity records of bench folders' runs (runs.jsonl or runs.jsonl.xz), each taken over the
dialogues of the first file only, so that folders of more dialogues compare on the same ones.

    python benchmarks/results/fa-reference-cpu/turns.py RUNS [RUNS ...]
"""
import json
import lzma
import sys
from collections import defaultdict


def rows(path):
    with (lzma.open if path.endswith(".xz") else open)(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(paths):
    cases = {r["case"] for r in rows(paths[0])}
    print("file | method | dialogues | first turn (steps) | later turns (steps) | all | mean KL")
    for path in paths:
        # method -> [same first, steps first, same later, steps later, dialogues, sum of mean KL]
        acc = defaultdict(lambda: [0.0, 0, 0.0, 0, 0, 0.0])
        for r in rows(path):
            f = r.get("fidelity")
            if not f or r["case"] not in cases:
                continue
            a = acc[r["method"]]
            later = f["later_same_greedy"] * f["later_steps"]
            a[0] += f["same_greedy"] * f["steps"] - later
            a[1] += f["steps"] - f["later_steps"]
            a[2] += later
            a[3] += f["later_steps"]
            a[4] += 1
            a[5] += f["mean_kl"]
        for m, a in sorted(acc.items()):
            print(f"{path} | {m} | {a[4]} | {a[0] / a[1]:.3f} ({a[1]}) | {a[2] / a[3]:.3f} ({a[3]}) | "
                  f"{(a[0] + a[2]) / (a[1] + a[3]):.3f} | {a[5] / a[4]:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
