"""The summary of a benchmark folder: markdown and CSV tables (score and fidelity per task
x method, relative to full; costs per method), and the plots (plots.py)."""
from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from . import plots
from .dialogues import Case
from .harness import BenchSpec, read_jsonl
from .methods import Run, expand

ALL = "all tasks"
COLUMNS = ("ctx", "task", "method", "budget", "alpha", "status", "cases", "errors", "score",
           "score_vs_full", "same_greedy", "mean_kl", "ttft_first_ms", "ttft_later_ms",
           "decode_tps", "kv_cells", "state_mb", "peak_rss_mb", "prefill_density")


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

    @classmethod
    def of(cls, ctx, task, run: Run, records: list[dict]) -> "Row":
        ok = [r for r in records if "error" not in r]
        turns = [t for r in ok for t in r["turns"]]
        fid = [r["fidelity"] for r in ok if r.get("fidelity")]
        return cls(
            ctx, task, run.label, run.budget, run.alpha, cases=len(records),
            errors=len(records) - len(ok),
            score=_mean(r.get("score") for r in ok),
            same_greedy=_mean(f["same_greedy"] for f in fid),
            mean_kl=_mean(f["mean_kl"] for f in fid),
            ttft_first_ms=_mean(r["turns"][0]["ttft_s"] * 1e3 for r in ok),
            ttft_later_ms=_mean(t["ttft_s"] * 1e3 for r in ok for t in r["turns"][1:]),
            decode_tps=_mean(t["decode_tps"] for t in turns if t["decode_tokens"] >= 4),
            kv_cells=_mean(r["turns"][-1]["kv_cells"] for r in ok),
            state_mb=_mean(r["state_bytes"] / 1e6 for r in ok),
            peak_rss_mb=_mean(r.get("peak_rss_mb") for r in ok),
            prefill_density=_mean(t.get("prefill_density") for t in turns))

    def csv(self) -> list:
        return [getattr(self, c) for c in COLUMNS]


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
    rows = []
    for ctx in spec.ctxs:
        tasks = [t for t in spec.tasks if (ctx, t) in wanted]
        for run in expand(spec.methods, spec.budgets, spec.alphas):
            why = run.unavailable()
            mine = []
            for task in tasks:
                row = Row.of(ctx, task, run, by.get((ctx, task, run.label), []))
                if why:
                    row.status = f"n/a: {why}"
                mine.append(row)
            total = Row.of(ctx, ALL, run, [r for t in tasks for r in by.get((ctx, t, run.label), [])])
            total.score = _mean(r.score for r in mine)
            total.status = mine[0].status if mine else "ok"
            rows += mine + [total]
    full = {(r.ctx, r.task): r.score for r in rows if r.method == "full"}
    for r in rows:
        f = full.get((r.ctx, r.task))
        if r.score is not None and f:
            r.score_vs_full = r.score / f
    return rows


def _f(x, fmt="{:.2f}", none="—"):
    return none if x is None else fmt.format(x)


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
        lines += [f"## Context {ctx} tokens", "",
                  "Task score (mean over cases, 0-1; in parentheses: relative to `full`):", "",
                  "| task | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        for t in tasks:
            out = []
            for m in labels:
                r = cell[(t, m)]
                if m in na:
                    out.append("n/a")
                elif m == "full" or r.score_vs_full is None:
                    out.append(_f(r.score))
                else:
                    out.append(f"{_f(r.score)} ({r.score_vs_full:.0%})")
            name = f"**{t}**" if t == ALL else t
            lines.append(f"| {name} | " + " | ".join(out) + " |")
        lines += [""] + [f"{m}: {why}" for m, why in na.items()] + ([""] if na else [])
        others = [m for m in labels if m != "full"]
        lines += ["Fidelity to `full` (teacher-forced along its replies): same greedy token / "
                  "mean KL(full ‖ method):", "",
                  "| task | " + " | ".join(others) + " |", "|---|" + "---:|" * len(others)]
        for t in tasks:
            out = ["n/a" if m in na else
                   (f"{_f(cell[(t, m)].same_greedy, '{:.0%}')} / {_f(cell[(t, m)].mean_kl, '{:.3f}')}"
                    if cell[(t, m)].same_greedy is not None else "—") for m in others]
            name = f"**{t}**" if t == ALL else t
            lines.append(f"| {name} | " + " | ".join(out) + " |")
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


def write_report(out: Path, log=print) -> list[Row]:
    """summary.md, summary.csv and plots/ from what the folder holds."""
    out = Path(out)
    spec, meta, cases, records = load(out)
    rows = summarise(spec, cases, records)
    (out / "summary.md").write_text(markdown(spec, meta, rows))
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow(["" if x is None else (round(x, 6) if isinstance(x, float) else x) for x in r.csv()])
    totals = [r for r in rows if r.task == ALL and r.status == "ok"]
    made = plots.write_plots(out / "plots", spec, totals, cases, records)
    if made is None:
        log("plots skipped: matplotlib is not installed (pip install matplotlib)")
    return rows
