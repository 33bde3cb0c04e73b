"""Ablation variants for `loopserve-edge bench` that differ from a package method by an
environment variable the runtime reads at every cut (not in the package): registered before the
bench CLI runs, each variant marked by a `chunk_probe` value, which only budgeted prefill reads
and a sliding-window model never uses (any value but the default, 32, which every other method
has); the variable is set while a marked variant's runs decode
and reset for every other method's.

    variant(package method, name, description, **options)   (a plain variant, no variable)
    run(env, on, off, mark, {name: (package method, description)})
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
