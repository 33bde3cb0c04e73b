"""`loopserve-edge bench`: options to a BenchSpec, the progress bar, the report."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from ..paths import default_model
from .harness import BenchError, BenchSpec, run_bench
from .methods import METHODS
from .report import write_report
from .tasks import FAMILIES, TASKS


def _names(text: str, known, what: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if items == ("all",):
        return tuple(known)
    for x in items:
        if x not in known:
            raise BenchError(f"unknown {what} {x!r}; choose from {', '.join(known)} (or all)")
    return items


def _numbers(text: str, what: str, kind=int, fractions: bool = False) -> tuple:
    """Comma-separated numbers: ints may end in K (x1024); with `fractions`, a/b is a
    fraction (of the context length, for budgets)."""
    out = []
    for x in (x.strip() for x in text.split(",") if x.strip()):
        scale = 1
        try:
            if fractions and "/" in x:
                num, den = x.split("/")
                out.append(float(num) / float(den))
                if not 0 < out[-1] < 1:
                    raise BenchError(f"{what}: {x!r} is not a fraction between 0 and 1")
                continue
            if kind is int and x[-1:].lower() == "k":
                x, scale = x[:-1], 1024
            out.append(kind(float(x) * scale) if kind is int else kind(x))
        except (ValueError, ZeroDivisionError):
            raise BenchError(f"{what}: {x!r} is not a number") from None
    if not out:
        raise BenchError(f"{what}: give at least one value")
    return tuple(out)


def _listing() -> str:
    lines = ["tasks:"]
    lines += [f"  {name:18} {f.measures} [{', '.join(f.positions)}]" for name, f in FAMILIES.items()]
    lines.append("methods:")
    lines += [f"  {name:18} {m.describe}" for name, m in METHODS.items()]
    return "\n".join(lines)


def main(model, *, tasks, methods, ctx, turns, budgets, alphas, positions, seed, cases_per_task,
         out, fidelity, n_gpu_layers, threads, flash_attn, report_only, list_, split="dev", plots=True,
         prompt_format="auto", levels=None) -> None:
    if list_:
        click.echo(_listing())
        return
    out = Path(out)
    if report_only:
        if not (out / "bench.json").is_file():
            raise BenchError(f"{out} holds no benchmark results (no bench.json)")
        write_report(out, log=lambda m: click.echo(m, err=True), with_plots=plots)
        click.echo((out / "summary.md").read_text())
        return
    spec = BenchSpec(
        model=str(Path(model) if model else default_model()),
        tasks=_names(tasks, TASKS, "task"), methods=_names(methods, METHODS, "method"),
        ctxs=_numbers(ctx, "--ctx"), turns=turns, budgets=_numbers(budgets, "--budgets", fractions=True),
        alphas=_numbers(alphas, "--alphas", float),
        positions=_names(positions, ("before", "after", "later"), "question position") if positions else None,
        seed=seed, cases_per_task=cases_per_task, split=split, prompt_format=prompt_format, levels=levels,
        fidelity=fidelity, n_gpu_layers=n_gpu_layers,
        threads=threads, flash_attn=flash_attn,
        command=shlex.join(["loopserve-edge", *sys.argv[1:]]))

    def progress(n):
        return click.progressbar(length=n, label="bench", file=sys.stderr, show_pos=True, show_eta=True)

    run_bench(spec, out, progress=progress, log=lambda m: click.echo(m, err=True))
    write_report(out, log=lambda m: click.echo(m, err=True), with_plots=plots)
    click.echo((out / "summary.md").read_text())
