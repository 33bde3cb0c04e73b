"""Merge benchmark folders that ran the same cases with different methods into one.

One call on the GPU box may run several `loopserve-edge bench` processes side by side
(benchmarks/bench_groups.py), each with `full` (the reference every method is compared with)
and a share of the other methods, each into its own folder; a crash or a timeout then costs
one group, not the call. This puts them back together: the first folder's cases and `full` runs, every other method's runs
from whichever folder ran it, the union of the methods in bench.json. It refuses folders of
another model, split, prompt format or case set, and a method run twice; `full`'s replies
must agree across folders (same build, same greedy decoding), otherwise the fidelity
columns would not share one reference.

    python benchmarks/bench_merge.py OUT PART1 PART2 ...
    loopserve-edge bench --report-only --out OUT
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

SAME_SPEC = ("model", "tasks", "ctxs", "turns", "budgets", "alphas", "seed", "cases_per_task", "split",
             "prompt_format", "fidelity", "top_k")


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def merge(out: Path, parts: list[Path]) -> int:
    metas = [json.loads((p / "bench.json").read_text()) for p in parts]
    first = metas[0]
    cases = (parts[0] / "cases.jsonl").read_text()
    for p, m in zip(parts[1:], metas[1:]):
        differ = [k for k in SAME_SPEC if m["spec"].get(k) != first["spec"].get(k)]
        if m["fingerprint"] != first["fingerprint"] or m["prompt_format"] != first["prompt_format"] or differ:
            sys.exit(f"{p}: another model, prompt format or spec ({', '.join(differ) or 'model'})")
        if (p / "cases.jsonl").read_text() != cases:
            sys.exit(f"{p}: other cases than {parts[0]}")
    if out.exists():
        sys.exit(f"{out} exists")
    runs = lines(parts[0] / "runs.jsonl")
    full = {r["case"]: [t["reply"] for t in r["turns"]] for r in runs if r["method"] == "full" and "turns" in r}
    seen = {r["method"] for r in runs}
    methods = list(first["spec"]["methods"])
    for p, m in zip(parts[1:], metas[1:]):
        mine = lines(p / "runs.jsonl")
        for r in mine:
            if r["method"] == "full" and "turns" in r and full.get(r["case"]) != [t["reply"] for t in r["turns"]]:
                sys.exit(f"{p}: full's replies differ from {parts[0]}'s on {r['case']}")
        new = [r for r in mine if r["method"] != "full"]
        clash = {r["method"] for r in new} & seen
        if clash:
            sys.exit(f"{p}: {', '.join(sorted(clash))} also in another folder")
        seen |= {r["method"] for r in new}
        runs += new
        methods += [x for x in m["spec"]["methods"] if x not in methods]
    # all checked: only now is anything written
    shutil.copytree(parts[0], out)
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    first["spec"]["methods"] = methods
    first["merged_from"] = [{"folder": str(p), "command": m["spec"].get("command")} for p, m in zip(parts, metas)]
    (out / "bench.json").write_text(json.dumps(first, indent=1) + "\n")
    return len(runs)


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    n = merge(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
    print(f"{sys.argv[1]}: {n} runs")
