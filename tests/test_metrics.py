"""lanskap.metrics against the reference values in the project's metric notes and against clean-fid."""

import numpy as np
import pytest
from cleanfid import fid as cleanfid

from lanskap import metrics

# clean-fid 0.1.35 calls scipy.linalg.sqrtm(..., disp=False), deprecated in scipy 1.17
pytestmark = pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return metrics.l2_normalise(rng.normal(size=(n, d)))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# --- CMMD ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cosine, expected", [(0.5, 9.975041615), (0.0, 19.900332502), (-1.0, 39.602653386)])
def test_cmmd_of_two_unit_vectors(cosine, expected):
    x = np.array([[1.0, 0.0]])
    y = np.array([[cosine, np.sqrt(1 - cosine**2)]])
    assert metrics.cmmd(x, y) == pytest.approx(expected, abs=1e-9)
    assert metrics.cmmd(x, y) == pytest.approx(2000 * (1 - np.exp(-(1 - cosine) / 100)), rel=1e-12)


def test_cmmd_of_basis_and_its_negation_biased_and_unbiased():
    x = np.eye(2)
    assert metrics.cmmd(x, -x) == pytest.approx(19.801326693, abs=1e-9)
    assert metrics.cmmd(x, -x, unbiased=True) == pytest.approx(9.851160442, abs=1e-9)


def test_cmmd_of_a_set_with_itself_is_zero_biased(rng):
    x = unit_rows(rng, 7, 16)
    assert metrics.cmmd(x, x.copy()) == pytest.approx(0.0, abs=1e-12)


def test_cmmd_is_symmetric_and_row_order_free(rng):
    x, y = unit_rows(rng, 9, 16), unit_rows(rng, 13, 16)
    for unbiased in (False, True):
        value = metrics.cmmd(x, y, unbiased=unbiased)
        assert metrics.cmmd(y, x, unbiased=unbiased) == pytest.approx(value, rel=1e-12)
        assert metrics.cmmd(rng.permutation(x), rng.permutation(y), unbiased=unbiased) == pytest.approx(value, rel=1e-12)


def test_unbiased_cmmd_is_closer_to_zero_at_small_n_for_one_distribution():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        x, y = unit_rows(rng, 10, 32), unit_rows(rng, 10, 32)
        assert abs(metrics.cmmd(x, y, unbiased=True)) < metrics.cmmd(x, y)


def test_unbiased_cmmd_needs_two_rows_per_set():
    with pytest.raises(ValueError):
        metrics.cmmd(np.eye(2)[:1], np.eye(2), unbiased=True)


def test_l2_normalise_gives_unit_rows_and_refuses_zero_rows(rng):
    assert np.linalg.norm(metrics.l2_normalise(rng.normal(size=(5, 3)) * 7), axis=1) == pytest.approx(np.ones(5))
    with pytest.raises(ValueError):
        metrics.l2_normalise(np.zeros((1, 3)))


# --- Frechet distance ---------------------------------------------------------------------------------

DIAG_COV = np.diag([1.0, 4.0])
DENSE_COV = np.array([[2.5, 1.5], [1.5, 2.5]])


def test_frechet_distance_of_reference_covariances():
    zeros = np.zeros(2)
    assert metrics.frechet_distance_from_stats(zeros, DIAG_COV, zeros, DENSE_COV) == pytest.approx(0.9446148618625827, abs=1e-12)
    assert metrics.frechet_distance_from_stats(np.array([3.0, 4.0]), DIAG_COV, zeros, DENSE_COV) == pytest.approx(25.944614861862583, abs=1e-12)


def test_frechet_distance_uses_sample_covariance_ddof_1():
    x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert metrics.frechet_distance(x, 2 * x) == pytest.approx(4 / 3, abs=1e-12)  # ddof = 0 would give 1.0


@pytest.mark.parametrize("n, d", [(300, 16), (60, 40)])
def test_frechet_distance_matches_cleanfid(rng, n, d):
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated, unequal-variance features
    x = np.maximum(rng.normal(size=(n, d)) @ mixing, 0)
    y = np.maximum(rng.normal(size=(n + 7, d)) @ mixing + 0.1, 0)
    reference = cleanfid.frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert metrics.frechet_distance(x, y) == pytest.approx(reference, abs=1e-6)
    assert metrics.frechet_distance(rng.permutation(x), rng.permutation(y)) == pytest.approx(reference, abs=1e-6)


def test_frechet_distance_with_fewer_samples_than_dimensions(rng):
    # rank-deficient covariances: the real regime of small test sets (clean-fid's sqrtm is fragile here)
    x, y = rng.normal(size=(5, 64)), rng.normal(size=(6, 64))
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert np.isfinite(metrics.frechet_distance(x, y)) and metrics.frechet_distance(x, y) > 0


# --- KID ----------------------------------------------------------------------------------------------

