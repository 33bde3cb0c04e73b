"""Dev-split ablation of loopserve-d32-head's fixed settings (recent cells, pooling kernel):
extra methods registered before the bench CLI runs (not in the package)."""
import sys
from loopserve_edge.bench import methods as M
from loopserve_edge import cli

base = dict(M.METHODS["loopserve-d32-head"].options)
for name, extra in {"d32h-r16": {"recent": 16}, "d32h-r32": {"recent": 32},
                    "d32h-p3": {"pooling": 3}, "d32h-r16-p3": {"recent": 16, "pooling": 3}}.items():
    M.METHODS[name] = M.Method(name, "loopserve", describe=str(extra), options=tuple({**base, **extra}.items()))
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
