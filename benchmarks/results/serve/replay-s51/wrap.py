"""wrap.py MODEL PROMPT STEPS N_CTX RESIDENT: a dialogue's logits alone against beside another
dialogue whose tokens make a sliding-window model's window cache wrap, with batch-invariant
attention, with the cells' order and without it (LOOPSERVE_FA_ORDER=0). The other dialogue's
steps are decoded on their own ("apart") or in the same batch ("batched")."""
import os
import sys

import numpy as np

from loopserve_edge import Llama, LoopServeConfig

model = sys.argv[1]
plen, n_steps, n_ctx, resident = (int(x) for x in sys.argv[2:6])
rng = np.random.default_rng(5)
prompt = [int(t) for t in rng.integers(300, 40000, plen)]
other = [int(t) for t in rng.integers(300, 40000, plen + 37)]

for off in (False, True):
    if off:
        os.environ["LOOPSERVE_FA_ORDER"] = "0"
    llm = Llama(model, n_ctx=n_ctx, n_threads=2, flash_attn=True, verbose=False,
                loopserve=LoopServeConfig(max_resident=resident, batch_invariant=True))
    os.environ.pop("LOOPSERVE_FA_ORDER", None)

    def run(beside, batched):
        a = llm.dialogue()
        llm.decode(a, prompt, list(range(plen)))
        a.tokens, a.positions = list(prompt), list(range(plen))
        if beside:
            b = llm.dialogue()
            llm.decode(b, other, list(range(len(other))))
            b.tokens, b.positions = list(other), list(range(len(other)))
        out = []
        for i in range(n_steps):
            if beside and batched:
                out.append(llm.decode_batch([(a, 9 + i % 50, plen + i), (b, 11 + i % 40, len(other) + i)])[0])
            else:
                out.append(llm.decode_batch([(a, 9 + i % 50, plen + i)])[0])
                if beside:
                    llm.decode_batch([(b, 11 + i % 40, len(other) + i)])
        a.close()
        if beside:
            b.close()
        return out

    alone = run(False, False)
    print(f"window cache {llm.window_cache_cells} cells; tokens of both: {plen + len(other) + 2 * n_steps}")
    for batched in (False, True):
        got = run(True, batched)
        eq = [np.array_equal(x, y) for x, y in zip(alone, got)]
        print(f"order {'off' if off else 'on '} {'batched' if batched else 'apart  '}: {sum(eq)} of {n_steps} steps "
              f"bit-identical, first to differ {eq.index(False) if False in eq else None}, "
              f"largest difference {max(float(np.abs(x - y).max()) for x, y in zip(alone, got)):.4g}")
    llm.close()
