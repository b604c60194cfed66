"""The statistics of a blind A/B panel: Wilson interval, exact sign test, Krippendorff's alpha.

Ties are kept apart: the win rate is LoRA wins / (LoRA wins + base wins), and the sign test asks whether that
split could come from a fair coin, over all votes or over items (summary.py: each item once, by its raters'
majority, since votes of several raters on one item are not independent). Alpha says how closely raters agree.
"""

import math
from collections import Counter, defaultdict

from scipy.stats import binom, norm

Z95 = float(norm.ppf(0.975))


def wilson_interval(wins: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (good coverage at small n, unlike wins/n +- z*se)."""
    if n == 0:
        raise ValueError("no trials")
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial p of `wins` in `wins + losses` fair-coin trials (ties already left out): the fair
    coin's distribution is symmetric, so twice the smaller tail (scipy's binomtest gives the same, far slower)."""
    return float(min(1.0, 2 * binom.cdf(min(wins, losses), wins + losses, 0.5)))


def krippendorff_alpha_nominal(ratings: dict[object, dict[object, object]]) -> float | None:
    """Krippendorff's alpha for nominal data: {unit: {rater: value}}, missing ratings allowed. None when undefined
    (fewer than two pairable values, or a single value throughout, so that no disagreement is expected)."""
    coincidences: Counter = Counter()
    for values in ratings.values():
        counts = Counter(values.values())
        m = sum(counts.values())
        if m < 2:
            continue  # a unit rated once has no pair
        for c, n_c in counts.items():
            for k, n_k in counts.items():
                coincidences[c, k] += n_c * (n_k - (c == k)) / (m - 1)
    totals: defaultdict = defaultdict(float)
    for (c, _), count in coincidences.items():
        totals[c] += count
    n = sum(totals.values())
    if n < 2:
        return None
    observed = sum(count for (c, k), count in coincidences.items() if c != k)
    expected = (n * n - sum(t * t for t in totals.values())) / (n - 1)
    if expected == 0:
        return None
    return 1.0 - observed / expected
