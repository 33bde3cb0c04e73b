"""Confidence intervals for the summary: a seeded percentile bootstrap over cases.

The case (one generated dialogue) is what the benchmark samples, so cases are what is
resampled; the turns of one dialogue share its material and are not independent samples.
Two methods run on the same dialogues, so they are compared by the bootstrap of their
paired differences: what the cases have in common (a hard dialogue is hard for both)
cancels, and the interval is narrower than two separate ones would suggest.

The 'all tasks' figures are the mean of the task means (each task weighs the same), and
their bootstrap resamples within each task (stratified): a resample keeps every task and
its number of cases. numpy only; the same seed gives the same interval.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def _values(xs) -> np.ndarray:
    return np.array([x for x in xs if x is not None], dtype=np.float64)


def stratified_ci(groups, n_boot: int = N_BOOT, seed: int = 0,
                  level: float = LEVEL) -> tuple[float, float, float] | None:
    """(mean, lo, hi) of the mean over groups of each group's mean; groups: a sequence of
    value sequences or a mapping stratum -> values. Cases are resampled within each group.
    None values and empty groups are left out; None when nothing is left."""
    groups = groups.values() if isinstance(groups, Mapping) else groups
    strata = [x for x in map(_values, groups) if x.size]
    if not strata:
        return None
    point = float(np.mean([x.mean() for x in strata]))
    if all(x.min() == x.max() for x in strata):
        return point, point, point      # one case, or no spread: every resample is the sample
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_boot)
    for x in strata:
        boot += x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    boot /= len(strata)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    # a percentile interval of a mean holds the mean; keep it so when float sums blur it
    return point, float(min(lo, point)), float(max(hi, point))


def mean_ci(values, n_boot: int = N_BOOT, seed: int = 0,
            level: float = LEVEL) -> tuple[float, float, float] | None:
    """(mean, lo, hi) of the values (None left out); None without values, the point itself
    (lo = hi = mean) for one value."""
    return stratified_ci([values], n_boot, seed, level)


def paired_diff_ci(a, b, strata=None, n_boot: int = N_BOOT, seed: int = 0,
                   level: float = LEVEL) -> tuple[float, float, float] | None:
    """(mean of a - b, lo, hi) over the cases both have a value for, case indices resampled
    jointly (a case's two values stay together). a, b: mappings case -> value, or sequences
    aligned by case; strata (same form: case -> stratum, e.g. its task): resample within
    each stratum and average the stratum means of the differences."""
    a, b = _by_case(a), _by_case(b)
    strata = None if strata is None else _by_case(strata)
    groups: dict = {}
    for k, x in a.items():
        y = b.get(k)
        if x is not None and y is not None:
            groups.setdefault(None if strata is None else strata[k], []).append(x - y)
    return stratified_ci(groups, n_boot, seed, level)


def _by_case(x) -> Mapping:
    return x if isinstance(x, Mapping) else dict(enumerate(x))


def direction(ci: tuple[float, float, float] | None) -> int:
    """+1 / -1 when an interval of a difference lies wholly above / below 0, else 0."""
    if ci is None:
        return 0
    return 1 if ci[1] > 0 else -1 if ci[2] < 0 else 0
