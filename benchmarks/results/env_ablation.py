"""Ablation variants for `loopserve-edge bench` that differ from a package method by an
environment variable the runtime reads at every cut (not in the package): registered before the
bench CLI runs, each variant marked by a `chunk_probe` value, which only budgeted prefill reads
and a sliding-window model never uses (any value but the default, 32, which every other method
has); the variable is set while a marked variant's runs decode
and reset for every other method's.

    variant(package method, name, description, **options)   (a plain variant, no variable)
    run(env, on, off, mark, {name: (package method, description)})

and variants that change what a head-wise cut leaves, through the sequence's state:

    edit_head_cuts(modes, edit)   (each marked cut: edit(evictor, dialogue, state before,
                                   state after, kept rows, scores, mode) -> (state, hidden))
    bench(package method, {mark: (name, description)})
"""
import dataclasses
import os
import sys

from loopserve_edge import cli  # isort: skip  (the package before numpy: tests/conftest.py)
from loopserve_edge.bench import harness  # isort: skip
from loopserve_edge.bench import methods as M  # isort: skip


def variant(base: str, name: str, describe: str, **options) -> None:
    """Register `name`: the package method `base` with `options` changed."""
    m = M.METHODS[base]
    M.METHODS[name] = dataclasses.replace(m, name=name, describe=describe,
                                          options=tuple({**dict(m.options), **options}.items()))


def edit_head_cuts(modes: dict, edit) -> None:
    """Wrap the head-wise cut: for a config whose `chunk_probe` is a key of `modes` (uniform
    allocation, f16 K/V), the sequence's state before the cut and after it, with the rows each
    head kept (choose_keep_rows's answer) and the cut's scores, go to `edit`, whose state is
    loaded in place of the cut's and whose hidden rows (None: none) are set."""
    from loopserve_edge import eviction

    cut_heads, choose = eviction.Evictor._cut_heads, eviction.choose_keep_rows

    def wrapped(self, dlg, rows, budget):
        if self.cfg.chunk_probe not in modes or self.cfg.allocation != "uniform":
            return cut_heads(self, dlg, rows, budget)
        assert int(self.llm.context_params.type_k) == 1 == int(self.llm.context_params.type_v)  # f16 rows
        before = self.llm.sequence_state(self.llm.make_resident(dlg))
        seen = {}

        def keep(r, c, b):
            seen["sel"] = choose(r, c, b)
            return seen["sel"]

        eviction.choose_keep_rows = keep
        try:
            cut_heads(self, dlg, rows, budget)
        finally:
            eviction.choose_keep_rows = choose
        after = self.llm.sequence_state(self.llm.make_resident(dlg))
        state, hidden = edit(self, dlg, before, after, seen["sel"], rows, modes[self.cfg.chunk_probe])
        self.llm.restore(dlg, state)
        if hidden is not None:
            self.llm.set_hidden(dlg, hidden)

    eviction.Evictor._cut_heads = wrapped


def bench(base: str, variants: dict[int, tuple[str, str]]) -> None:
    """Register each of {mark: (name, description)}, the package method `base` marked by that
    `chunk_probe`, and run the bench CLI with this script's arguments."""
    for mark, (name, describe) in variants.items():
        variant(base, name, describe, chunk_probe=mark)
    sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
    cli.main()


def run(env: str, on: str, off: str, mark: int, variants: dict[str, tuple[str, str]]) -> None:
    """Register the marked variants, wrap the harness to set `env`, run the bench CLI with this
    script's arguments."""
    run_method = harness._run_method

    def wrapped(spec, folder, ctx, run, cases, bar, fmt):
        os.environ[env] = on if run.config().chunk_probe == mark else off
        try:
            return run_method(spec, folder, ctx, run, cases, bar, fmt)
        finally:
            os.environ[env] = off

    harness._run_method = wrapped
    for name, (base, describe) in variants.items():
        variant(base, name, describe, chunk_probe=mark)
    sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
    cli.main()
