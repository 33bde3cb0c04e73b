"""The summary of a benchmark folder: markdown and CSV tables (score and fidelity per task
x method, relative to full; costs per method), and the plots (plots.py).

Scores and fidelity come with 95% bootstrap intervals over cases (stats.py), and each
method is compared on the same cases, by the interval of the paired difference, with
`full` (task score) and with the best baseline at its budget (task score, same-greedy
share): a difference whose interval excludes 0 is marked in the tables."""
from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from . import plots, stats
from .dialogues import Case
from .harness import BenchSpec, read_jsonl
from .methods import METHODS, Run, expand

ALL = "all tasks"
# new columns go at the end: readers of older summaries index the first ones
COLUMNS = ("ctx", "task", "method", "budget", "alpha", "status", "cases", "errors", "score",
           "score_vs_full", "same_greedy", "mean_kl", "ttft_first_ms", "ttft_later_ms",
           "decode_tps", "kv_cells", "state_mb", "peak_rss_mb", "prefill_density",
           "score_n", "score_lo", "score_hi", "fidelity_n", "same_greedy_lo", "same_greedy_hi",
           "mean_kl_lo", "mean_kl_hi", "score_minus_full", "score_minus_full_lo",
           "score_minus_full_hi", "score_baseline", "score_minus_baseline",
           "score_minus_baseline_lo", "score_minus_baseline_hi", "same_greedy_baseline",
           "same_greedy_minus_baseline", "same_greedy_minus_baseline_lo",
           "same_greedy_minus_baseline_hi", "score_marks", "same_greedy_marks",
           "later_same_greedy", "later_same_greedy_lo", "later_same_greedy_hi",
           "later_mean_kl", "later_mean_kl_lo", "later_mean_kl_hi")
FIDELITY = ("same_greedy", "mean_kl")
LATER = ("later_same_greedy", "later_mean_kl")   # the turns after the first (fidelity.summary)
UP_DOWN_FULL = {1: "↑", -1: "↓", 0: ""}
UP_DOWN_BASELINE = {1: "+", -1: "−", 0: ""}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


