"""A/B for issue 15 on Gemma-3-270M past half its trained context: position compaction that
numbers both caches' positions together against one that drops the sliding-window cache's
positions the full-attention cache no longer holds (session 24), and against no compaction at
all. (Session 25's lease ran it with a runtime that read LOOPSERVE_SWA_COMPACT; the three came
out identical, as Gemma's window-sized window cache was never compacted, and the final runtime
reads no such variable: see README.md here.)

A cut leaves the window layers (five of every six, window 512) their window: it removes its
positions from the full-attention cache only. The premise: once a dialogue's positions pass half
the trained context (compact_positions="auto", as on the default model), a cut also renumbers
the kept cells 0, 1, ..., and session 24's runtime first dropped from the window cache what the
other cache no longer held, so that after the first cut of a 32K dialogue the window layers
would see their window with holes again. LOOPSERVE_SWA_COMPACT=drop did that in that lease.

Registered before the bench CLI runs (not in the package):
- `loopserve-d64-head-drop`, `loopserve-d64-drop`: the default configurations (head- and
  cell-wise) with LOOPSERVE_SWA_COMPACT=drop while their runs decode. Marked by `chunk_probe` 34,
  which only budgeted prefill reads, and which a sliding-window model never uses.
- `loopserve-d64-head-never`, `loopserve-d64-never`: the same with compact_positions="never"
  (positions grow; at 32K with two short turns they stay within the trained 32768).
Every other method runs with the variable unset (the default).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import env_ablation  # noqa: E402  (loopserve_edge first, as tests/conftest.py)

for base in ("loopserve-d64-head", "loopserve-d64"):
    env_ablation.variant(base, f"{base}-never", f"{base}, positions never compacted", compact_positions="never")
env_ablation.run("LOOPSERVE_SWA_COMPACT", "drop", "union", 34, {
    f"{base}-drop": (base, f"{base}, compaction dropping the window cache's positions the other cache lost")
    for base in ("loopserve-d64-head", "loopserve-d64")})
