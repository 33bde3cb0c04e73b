"""Ablation for issue 15: each KV head's scores taken as the maximum over its group's query heads
instead of their mean.

A cut scores a KV head by the attention of the query heads that share it (grouped-query
attention: 3 per KV head in SmolLM2-135M, 4 in Gemma-3-270M), averaged with the rows. A token
that one query head of the group needs and the others ignore then counts a third (a quarter) of
what it counts for that head, and a head-wise cut keeps one set of tokens for the whole group.
With the group's maximum, such a token counts in full.

The runtime's graph reads LOOPSERVE_GQA_MAX at every graph it builds (csrc/src/llama-loopserve.cpp,
loopserve_reduce): 1, each query head's mean over the rows reduced at once (a ubatch's window
rows, or the saved rows a flush scores), then the group's maximum; 2, the group's maximum row by
row, then the mean over the rows. Registered before the bench CLI runs (not in the package):
- `loopserve-d64-head-gqamax`, `loopserve-d64-gqamax`: loopserve-d64-head / loopserve-d64 with
  LOOPSERVE_GQA_MAX=1 while their runs decode (marked by `chunk_probe` 21, which only budgeted
  prefill reads; the bench's 2K dialogues never need it);
- `loopserve-d64-head-gqamax2`, `loopserve-d64-gqamax2`: the same with 2 (`chunk_probe` 22).
Every other method runs with the variable at 0 (the mean)."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import env_ablation  # noqa: E402  (loopserve_edge first, as tests/conftest.py)
from loopserve_edge import cli  # noqa: E402
from loopserve_edge.bench import harness  # noqa: E402

ENV, MARKS = "LOOPSERVE_GQA_MAX", {21: ("1", "gqamax", "the maximum over its query heads' means"),
                                   22: ("2", "gqamax2", "the maximum over its query heads, row by row")}
run_method = harness._run_method


def wrapped(spec, folder, ctx, run, cases, bar, fmt):
    os.environ[ENV] = MARKS.get(run.config().chunk_probe, ("0",))[0]
    try:
        return run_method(spec, folder, ctx, run, cases, bar, fmt)
    finally:
        os.environ[ENV] = "0"


harness._run_method = wrapped
for mark, (_, suffix, what) in MARKS.items():
    for base in ("loopserve-d64-head", "loopserve-d64"):
        env_ablation.variant(base, f"{base}-{suffix}", f"{base}, each KV head scored by {what}", chunk_probe=mark)
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
