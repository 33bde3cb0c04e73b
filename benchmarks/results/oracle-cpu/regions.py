"""Where the oracle's cut ending turn 1 differs from the method's, by region of the dialogue
(session 55): reads the file ablation.py writes with ORACLE_CUTS=FILE (SmolLM2's chat template)."""
import collections
import json
import sys

import numpy as np

seen, recs = set(), []
for line in open(sys.argv[1]):
    r = json.loads(line)
    key = tuple(r["tokens"])
    if key not in seen:
        seen.add(key)
        recs.append(r)
avail, both, only_o, only_m, dist = (collections.Counter(), collections.Counter(), collections.Counter(),
                                     collections.Counter(), [])
for r in recs:
    n, pieces, starts = r["n"], r["pieces"], r["starts"]
    roles = [pieces[s + 1].strip() for s in starts]
    lab = ["template"] * n
    for k, s in enumerate(starts):
        e = starts[k + 1] if k + 1 < len(starts) else n
        for i in range(s + 2, e):  # after <|im_start|> and the role's first token
            lab[i] = ("question 1" if i >= e - 40 else "document") if roles[k] == "user" else \
                     ("reply 1" if roles[k].startswith("ass") else roles[k])
    for i, p in enumerate(pieces):
        if p.startswith("<|"):
            lab[i] = "template"
    for i in range(n):
        avail[lab[i]] += 1
    for hm, ho in zip(r["method"], r["oracle"]):
        sm, so = set(hm), set(ho)
        am = np.array(sorted(sm))
        for i in so - sm:
            only_o[lab[i]] += 1
            dist.append(int(np.abs(am - i).min()))
        for i in sm - so:
            only_m[lab[i]] += 1
        for i in so & sm:
            both[lab[i]] += 1
H, C = len(recs[0]["method"]), len(recs)
print(f"{C} dialogues, {H} KV heads, budget {recs[0]['budget']}: cells per head per cut")
print(f"{'region':12s} {'in the cut':>10s} {'kept by both':>12s} {'oracle only':>11s} {'method only':>11s}")
for k in ("template", "system", "document", "question 1", "reply 1"):
    print(f"{k:12s} {avail[k] / C:10.1f} {both[k] / H / C:12.1f} {only_o[k] / H / C:11.1f} {only_m[k] / H / C:11.1f}")
d = np.array(dist)
print(f"an oracle-only cell's distance to the nearest cell the method keeps in that head: median {np.median(d):.0f} "
      f"tokens, <= 3: {np.mean(d <= 3):.0%}, > 20: {np.mean(d > 20):.0%}")
