"""The Mann-Whitney U test birdwatch uses to judge a canary against production: on samples with known U and p
(textbook values), and against scipy's own ``mannwhitneyu`` (a test dependency only) on many random samples."""

from __future__ import annotations

import random

import pytest
from scipy.stats import mannwhitneyu

from birdwatch.analysis import Alternative, effect, mann_whitney, ranks, smallest_p

ALTERNATIVES: tuple[Alternative, ...] = ("greater", "less", "two-sided")


def test_ranks_average_ties() -> None:
    assert ranks([3.0, 1.0, 3.0, 2.0]) == ([3.5, 1.0, 3.5, 2.0], [1, 1, 2])


@pytest.mark.parametrize(
    ("canary", "production", "alternative", "u", "p"),
    [
        # All of the canary above all of production, 4 and 4: U = 16, P = 1 / C(8, 4) = 1/70.
        ([5, 6, 7, 8], [1, 2, 3, 4], "greater", 16, 1 / 70),
        ([5, 6, 7, 8], [1, 2, 3, 4], "two-sided", 16, 2 / 70),
        ([5, 6, 7, 8], [1, 2, 3, 4], "less", 16, 1.0),
        # Interleaved 3 and 3 (1 4 | 2 5 | 3 6 -> canary 2 4 6): U1 = 0+1+2... = 6 of 9; P(U >= 6) = 7/20.
        ([2, 4, 6], [1, 3, 5], "greater", 6, 7 / 20),
    ],
)
def test_known_values(
    canary: list[float], production: list[float], alternative: Alternative, u: float, p: float
) -> None:
    result = mann_whitney(canary, production, alternative=alternative)
    assert result.u == u
    assert result.p == pytest.approx(p)


def test_all_values_equal_is_no_evidence() -> None:
    assert mann_whitney([0.1] * 5, [0.1] * 5, alternative="greater").p == 1.0


def test_effect_is_the_difference_of_medians() -> None:
    assert effect([0.2, 0.3, 0.9], [0.1, 0.1, 0.4]) == pytest.approx(0.2)


@pytest.mark.parametrize("seed", range(20))
def test_agrees_with_scipy(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        n1, n2 = rng.randint(1, 14), rng.randint(1, 14)
        # Some samples continuous (exact method when small), some rounded so that ties appear (normal approximation).
        digits = rng.choice([None, 1, 2])
        shift = rng.uniform(-0.5, 0.5)
        canary = [rng.gauss(shift, 1) for _ in range(n1)]
        production = [rng.gauss(0, 1) for _ in range(n2)]
        if digits is not None:
            canary, production = [round(v, digits) for v in canary], [round(v, digits) for v in production]
        for alternative in ALTERNATIVES:
            ours = mann_whitney(canary, production, alternative=alternative)
            theirs = mannwhitneyu(canary, production, alternative=alternative, method="auto")
            assert ours.u == pytest.approx(float(theirs.statistic)), (canary, production, alternative)
            assert ours.p == pytest.approx(float(theirs.pvalue), rel=1e-9, abs=1e-12), (canary, production, alternative)


def test_smallest_p_is_the_most_extreme_ordering() -> None:
    assert smallest_p(3, 3, alternative="greater") == pytest.approx(1 / 20)
    assert smallest_p(4, 4, alternative="two-sided") == pytest.approx(2 / 70)
    assert mann_whitney([4, 5, 6], [1, 2, 3], alternative="greater").p == pytest.approx(
        smallest_p(3, 3, alternative="greater")
    )
