"""PNG plots of a benchmark folder: score and fidelity vs. KV budget per method (with their
95% intervals over cases as error bars), TTFT vs. context length, KV cells vs. turn.
matplotlib is imported here only (headless backend)."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(folder: Path, spec, totals, cases, records) -> list[Path] | None:
    """The plots, or None without matplotlib. `totals`: the summary rows over all tasks of
    the runs that ran (report.py makes them, with KEY_lo / KEY_hi interval bounds next to
    score and same_greedy; plots.py only draws)."""
    plt = _pyplot()
    if plt is None:
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made = []

    # score and same-greedy share vs. budget, one column per context length
    fig, axes = plt.subplots(2, len(spec.ctxs), figsize=(5 * len(spec.ctxs), 7), squeeze=False)
    for j, ctx in enumerate(spec.ctxs):
        mine = [r for r in totals if r.ctx == ctx]
        full = next((r for r in mine if r.method == "full"), None)
        for i, (key, name) in enumerate((("score", "task score (mean over tasks)"),
                                         ("same_greedy", "same greedy token as full"))):
            ax = axes[i][j]
            methods = list(dict.fromkeys(r.method.split("@")[0] for r in mine if r.budget is not None))
            for k, m in enumerate(methods):
                pts = sorted((r.budget, getattr(r, key), _err(r, key)) for r in mine
                             if r.method.split("@")[0] == m and r.budget is not None
                             and getattr(r, key) is not None)
                if pts:
                    # methods side by side at a budget, so that their bars do not hide each other
                    shift = 2 ** (0.06 * (k - (len(methods) - 1) / 2))
                    xs, ys, errs = zip(*pts)
                    ax.errorbar([x * shift for x in xs], ys, yerr=list(zip(*errs)), marker="o",
                                capsize=3, label=m)
            if full is not None and key == "score" and full.score is not None:
                ax.axhline(full.score, color="black", linestyle="--", label="full")
                if full.score_lo is not None:
                    ax.axhspan(full.score_lo, full.score_hi, color="black", alpha=0.08, lw=0)
            budgets = sorted({r.budget for r in mine if r.budget is not None})
            if budgets:  # budgets are mostly powers of two: evenly spaced on a log axis
                ax.set_xscale("log", base=2)
                ax.set_xticks(budgets, [str(b) for b in budgets])
                ax.minorticks_off()
            ax.set_xlabel("KV budget (cells)")
            ax.set_ylim(0, 1.05)
            ax.set_ylabel(name)
            ax.set_title(f"context {ctx} (bars: 95% intervals over cases)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    made.append(_save(fig, folder / "score_vs_budget.png", plt))

    # TTFT vs. context length
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for i, (key, name) in enumerate((("ttft_first_ms", "TTFT, first turn (ms)"),
                                     ("ttft_later_ms", "TTFT, later turns (ms)"))):
        ax = axes[0][i]
        for m in dict.fromkeys(r.method for r in totals):
            pts = sorted((r.ctx, getattr(r, key)) for r in totals if r.method == m and getattr(r, key))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    made.append(_save(fig, folder / "ttft_vs_context.png", plt))

    # KV cells after each turn, at the largest context length
    ctx = max(spec.ctxs)
    fig, ax = plt.subplots(figsize=(6, 4))
    wanted = {c.id for c in cases if c.ctx == ctx and c.task in spec.tasks}
    labels = dict.fromkeys(r.method for r in totals)
    for m in labels:
        per_turn: dict[int, list[int]] = {}
        for rec in records:
            if rec["method"] == m and rec["case"] in wanted and "error" not in rec:
                for k, t in enumerate(rec["turns"], 1):
                    per_turn.setdefault(k, []).append(t["kv_cells"])
        if per_turn:
            ks = sorted(per_turn)
            ax.plot(ks, [sum(per_turn[k]) / len(per_turn[k]) for k in ks], marker="o", label=m)
            ax.set_xticks(ks)
    ax.set_xlabel("turn")
    ax.set_ylabel("KV cells after the turn (mean)")
    ax.set_title(f"context {ctx}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    made.append(_save(fig, folder / "kv_cells_vs_turn.png", plt))
    return made


def _err(row, key) -> tuple[float, float]:
    """Distances from the mean down and up to its interval's bounds (0 without bounds)."""
    x, lo, hi = getattr(row, key), getattr(row, f"{key}_lo", None), getattr(row, f"{key}_hi", None)
    return (0.0 if lo is None else x - lo, 0.0 if hi is None else hi - x)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