def test_kid_matches_cleanfid_when_subsets_are_whole_sets(rng):
    # with m == n <= max_subset_size every subset is a permutation of the whole set: no randomness
    x, y = rng.normal(size=(40, 12)), rng.normal(size=(40, 12)) + 0.3
    mean, std = metrics.kid(x, y, num_subsets=5)
    assert mean == pytest.approx(cleanfid.kernel_distance(x, y, num_subsets=5), abs=1e-6)
    assert std == pytest.approx(0.0, abs=1e-9)
    assert metrics.kid(rng.permutation(x), rng.permutation(y), num_subsets=5)[0] == pytest.approx(mean, abs=1e-9)


def test_kid_is_seeded_and_spreads_over_proper_subsets(rng):
    x, y = rng.normal(size=(50, 8)), rng.normal(size=(60, 8))
    first = metrics.kid(x, y, num_subsets=20, max_subset_size=10, seed=3)
    assert metrics.kid(x, y, num_subsets=20, max_subset_size=10, seed=3) == first
    assert first != metrics.kid(x, y, num_subsets=20, max_subset_size=10, seed=4)
    assert first[1] > 0


# --- CLIP score ---------------------------------------------------------------------------------------

def test_clip_score_is_mean_cosine_times_100_and_scale_free(rng):
    images, texts = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    cosines = np.sum(metrics.l2_normalise(images) * metrics.l2_normalise(texts), axis=1)
    expected = max(100 * cosines.mean(), 0.0)
    assert metrics.clip_score(images, texts) == pytest.approx(expected, rel=1e-12)
    assert metrics.clip_score(3.5 * images, 0.2 * texts) == pytest.approx(expected, rel=1e-12)


def test_clip_score_clamps_after_the_mean():
    text = np.array([[1.0, 0.0]] * 2)
    assert metrics.clip_score(np.array([[-1.0, 0.0], [0.0, 1.0]]), text) == 0.0  # mean cosine -0.5
    mixed = np.array([[-0.5, np.sqrt(0.75)], [1.0, 0.0]])  # cosines -0.5 and 1: the negative one counts
    assert metrics.clip_score(mixed, text) == pytest.approx(25.0, rel=1e-12)


# --- LoRA-minus-base resampling and permutation -------------------------------------------------------

def paired_scores(rng: np.random.Generator, n: int, effect: float) -> tuple[np.ndarray, np.ndarray]:
    base = rng.normal(size=n)
    return base + effect + 0.5 * rng.normal(size=n), base


def test_resampling_interval_is_deterministic_and_as_wide_as_the_standard_error(rng):
    lora, base = paired_scores(rng, 40, effect=1.0)
    differences = lora - base

    def mean_gap(prompts):
        return float(differences[prompts].mean())

    low, high = metrics.paired_resampling_interval(mean_gap, 40, num_resamples=400, seed=7)
    assert (low, high) == metrics.paired_resampling_interval(mean_gap, 40, num_resamples=400, seed=7)
    assert low < differences.mean() < high and low > 0
    normal_width = 2 * 1.96 * differences.std(ddof=1) / np.sqrt(40)
    assert high - low == pytest.approx(normal_width, rel=0.2)


def test_resampling_interval_passes_sorted_distinct_prompts_and_needs_three():
    seen = []
    metrics.paired_resampling_interval(lambda prompts: seen.append(prompts) or 0.0, 10, num_resamples=5)
    assert all(len(p) == 8 and np.all(np.diff(p) > 0) for p in seen[:-1])
    with pytest.raises(ValueError):
        metrics.paired_resampling_interval(lambda prompts: 0.0, 2)


def test_permutation_pvalue_is_deterministic_small_for_an_effect_large_without(rng):
    def swap_gap(lora, base):
        return lambda swap: float(np.mean(np.where(swap, base - lora, lora - base)))

    with_effect = swap_gap(*paired_scores(rng, 20, effect=1.0))
    without_effect = swap_gap(*paired_scores(rng, 20, effect=0.0))
    assert metrics.permutation_pvalue(with_effect, 20, seed=5) == metrics.permutation_pvalue(with_effect, 20, seed=5)
    assert metrics.permutation_pvalue(with_effect, 20) == pytest.approx(1 / 201)
    assert metrics.permutation_pvalue(without_effect, 20) > 0.2
    identical = swap_gap(np.ones(20), np.ones(20))
    assert metrics.permutation_pvalue(identical, 20) == 1.0


def test_permutation_pvalue_of_a_cmmd_gap_as_a_caller_builds_it(rng):
    test = unit_rows(rng, 12, 16)
    lora = metrics.l2_normalise(test + 0.3 * rng.normal(size=test.shape))  # close to its prompt's test image
    drift = np.zeros(16)
    drift[0] = 1.0
    base = metrics.l2_normalise(test + drift + 0.3 * rng.normal(size=test.shape))  # off in one common direction

    def swapped_gap(swap):
        rows = swap[:, None]
        return metrics.cmmd(np.where(rows, base, lora), test) - metrics.cmmd(np.where(rows, lora, base), test)

    assert swapped_gap(np.zeros(12, dtype=bool)) < 0
    assert metrics.permutation_pvalue(swapped_gap, 12, num_permutations=100) < 0.05