@dataclass
class Row:
    """One (context length, task, method) cell of the summary."""
    ctx: int
    task: str
    method: str
    budget: int | None
    alpha: float | None
    status: str = "ok"           # or "n/a: why"
    cases: int = 0
    errors: int = 0
    score: float | None = None
    score_vs_full: float | None = None
    same_greedy: float | None = None
    mean_kl: float | None = None
    ttft_first_ms: float | None = None
    ttft_later_ms: float | None = None
    decode_tps: float | None = None
    kv_cells: float | None = None
    state_mb: float | None = None
    peak_rss_mb: float | None = None
    prefill_density: float | None = None
    # 95% intervals over cases, and how many cases have the value
    score_n: int = 0
    score_lo: float | None = None
    score_hi: float | None = None
    fidelity_n: int = 0
    same_greedy_lo: float | None = None
    same_greedy_hi: float | None = None
    mean_kl_lo: float | None = None
    mean_kl_hi: float | None = None
    # paired differences on the same cases, with their intervals: this method - full, and
    # (non-baseline methods) this method - the best baseline at the same budget (its label)
    score_minus_full: float | None = None
    score_minus_full_lo: float | None = None
    score_minus_full_hi: float | None = None
    score_baseline: str | None = None
    score_minus_baseline: float | None = None
    score_minus_baseline_lo: float | None = None
    score_minus_baseline_hi: float | None = None
    same_greedy_baseline: str | None = None
    same_greedy_minus_baseline: float | None = None
    same_greedy_minus_baseline_lo: float | None = None
    same_greedy_minus_baseline_hi: float | None = None
    score_marks: str = ""        # ↓ / ↑ versus full, − / + versus the best baseline
    same_greedy_marks: str = ""  # − / + versus the best baseline
    later_same_greedy: float | None = None
    later_same_greedy_lo: float | None = None
    later_same_greedy_hi: float | None = None
    later_mean_kl: float | None = None
    later_mean_kl_lo: float | None = None
    later_mean_kl_hi: float | None = None

    @classmethod
    def of(cls, ctx, task, run: Run, records: list[dict]) -> "Row":
        """The cell of these records. Score and fidelity: the mean of the task means (for
        one task, the mean over its cases), so that in 'all tasks' each task weighs the
        same; with 95% intervals over cases."""
        ok = [r for r in records if "error" not in r]
        turns = [t for r in ok for t in r["turns"]]
        row = cls(
            ctx, task, run.label, run.budget, run.alpha, cases=len(records),
            errors=len(records) - len(ok),
            ttft_first_ms=_mean(r["turns"][0]["ttft_s"] * 1e3 for r in ok),
            ttft_later_ms=_mean(t["ttft_s"] * 1e3 for r in ok for t in r["turns"][1:]),
            decode_tps=_mean(t["decode_tps"] for t in turns if t["decode_tokens"] >= 4),
            kv_cells=_mean(r["turns"][-1]["kv_cells"] for r in ok),
            state_mb=_mean(r["state_bytes"] / 1e6 for r in ok),
            peak_rss_mb=_mean(r.get("peak_rss_mb") for r in ok),
            prefill_density=_mean(t.get("prefill_density") for t in turns))
        values = {key: case_values(ok, key) for key in ("score",) + FIDELITY + LATER}
        for key, v in values.items():
            row.set_ci(key, stats.stratified_ci(_by_task(v)))
        row.score_n, row.fidelity_n = len(values["score"]), len(values["same_greedy"])
        return row

    def set_ci(self, key: str, ci: tuple | None) -> None:
        """key, key_lo and key_hi from (mean, lo, hi) (None: no values)."""
        for name, x in zip((key, f"{key}_lo", f"{key}_hi"), ci or (None,) * 3):
            setattr(self, name, x)

    def csv(self) -> list:
        return [getattr(self, c) for c in COLUMNS]


def case_values(records: list[dict], key: str) -> dict[str, tuple[str, float]]:
    """case id -> (task, value) of `key` (score, or a fidelity key) over the records that
    have one (a failed run has none)."""
    out = {}
    for r in records:
        if "error" in r:
            continue
        x = (r.get("fidelity") or {}).get(key) if key in FIDELITY + LATER else r.get(key)
        if x is not None:
            out[r["case"]] = (r["task"], x)
    return out


def _by_task(values: dict) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = {}
    for task, x in values.values():
        groups.setdefault(task, []).append(x)
    return groups


def paired(mine: dict, theirs: dict) -> tuple | None:
    """(mean of mine - theirs, lo, hi) over the cases both have, resampled within tasks."""
    return stats.paired_diff_ci({c: x for c, (_, x) in mine.items()},
                                {c: x for c, (_, x) in theirs.items()},
                                strata={c: t for c, (t, _) in mine.items()})


@dataclass(frozen=True)
class CaseRef:
    """What the summary and plots need of a dialogue, when only its runs are at hand."""
    id: str
    ctx: int
    task: str


def load(out: Path) -> tuple[BenchSpec, dict, list, list[dict]]:
    """The spec, bench.json, the dialogues and the latest record per (dialogue, method).
    Without cases.jsonl (a folder brought back without the dialogues' text, which quotes
    the shared data) the dialogues are known from the runs: each by the text digest its
    `full` run had (else its latest run's), and runs of another text are left out."""
    meta = json.loads((out / "bench.json").read_text())
    spec = BenchSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["spec"].items()})
    runs = read_jsonl(out / "runs.jsonl")
    if (out / "cases.jsonl").exists():
        cases = [Case.from_dict(c) for c in read_jsonl(out / "cases.jsonl")]
        digests = {c.id: c.digest() for c in cases}
    else:
        refs, digests = {}, {}
        for r in runs:
            if r["method"] == "full" or r["case"] not in digests:
                refs[r["case"]] = CaseRef(r["case"], r["ctx"], r["task"])
                digests[r["case"]] = r.get("digest")
        cases = list(refs.values())
    latest = {}
    for r in runs:
        if digests.get(r["case"]) == r.get("digest"):
            latest[(r["case"], r["method"])] = r
    return spec, meta, cases, list(latest.values())


