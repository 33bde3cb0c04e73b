"""order_cost.py MODEL N PROMPT ROUNDS [KV_TYPE]: what the cells' order costs batch-invariant attention.
Two contexts in one process, one made with LOOPSERVE_FA_ORDER=0 (no order: the walk in cell
order, as before session 51); N dialogues of PROMPT random tokens prefilled into each
(alternating), then ROUNDS rounds of 32 steps of the N decoded together, the contexts
alternating round by round. Prints the prefill time and the median decode rate of each. KV_TYPE:
a ggml type number for K and V (8: q8_0, which the stock loop takes), f16 by default."""
import os
import sys
import time

import numpy as np

from loopserve_edge import Llama, LoopServeConfig

model, nd, plen, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
kv = dict(type_k=int(sys.argv[5]), type_v=int(sys.argv[5])) if len(sys.argv) > 5 else {}
llms = {}
for off in (False, True):
    if off:
        os.environ["LOOPSERVE_FA_ORDER"] = "0"   # read as the context is switched to batch invariance
    llms[off] = Llama(model, n_ctx=nd * (plen + 32 * rounds + 8) + 256, n_threads=2, flash_attn=True,
                      verbose=False, **kv, loopserve=LoopServeConfig(max_resident=nd, batch_invariant=True))
    os.environ.pop("LOOPSERVE_FA_ORDER", None)
rng = np.random.default_rng(1)
prompts = [[int(t) for t in rng.integers(300, 40000, plen)] for _ in range(nd)]
dialogues = {False: [], True: []}
prefill = {False: 0.0, True: 0.0}
for i, p in enumerate(prompts):
    for off in ((False, True) if i % 2 == 0 else (True, False)):
        llm = llms[off]
        t0 = time.perf_counter()
        d = llm.dialogue()
        llm.decode(d, p, list(range(plen)))
        prefill[off] += time.perf_counter() - t0
        d.tokens, d.positions = list(p), list(range(plen))
        dialogues[off].append(d)
rates = {False: [], True: []}
for r in range(rounds):
    for off in ((False, True) if r % 2 == 0 else (True, False)):
        t0 = time.perf_counter()
        for i in range(32):
            llms[off].decode_batch([(d, 9 + i, plen + 32 * r + i) for d in dialogues[off]])
        rates[off].append(32 * nd / (time.perf_counter() - t0))
for off in (False, True):
    print(f"order {'off' if off else 'on '}: prefill {prefill[off]:.2f} s ({nd} x {plen} tokens); "
          f"{nd} decoded together: median {np.median(rates[off]):.1f} tok/s, rounds {[round(x) for x in rates[off]]}")
