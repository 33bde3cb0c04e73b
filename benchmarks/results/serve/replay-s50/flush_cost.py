"""The cost of scoring saved query rows (a flush): batch_invariant on (per sequence, in position
order, row by row) against off (every row against every cell in view), the default model on
this CPU, a dialogue of N cells, R rows saved (a deferred cut's 64 + an input window of 8)."""
import sys, time, os
import numpy as np
from loopserve_edge import Llama, LoopServeConfig, bindings
from loopserve_edge.paths import default_model
for inv in (False, True):
    for n in (512, 2048, 6000):
        llm = Llama(str(default_model()), n_ctx=8192, n_threads=2, flash_attn=True, verbose=False,
                    loopserve=LoopServeConfig(max_resident=2, batch_invariant=inv))
        rng = np.random.default_rng(1)
        d = llm.dialogue()
        toks = [int(t) for t in rng.integers(300, 40000, n)]
        llm.set_score_window(8)
        llm.decode(d, toks, list(range(n)))
        llm.set_score_window(1)
        for i in range(64):
            llm.decode(d, [int(rng.integers(300, 40000))], [n + i])
        assert llm.saved_rows == 72, llm.saved_rows
        t0 = time.perf_counter(); bindings.llama_loopserve_scores_flush(llm._ctx.ctx); t = time.perf_counter() - t0
        print(f"batch_invariant {inv!s:5} cells {n + 64:5d} rows 72: flush {t * 1e3:7.1f} ms", flush=True)
        llm.close() if hasattr(llm, "close") else None
        del llm
