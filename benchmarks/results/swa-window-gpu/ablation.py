"""A/B for issue 15 on Gemma-3-270M: a cut that leaves the sliding-window layers their window
(the runtime's default since session 24) against one that cuts both caches alike (before).

Gemma 3's window layers (five of every six, window 512) attend to the last 512 positions only,
and llama.cpp keeps them in a cache of their own that holds about that many cells whatever is
cut. Until session 24 a cut removed its positions from both caches, so after every cut the next
tokens' window layers saw their window with holes, for no memory saved. The runtime now cuts
the full-attention cache alone; LOOPSERVE_SWA_CUT=1 (read at every cut) cuts both, as before.

Registered before the bench CLI runs (not in the package):
- `loopserve-d64-head-swacut`, `loopserve-d64-swacut`: loopserve-d64-head / loopserve-d64 with
  LOOPSERVE_SWA_CUT=1 while their runs decode. Marked by `chunk_probe` 33, which only budgeted
  prefill reads, and which a sliding-window model never uses (Evictor.chunk_probe).
Every other method runs with the variable at 0 (the default).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import env_ablation  # noqa: E402  (loopserve_edge first, as tests/conftest.py)

env_ablation.run("LOOPSERVE_SWA_CUT", "1", "0", 33, {
    f"{base}-swacut": (base, f"{base}, each cut removing its positions from the window layers' cache too")
    for base in ("loopserve-d64-head", "loopserve-d64")})
