"""Issue 15's memory question at a fixed number of KV bytes: head-wise LoopServe with f16 K/V
at budget B, q8_0 at 2B and q4_0 at 4B (1.00x / 1.06x / 1.13x the bytes), against cell-wise f16
at 2B (2.00x). Session 16 measured q8_0 at 2B (../q8-budget/); this adds q4_0 at 4B and `full`
with q4_0 K/V (what q4_0's rounding costs with nothing evicted).

Registered before the bench CLI runs (not in the package):
- `loopserve-d64-head-q8`, `loopserve-d64-head-q4`: loopserve-d64-head with q8_0 / q4_0 K and V;
- `full-q4`: full attention with q4_0 K and V (flash attention on, which quantized V needs)."""
import dataclasses
import sys

from loopserve_edge import cli  # isort: skip  (the package before numpy: tests/conftest.py)
from loopserve_edge.bench import methods as M  # isort: skip

for base, name, kv in (("loopserve-d64-head", "loopserve-d64-head-q8", "q8_0"),
                       ("loopserve-d64-head", "loopserve-d64-head-q4", "q4_0"),
                       ("full", "full-q4", "q4_0")):
    M.METHODS[name] = dataclasses.replace(M.METHODS[base], name=name, kv_type=kv,
                                          describe=f"{base} with {kv} K and V")
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