def summarise(spec: BenchSpec, cases: list[Case], records: list[dict]) -> list[Row]:
    """Rows for the asked context lengths, tasks and runs (unavailable runs as n/a), one
    'all tasks' row per method (the mean over tasks)."""
    wanted = {(c.ctx, c.task) for c in cases if c.ctx in spec.ctxs and c.task in spec.tasks}
    case_ids = {c.id for c in cases if (c.ctx, c.task) in wanted}
    by = {}
    for r in records:
        if r["case"] in case_ids:
            by.setdefault((r["ctx"], r["task"], r["method"]), []).append(r)
    rows, of_row = [], {}
    for ctx in spec.ctxs:
        tasks = [t for t in spec.tasks if (ctx, t) in wanted]
        for run in spec.runs(ctx):
            why = run.unavailable()
            for task in tasks:
                of_row[(ctx, task, run.label)] = by.get((ctx, task, run.label), [])
            of_row[(ctx, ALL, run.label)] = [r for t in tasks for r in of_row[(ctx, t, run.label)]]
            for task in tasks + [ALL]:   # ALL: Row.of takes the mean of the task means
                rows.append(Row.of(ctx, task, run, of_row[(ctx, task, run.label)]))
                if why:
                    rows[-1].status = f"n/a: {why}"
    rows = _ran_budgets(rows)
    full = {(r.ctx, r.task): r.score for r in rows if r.method == "full"}
    for r in rows:
        f = full.get((r.ctx, r.task))
        if r.score is not None and f:
            r.score_vs_full = r.score / f
    compare(rows, lambda r, key: case_values(of_row[(r.ctx, r.task, r.method)], key))
    return rows


def _ran_budgets(rows: list[Row]) -> list[Row]:
    """Without a method's budgets that have no runs while others of its budgets have some: a
    folder filled by several calls, each with its own methods and budgets, lists every method
    at every budget, and the pairs never asked for would fill the tables with empty columns.
    A method with no runs at all stays (its column says it has none)."""
    ran = {(r.ctx, r.method) for r in rows if r.cases}
    base = {(ctx, m.split("@")[0]) for ctx, m in ran}
    return [r for r in rows if (r.ctx, r.method) in ran or (r.ctx, r.method.split("@")[0]) not in base]


def _best_baselines(rows: list[Row]) -> dict:
    """(key, ctx, task, budget) -> the baseline row with the highest mean of key there
    (score, or same_greedy); the first listed on a tie."""
    best = {}
    for r in rows:
        for key in ("score", "same_greedy"):
            x = getattr(r, key)
            if is_baseline(r.method) and r.status == "ok" and x is not None:
                at = (key, r.ctx, r.task, r.budget)
                if at not in best or x > getattr(best[at], key):
                    best[at] = r
    return best


def compare(rows: list[Row], values) -> None:
    """Paired differences on the same cases, and the marks where their 95% interval
    excludes 0: every method against full (task score: ↓ / ↑), and each method that is no
    baseline against the best baseline at its budget (task score and same-greedy share:
    − / +). values(row, key) -> case id -> (task, value), the cases of that row."""
    full = {(r.ctx, r.task): r for r in rows if r.method == "full" and r.status == "ok"}
    best = _best_baselines(rows)
    for r in rows:
        if r.method == "full" or r.status != "ok":
            continue
        f = full.get((r.ctx, r.task))
        if f is not None:
            d = paired(values(r, "score"), values(f, "score"))
            r.set_ci("score_minus_full", d)
            r.score_marks += UP_DOWN_FULL[stats.direction(d)]
        if is_baseline(r.method):
            continue
        for key in ("score", "same_greedy"):
            b = best.get((key, r.ctx, r.task, r.budget))
            if b is None:
                continue
            d = paired(values(r, key), values(b, key))
            setattr(r, f"{key}_baseline", b.method)
            r.set_ci(f"{key}_minus_baseline", d)
            setattr(r, f"{key}_marks", getattr(r, f"{key}_marks") + UP_DOWN_BASELINE[stats.direction(d)])


