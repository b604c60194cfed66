"""Statistics across seeds: the formulas against scipy, and what they claim, by simulating many sweeps."""

import numpy as np
import pytest
from scipy import stats

from lanskap.core.errors import UserError
from lanskap.sweep.seed_stats import paired_difference, summarise, welch_difference

SIMULATED_SWEEPS = 4000  # binomial sd of a 0.95 rate over 4000 sweeps: 0.0034; of 0.05: 0.0034
TOLERANCE = 0.015  # over 4 sd: a correct method fails this by chance about once in 30000 runs


def test_summary_matches_scipy():
    values = [0.31, 0.27, 0.35, 0.22, 0.30]
    summary = summarise(values, confidence=0.9)
    low, high = stats.t.interval(0.9, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert summary.n == 5
    assert summary.mean == pytest.approx(np.mean(values), rel=1e-12)
    assert summary.sd == pytest.approx(np.std(values, ddof=1), rel=1e-12)
    assert (summary.ci_low, summary.ci_high) == pytest.approx((low, high), rel=1e-12)


def test_welch_matches_scipy():
    a, b = [5.1, 4.7, 5.9], [6.3, 7.9, 6.1, 8.8]
    difference = welch_difference(a, b, confidence=0.95)
    reference = stats.ttest_ind(b, a, equal_var=False)
    interval = reference.confidence_interval(0.95)
    assert difference.method == "welch"
    assert difference.difference == pytest.approx(np.mean(b) - np.mean(a), rel=1e-12)
    assert difference.pvalue == pytest.approx(reference.pvalue, rel=1e-9)
    assert difference.dof == pytest.approx(reference.df, rel=1e-12)
    assert (difference.ci_low, difference.ci_high) == pytest.approx((interval.low, interval.high), rel=1e-9)


def test_paired_matches_scipy():
    a, b = [5.1, 4.7, 5.9, 5.0], [5.6, 5.0, 6.6, 5.2]
    difference = paired_difference(a, b, confidence=0.95)
    reference = stats.ttest_rel(b, a)
    interval = reference.confidence_interval(0.95)
    assert difference.method == "paired" and difference.dof == 3
    assert difference.pvalue == pytest.approx(reference.pvalue, rel=1e-9)
    assert (difference.ci_low, difference.ci_high) == pytest.approx((interval.low, interval.high), rel=1e-9)


def test_pairing_removes_the_shared_seed_effect():
    """Each seed shifts both settings alike (a lucky seed is lucky for both): paired sees the constant gap."""
    seed_effect = np.array([0.0, 3.0, -2.0, 5.0])
    a, b = 10 + seed_effect, 10.5 + seed_effect + np.array([0.01, -0.02, 0.02, -0.01])
    assert paired_difference(a, b).pvalue < 1e-4
    assert welch_difference(a, b).pvalue > 0.5  # negative control: unpaired, the seed spread hides it


@pytest.mark.parametrize("function", [paired_difference, welch_difference])
def test_no_spread_gives_no_pvalue(function):
    difference = function([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
    assert difference.difference == 1.0 and np.isnan(difference.pvalue)


def test_fewer_than_two_seeds_is_a_clear_error():
    with pytest.raises(UserError, match=r"lora.rank=4 fid: 1 seed\(s\); .*at least 2"):
        summarise([3.0], what="lora.rank=4 fid")
    with pytest.raises(UserError, match="at least 2"):
        welch_difference([1.0, 2.0], [3.0])
    with pytest.raises(UserError, match="one value per seed"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(UserError, match="not finite"):
        summarise([1.0, float("nan")])


def simulated_sweeps(seeds: int, shift: float = 0.0, sweeps: int = SIMULATED_SWEEPS):
    """Per-seed metric values of many sweeps of two settings: normal seed noise (sd 2) around 7 and 7 + shift."""
    rng = np.random.default_rng(1234)
    return rng.normal(7.0, 2.0, (sweeps, seeds)), rng.normal(7.0 + shift, 2.0, (sweeps, seeds))


@pytest.mark.parametrize("seeds", [3, 5])
def test_interval_covers_the_true_mean_95_percent_of_sweeps(seeds):
    a, _ = simulated_sweeps(seeds)
    summaries = [summarise(values) for values in a]
    coverage = np.mean([summary.ci_low <= 7.0 <= summary.ci_high for summary in summaries])
    assert abs(coverage - 0.95) < TOLERANCE, coverage
    # negative control: the same sweeps with a normal (1.96) interval cover visibly less, so this test can fail
    normal = np.mean([abs(summary.mean - 7.0) <= 1.96 * summary.sd / np.sqrt(seeds) for summary in summaries])
    assert normal < 0.95 - 2 * TOLERANCE, normal


# paired: exact for normal draws; Welch's approximate degrees of freedom make it conservative at 3 seeds a side
# (about 0.037 of sweeps at a nominal 0.05), never liberal
@pytest.mark.parametrize(
    ("function", "low", "high"),
    [(paired_difference, 0.05 - TOLERANCE, 0.05 + TOLERANCE), (welch_difference, 0.025, 0.05 + TOLERANCE)],
)
def test_no_difference_is_found_in_5_percent_of_sweeps(function, low, high):
    differences = [function(x, y) for x, y in zip(*simulated_sweeps(3))]
    rejected = np.mean([difference.pvalue < 0.05 for difference in differences])
    assert low < rejected < high, rejected
    covered = np.mean([difference.ci_low <= 0 <= difference.ci_high for difference in differences])
    assert covered == pytest.approx(1 - rejected, abs=1e-12)  # the interval and the p-value agree
    # directional control: a real difference of 5 sd of a seed is found far more often
    a, b = simulated_sweeps(3, shift=10.0, sweeps=500)
    assert np.mean([function(x, y).pvalue < 0.05 for x, y in zip(a, b)]) > 0.5
