"""Statistics for comparing methods: paired tests across users, spread across seeds."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
from scipy import stats as _scipy_stats

__all__ = ["WilcoxonResult", "format_mean_std", "mean_std", "wilcoxon_paired"]


class WilcoxonResult(NamedTuple):
    """Outcome of :func:`wilcoxon_paired`.

    ``n`` is the number of users with a finite figure for both methods (before zero
    differences are dropped by the test); ``median_difference`` is ``median(a - b)`` over
    those users, so its sign says which method is ahead.
    """

    statistic: float
    p_value: float
    n: int
    median_difference: float


def wilcoxon_paired(a, b, alternative: str = "two-sided") -> WilcoxonResult:
    """Paired Wilcoxon signed-rank test of per-user figures ``a`` vs ``b``.

    ``a[i]`` and ``b[i]`` must belong to the same user. Users where either figure is NaN
    (e.g. no relevant item) are left out of the pair. Zero differences are dropped
    (Wilcoxon's original treatment, scipy's ``zero_method="wilcox"``); so are differences of
    rounding error only (``|a - b| <= 1e-9 * max(1, |b|)``): a per-user figure averaged
    over seeds, such as three equal recalls of 0.1 (mean 0.10000000000000002), must tie with
    the same figure, not count as a tiny win. When *every* difference is zero the methods are
    indistinguishable on these users and ``p = 1``.
    With no usable pair the result is all NaN rather than an exception, so a report can
    still be written.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-d arrays of the same length (one figure per user), "
                         f"got shapes {a.shape} and {b.shape}")
    if alternative not in ("two-sided", "less", "greater"):
        raise ValueError(f"alternative must be 'two-sided', 'less' or 'greater', got {alternative!r}")
    keep = np.isfinite(a) & np.isfinite(b)
    diff = a[keep] - b[keep]
    diff[np.abs(diff) <= 1e-9 * np.maximum(1.0, np.abs(b[keep]))] = 0.0
    n = int(diff.size)
    if n == 0:
        return WilcoxonResult(float("nan"), float("nan"), 0, float("nan"))
    median = float(np.median(diff))
    if not np.any(diff != 0):
        return WilcoxonResult(0.0, 1.0, n, median)
    result = _scipy_stats.wilcoxon(diff, zero_method="wilcox", alternative=alternative)
    return WilcoxonResult(float(result.statistic), float(result.pvalue), n, median)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) over seeds, ignoring NaN.

    The sample std estimates the seed-to-seed spread rather than describing just these
    seeds; a single value (a deterministic method run once) has std 0. No finite value
    gives ``(nan, nan)``.
    """
    array = np.asarray(list(values), dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return float("nan"), float("nan")
    if array.size == 1:
        return float(array[0]), 0.0
    return float(array.mean()), float(array.std(ddof=1))


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``"0.832 ± 0.004"``; just ``"0.832"`` when std is 0 (one seed); ``"–"`` for NaN."""
    if not np.isfinite(mean):
        return "–"
    if not np.isfinite(std) or std == 0:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
