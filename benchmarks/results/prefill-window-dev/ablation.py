"""A/B for issue 15 on the dev split: the deferred cut scored by the input's last 32 tokens
(the end of the question and the reply's header) besides the reply's, against the default 4.

`loopserve-d64-head` scores its cut after each reply by the reply's tokens (up to 64) and the
input's last `prefill_window` tokens (default `window`, 4: in a chat turn, the assistant header
and the answer cue). 32 against 4 changed nothing with `defer_cut` 4 (chunk-probe-dev/); with the
cut at the end of the reply the input's rows are a smaller share of the sum.

Registered before the bench CLI runs (not in the package): `d64h-pw32`, `loopserve-d64-head`
with prefill_window=32.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import env_ablation  # noqa: E402  (loopserve_edge first, as tests/conftest.py)
from loopserve_edge import cli  # noqa: E402

env_ablation.variant("loopserve-d64-head", "d64h-pw32", "loopserve-d64-head, its cut also scored by the "
                     "input's last 32 tokens", prefill_window=32)
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
