"""Judging a canary against production over samples of both: the Mann-Whitney U test, as Kayenta's judge uses it.

Why not scipy: ``scipy.stats`` adds about 85 MB to the controller's memory and 0.9 s to its start (measured here,
scipy 1.17.1, Python 3.11), more than birdwatch itself, for a test on a handful of numbers. This module does the
same two computations scipy's ``mannwhitneyu(method="auto")`` does — the exact distribution of U when a sample is
small and has no ties, the normal approximation with tie and continuity corrections otherwise — and
``tests/test_analysis.py`` checks it against scipy itself (a test dependency only) on thousands of samples.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Alternative = Literal["greater", "less", "two-sided"]
EXACT_UP_TO = 8  # with no ties and one sample at most this long, the exact distribution (scipy's choice too)


@dataclass(frozen=True)
class Test:
    u: float  # the canary's U statistic
    p: float  # the p-value for ``alternative`` (the canary greater than, less than, or different from production)


def ranks(values: Sequence[float]) -> tuple[list[float], list[int]]:
    """Average ranks (1-based) and the sizes of the groups of tied values."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    ties: list[int] = []
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        rank = (i + j) / 2 + 1
        for k in range(i, j + 1):
            result[order[k]] = rank
        ties.append(j - i + 1)
        i = j + 1
    return result, ties


@functools.lru_cache(maxsize=256)
def _u_counts(n1: int, n2: int) -> tuple[int, ...]:
    """How many of the C(n1+n2, n1) orderings of two untied samples give each U (0..n1*n2)."""
    if n1 == 0 or n2 == 0:
        return (1,)
    # An ordering ends with the larger value from sample 1 (which then beats all n2 of sample 2) or from sample 2.
    with_1 = _u_counts(n1 - 1, n2)
    with_2 = _u_counts(n1, n2 - 1)
    counts = [0] * (n1 * n2 + 1)
    for u, c in enumerate(with_1):
        counts[u + n2] += c
    for u, c in enumerate(with_2):
        counts[u] += c
    return tuple(counts)


def _exact_sf(u: float, n1: int, n2: int) -> float:
    """P(U >= u) for untied samples of sizes n1 and n2."""
    counts = _u_counts(n1, n2)
    start = max(0, math.ceil(u))
    return sum(counts[start:]) / math.comb(n1 + n2, n1)


def _normal_sf(u: float, n1: int, n2: int, ties: Sequence[int]) -> float:
    """P(U >= u), normal approximation with the tie correction and a continuity correction of 1/2."""
    n = n1 + n2
    tie_term = sum(t**3 - t for t in ties)
    variance = n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1)))
    if variance <= 0:
        return 1.0  # every value the same: no evidence either way
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    return statistics.NormalDist().cdf(-z)


def mann_whitney(canary: Sequence[float], production: Sequence[float], *, alternative: Alternative) -> Test:
    """Mann-Whitney U of ``canary`` against ``production``. ``greater``: is the canary stochastically greater?"""
    n1, n2 = len(canary), len(production)
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples need at least one value")
    rank, ties = ranks([*canary, *production])
    u1 = sum(rank[:n1]) - n1 * (n1 + 1) / 2
    u2 = n1 * n2 - u1
    u, factor = {"greater": (u1, 1), "less": (u2, 1), "two-sided": (max(u1, u2), 2)}[alternative]
    exact = all(t == 1 for t in ties) and min(n1, n2) <= EXACT_UP_TO
    p = _exact_sf(u, n1, n2) if exact else _normal_sf(u, n1, n2, ties)
    return Test(u=u1, p=min(1.0, max(0.0, p * factor)))


def effect(canary: Sequence[float], production: Sequence[float]) -> float:
    """How far the canary's median is from production's, in the metric's own units."""
    return statistics.median(canary) - statistics.median(production)


def smallest_p(n1: int, n2: int, *, alternative: Alternative) -> float:
    """The smallest p-value samples of these sizes can give (all of one above all of the other): below it no test
    can say anything, so a judge must not read "not significant" as "healthy"."""
    one_sided = 1 / math.comb(n1 + n2, n1)
    return min(1.0, 2 * one_sided) if alternative == "two-sided" else one_sided
