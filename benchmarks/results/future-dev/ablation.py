"""Ablation for issue 15: a cut's saved query rows scored as if they came later in the dialogue.

The cut that ends a turn is ranked by the attention of the turn's question and reply; the next
question, unknown then, comes some positions later. With rotary position embeddings part of what a
query attends to is its distance to a key: recent keys gain from being near. Expected Attention
(kvpress) estimates what future queries would attend to by moving the queries' statistics to
future positions. A cheap form of it: each saved row's query rotated further by RoPE, as if it
were asked `shift` positions later, and the cut ranked by that attention (averaged over several
shifts when given several).

The runtime reads LOOPSERVE_FUTURE (a comma list of shifts) at every flush of the saved rows
when csrc/src/llama-loopserve-saved-queries.cpp has runtime.diff (this folder) applied; the runtime
does not carry it (not adopted).
Registered before the bench CLI runs (not in the package):
- `loopserve-d64-head-fut128`: every scored row placed 128 positions later (`chunk_probe` 31);
- `loopserve-d64-head-futmix`: the mean over shifts 0, 256 and 1024 (`chunk_probe` 33; 32 is the default, which every other method has).
Every other method runs without the variable."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import env_ablation  # noqa: E402  (loopserve_edge first, as tests/conftest.py)
from loopserve_edge import cli  # noqa: E402
from loopserve_edge.bench import harness  # noqa: E402

ENV, MARKS = "LOOPSERVE_FUTURE", {31: ("128", "fut128", "rows placed 128 positions later"),
                                  33: ("0,256,1024", "futmix", "rows at 0, 256 and 1024 positions later, averaged")}
run_method = harness._run_method


def wrapped(spec, folder, ctx, run, cases, bar, fmt):
    shift = MARKS.get(run.config().chunk_probe)
    if shift:
        os.environ[ENV] = shift[0]
    try:
        return run_method(spec, folder, ctx, run, cases, bar, fmt)
    finally:
        os.environ.pop(ENV, None)


harness._run_method = wrapped
for mark, (_, suffix, what) in MARKS.items():
    env_ablation.variant("loopserve-d64-head", f"loopserve-d64-head-{suffix}",
                         f"loopserve-d64-head, the cut's {what}", chunk_probe=mark)
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