def is_baseline(label: str) -> bool:
    return METHODS[label.split("@")[0]].baseline


def _f(x, fmt="{:.2f}", none="—"):
    return none if x is None else fmt.format(x)


def _ci(r: Row, key: str, fmt="{:.2f}") -> str:
    """`0.62 [0.48, 0.75]`: the mean and its 95% interval."""
    x = getattr(r, key)
    if x is None:
        return "—"
    return f"{fmt.format(x)} [{fmt.format(getattr(r, key + '_lo'))}, {fmt.format(getattr(r, key + '_hi'))}]"


def _tail(marks: str, n: int, cases: int) -> str:
    """The marks, and the number of cases where a cell has fewer than its task."""
    return (f" {marks}" if marks else "") + (f" n={n}" if 0 < n < cases else "")


def _legend(vs_full: bool, baselines: list[str], best: str) -> str:
    """What the marks of a table mean (nothing without marks to explain)."""
    parts = ["↓/↑ below/above `full`"] if vs_full else []
    if baselines:
        names = ", ".join(f"`{b}`" for b in dict.fromkeys(b.split("@")[0] for b in baselines))
        parts.append(f"−/+ below/above the best baseline at the same budget (the one of {names} "
                     f"with the highest {best})")
    return (" Marks where the 95% interval of the paired difference on the same cases excludes 0: "
            + "; ".join(parts) + ".") if parts else ""


def markdown(spec: BenchSpec, meta: dict, rows: list[Row]) -> str:
    runtime = meta.get("runtime", {})
    lines = [f"# loopserve-edge bench: {Path(spec.model).name}", "",
             f"backend {runtime.get('backend', '?')}, n_gpu_layers {spec.n_gpu_layers}, "
             f"flash_attn {spec.flash_attn}, threads {spec.threads or 'default'}; "
             f"{spec.cases_per_task} case(s) per task, {spec.turns} question turn(s), seed {spec.seed}; "
             f"greedy replies. Updated {meta.get('updated', '?')}.", ""]
    if spec.command:
        lines += ["```sh", spec.command, "```", ""]
    for ctx in spec.ctxs:
        mine = [r for r in rows if r.ctx == ctx]
        labels = list(dict.fromkeys(r.method for r in mine))
        tasks = list(dict.fromkeys(r.task for r in mine))
        cell = {(r.task, r.method): r for r in mine}
        na = {r.method: r.status for r in mine if r.status != "ok"}
        # the dialogues of a task: every method ran on them (a cell with fewer says n=)
        cases = {t: max(cell[(t, m)].cases for m in labels) for t in tasks}
        baselines = [m for m in labels if is_baseline(m)]
        if all(m == "full" or is_baseline(m) for m in labels):
            baselines = []   # no method to compare with them: no marks to explain
        lines += [f"## Context {ctx} tokens", "",
                  "Task score: mean over cases (0-1) [95% bootstrap interval over cases] (relative to "
                  "`full`); **all tasks**: the mean of the task means (resampled within tasks)."
                  + _legend(True, baselines, "score"), "",
                  "| task | cases | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(labels)]
        for t in tasks:
            out = []
            for m in labels:
                r = cell[(t, m)]
                if m in na:
                    out.append("n/a")
                elif r.score is None:
                    out.append("—")
                else:
                    rel = "" if m == "full" or r.score_vs_full is None else f" ({r.score_vs_full:.0%})"
                    out.append(_ci(r, "score") + rel + _tail(r.score_marks, r.score_n, cases[t]))
            name = f"**{t}**" if t == ALL else t
            lines.append(f"| {name} | {cases[t]} | " + " | ".join(out) + " |")
        lines += [""] + [f"{m}: {why}" for m, why in na.items()] + ([""] if na else [])
        others = [m for m in labels if m != "full"]
        lines += ["Fidelity to `full` (teacher-forced along its replies), mean over cases [95% interval]: "
                  "same greedy token / mean KL(full ‖ method)."
                  + _legend(False, baselines, "same-greedy share"), "",
                  "| task | cases | " + " | ".join(others) + " |", "|---|---:|" + "---:|" * len(others)]
        for t in tasks:
            out = []
            for m in others:
                r = cell[(t, m)]
                if m in na:
                    out.append("n/a")
                elif r.same_greedy is None:
                    out.append("—")
                else:
                    out.append(f"{_ci(r, 'same_greedy', '{:.0%}')} / {_ci(r, 'mean_kl', '{:.3f}')}"
                               + _tail(r.same_greedy_marks, r.fidelity_n, cases[t]))
            name = f"**{t}**" if t == ALL else t
            lines.append(f"| {name} | {cases[t]} | " + " | ".join(out) + " |")
        later = [m for m in others if m not in na and cell[(ALL, m)].later_same_greedy is not None]
        if later:
            lines += ["", "Fidelity in the turns after the first only, all tasks: those run over a cache cut "
                      "in an earlier turn, whenever a method makes its first cut (a `defer_cut` longer "
                      "than a reply decodes the whole first reply over the uncut input).", "",
                      "| method | same greedy token | mean KL |", "|---|---:|---:|"]
            lines += [f"| {m} | {_ci(cell[(ALL, m)], 'later_same_greedy', '{:.1%}')} | "
                      f"{_ci(cell[(ALL, m)], 'later_mean_kl', '{:.3f}')} |" for m in later]
        lines += ["", "Cost (mean over all cases; TTFT of the first turn, which prefills the material, and "
                  "of later turns; KV cells held after the last turn):", "",
                  "| method | TTFT turn 1 ms | TTFT later ms | decode tok/s | KV cells | state file MB "
                  "| peak RSS MB | prefill density | errors |", "|---|" + "---:|" * 8]
        for m in labels:
            r = cell[(ALL, m)]
            if m in na:
                lines.append(f"| {m} | {na[m]} |" + " |" * 7)
                continue
            lines.append(f"| {m} | {_f(r.ttft_first_ms, '{:.0f}')} | {_f(r.ttft_later_ms, '{:.0f}')} | "
                         f"{_f(r.decode_tps, '{:.1f}')} | {_f(r.kv_cells, '{:.0f}')} | "
                         f"{_f(r.state_mb, '{:.1f}')} | {_f(r.peak_rss_mb, '{:.0f}')} | "
                         f"{_f(r.prefill_density)} | {r.errors} |")
        lines.append("")
    return "\n".join(lines)


def write_report(out: Path, log=print, with_plots: bool = True) -> list[Row]:
    """summary.md, summary.csv and plots/ (unless `with_plots` is False) from what the folder holds."""
    out = Path(out)
    spec, meta, cases, records = load(out)
    rows = summarise(spec, cases, records)
    (out / "summary.md").write_text(markdown(spec, meta, rows))
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow(["" if x is None else (round(x, 6) if isinstance(x, float) else x) for x in r.csv()])
    if not with_plots:
        return rows
    totals = [r for r in rows if r.task == ALL and r.status == "ok"]
    made = plots.write_plots(out / "plots", spec, totals, cases, records)
    if made is None:
        log("plots skipped: matplotlib is not installed (pip install matplotlib)")
    return rows
