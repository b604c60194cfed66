"""lanskap.evaluate.metrics against the reference values in the project's metric notes and against clean-fid."""

import numpy as np
import pytest
from cleanfid import fid as cleanfid

from lanskap.evaluate import kid, metrics

# clean-fid 0.1.35 calls scipy.linalg.sqrtm(..., disp=False), deprecated in scipy 1.17
pytestmark = pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return metrics.l2_normalise(rng.normal(size=(n, d)))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# --- CMMD ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cosine", "expected"), [(0.5, 9.975041615), (0.0, 19.900332502), (-1.0, 39.602653386)])
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
        assert metrics.cmmd(rng.permutation(x), rng.permutation(y), unbiased=unbiased) == pytest.approx(
            value, rel=1e-12
        )


def test_unbiased_cmmd_is_closer_to_zero_at_small_n_for_one_distribution():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        x, y = unit_rows(rng, 10, 32), unit_rows(rng, 10, 32)
        assert abs(metrics.cmmd(x, y, unbiased=True)) < metrics.cmmd(x, y)


def dense_cmmd(x: np.ndarray, y: np.ndarray, unbiased: bool) -> float:
    """CMMD from the three dense kernel matrices, as the metric notes define it."""
    kernel = lambda a, b: np.exp(-np.sum((a[:, None] - b[None]) ** 2, axis=2) / 200)  # noqa: E731
    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    if unbiased:
        m, n = len(x), len(y)
        within = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    else:
        within = k_xx.mean() + k_yy.mean()
    return 1000 * (within - 2 * k_xy.mean())


@pytest.mark.parametrize("unbiased", [False, True])
def test_tiled_cmmd_equals_the_dense_formula_across_many_tiles(rng, unbiased, monkeypatch):
    x, y = unit_rows(rng, 700, 8), metrics.l2_normalise(rng.normal(size=(450, 8)) + 0.3)
    dense = dense_cmmd(x, y, unbiased)
    assert metrics.cmmd(x, y, unbiased=unbiased) == pytest.approx(dense, abs=1e-12)  # one tile per set
    monkeypatch.setattr(metrics, "TILE_ROWS", 128)  # 6 x 4 tiles for K(x, y), with a ragged last one
    assert metrics.cmmd(x, y, unbiased=unbiased) == pytest.approx(dense, abs=1e-12)


def test_kernel_sums_by_unit_match_the_dense_matrix(rng):
    x, y = rng.normal(size=(37, 3)), rng.normal(size=(23, 3))
    x_units, y_units = rng.integers(0, 5, 37), rng.integers(0, 5, 23)
    x_units[0] = 4
    sums = metrics.kernel_sums(metrics.polynomial_kernel, x, y, x_units, y_units, tile=8)
    dense = metrics.polynomial_kernel(x, y)
    for unit in range(5):
        rows, columns = x_units == unit, y_units == unit
        assert sums.rows[unit] == pytest.approx(dense[rows].sum(), rel=1e-12)
        assert sums.columns[unit] == pytest.approx(dense[:, columns].sum(), rel=1e-12)
        assert sums.within[unit] == pytest.approx(dense[np.ix_(rows, columns)].sum(), rel=1e-12)
    square = metrics.kernel_sums(metrics.polynomial_kernel, x, x, x_units, x_units, same_set=True, tile=8)
    assert square.diagonal.sum() == pytest.approx(np.trace(metrics.polynomial_kernel(x, x)), rel=1e-12)


def test_unbiased_cmmd_needs_two_rows_per_set():
    with pytest.raises(ValueError, match="n >= 2"):
        metrics.cmmd(np.eye(2)[:1], np.eye(2), unbiased=True)


def test_l2_normalise_gives_unit_rows_and_refuses_zero_rows(rng):
    assert np.linalg.norm(metrics.l2_normalise(rng.normal(size=(5, 3)) * 7), axis=1) == pytest.approx(np.ones(5))
    with pytest.raises(ValueError, match="zero"):
        metrics.l2_normalise(np.zeros((1, 3)))


# --- Frechet distance ---------------------------------------------------------------------------------

DIAG_COV = np.diag([1.0, 4.0])
DENSE_COV = np.array([[2.5, 1.5], [1.5, 2.5]])


def test_frechet_distance_of_reference_covariances():
    zeros = np.zeros(2)
    assert metrics.frechet_distance_from_stats(zeros, DIAG_COV, zeros, DENSE_COV) == pytest.approx(
        0.9446148618625827, abs=1e-12
    )
    assert metrics.frechet_distance_from_stats(np.array([3.0, 4.0]), DIAG_COV, zeros, DENSE_COV) == pytest.approx(
        25.944614861862583, abs=1e-12
    )


def test_frechet_distance_uses_sample_covariance_ddof_1():
    x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert metrics.frechet_distance(x, 2 * x) == pytest.approx(4 / 3, abs=1e-12)  # ddof = 0 would give 1.0


@pytest.mark.parametrize(("n", "d"), [(300, 16), (60, 40)])
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
    mean, _ = kid.kid(x, y, num_subsets=5)
    assert mean == pytest.approx(cleanfid.kernel_distance(x, y, num_subsets=5), abs=1e-6)
    assert kid.kid(rng.permutation(x), rng.permutation(y), num_subsets=5)[0] == pytest.approx(mean, abs=1e-9)


def test_kid_is_seeded_and_varies_with_the_subsets(rng):
    x, y = rng.normal(size=(50, 8)), rng.normal(size=(60, 8))
    units = (np.arange(50) % 25, np.arange(60) % 25)
    first = kid.kid(x, y, num_subsets=20, max_subset_size=10, seed=3, units=units)
    assert kid.kid(x, y, num_subsets=20, max_subset_size=10, seed=3, units=units) == first
    assert first[0] != kid.kid(x, y, num_subsets=20, max_subset_size=10, seed=4, units=units)[0]


@pytest.mark.parametrize("max_subset_size", [1000, 12])
def test_kid_standard_error_matches_the_spread_over_repeated_experiments(max_subset_size):
    """The standard error is real: over 300 independent experiments it is about the standard deviation of
    the KID values themselves, both when subsets are the whole sets (the old std across subsets was then
    exactly 0) and when they are proper subsets."""
    rng = np.random.default_rng(5)
    values, errors = [], []
    for _ in range(300):
        x, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 4)) + 0.5
        value, error = kid.kid(x, y, num_subsets=10, max_subset_size=max_subset_size, seed=int(rng.integers(1000)))
        values.append(value)
        errors.append(error)
    assert np.sqrt(np.mean(np.square(errors))) / np.std(values) == pytest.approx(1.0, abs=0.25)


def test_kid_jackknife_leaves_out_whole_units(rng):
    """Each unit (prompt) may hold several rows of y: leaving it out removes all of them."""
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(12, 3))
    x_units, y_units = np.arange(6), np.repeat(np.arange(6), 2)
    value, variance = kid.kid_jackknife(x, y, x_units, y_units)
    whole = kid.kid(x, y, units=(x_units, y_units), max_subset_size=6, num_subsets=1)  # not the whole y
    assert value == pytest.approx(unbiased_polynomial_mmd(x, y), rel=1e-12) and whole[1] > 0
    leave_one_out = [unbiased_polynomial_mmd(np.delete(x, i, 0), y[y_units != i]) for i in range(6)]
    assert variance == pytest.approx(5 / 6 * np.sum((leave_one_out - np.mean(leave_one_out)) ** 2), rel=1e-10)


def unbiased_polynomial_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 under (x.y / d + 1)^3 from dense matrices, as the definition reads."""
    kernel = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
    k_xx, k_yy = kernel(x, x), kernel(y, y)
    m, n = len(x), len(y)
    return (
        (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
        + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
        - 2 * kernel(x, y).mean()
    )


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


def test_clip_s_clamps_each_image_before_the_mean_and_clip_cosines_not_at_all():
    text = np.array([[1.0, 0.0]] * 2)
    images = np.array([[-0.5, np.sqrt(0.75)], [1.0, 0.0]])  # cosines -0.5 and 1
    assert metrics.clip_cosines(3 * images, text) == pytest.approx([-0.5, 1.0], rel=1e-12)
    assert metrics.clip_s(images, text) == pytest.approx(metrics.CLIP_S_WEIGHT * 0.5, rel=1e-12)  # (0 + 1) / 2
    assert metrics.clip_s(images, text, weight=2.5) == pytest.approx(1.25, rel=1e-12)  # Hessel et al.'s w
    assert metrics.clip_score(images, text) == pytest.approx(25.0, rel=1e-12)  # clamp after the mean


def test_clip_s_is_never_below_clip_score_and_both_read_0_where_the_mean_cosine_is_negative(rng):
    for shift in (-0.6, 0.0, 0.6):
        texts = unit_rows(rng, 20, 8)
        images = metrics.l2_normalise(shift * texts + rng.normal(size=(20, 8)) / np.sqrt(8))
        assert metrics.clip_s(images, texts) >= metrics.clip_score(images, texts)
    away = metrics.l2_normalise(-texts + 0.1 * rng.normal(size=(20, 8)))  # every image opposite its caption
    assert metrics.clip_score(away, texts) == metrics.clip_s(away, texts) == 0.0
    assert np.mean(metrics.clip_cosines(away, texts)) < -0.9  # what the clamped scores hide


def test_kid_needs_three_rows_per_set_for_its_standard_error_and_says_so(rng):
    x, y = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)) + 0.5
    value, error = kid.kid(x, y)
    assert np.isfinite(value) and np.isfinite(error) and error > 0
    with pytest.raises(ValueError, match="3 rows per set"):
        kid.kid(x[:2], y[:2])
    with pytest.raises(ValueError, match="3 rows per set"):
        kid.kid(x[:2], y, units=(np.arange(2), np.arange(3)))
    with pytest.raises(ValueError, match="subsets of at least 2"):
        kid.kid(x, y, max_subset_size=1)


def test_cmmd_estimates_give_both_cmmds_of_one_pass_and_reuse_self_sums_exactly(rng):
    x, y = unit_rows(rng, 70, 8), metrics.l2_normalise(rng.normal(size=(45, 8)) + 0.3)
    sums = (metrics.rbf_self_sums(x), metrics.rbf_self_sums(y))
    both = metrics.cmmd_estimates(x, y, self_sums=sums)
    assert both == metrics.cmmd_estimates(x, y) == (metrics.cmmd(x, y), metrics.cmmd(x, y, unbiased=True))
    assert both == pytest.approx((dense_cmmd(x, y, False), dense_cmmd(x, y, True)), abs=1e-12)
    biased, unbiased = metrics.cmmd_estimates(x[:1], y)
    assert biased == pytest.approx(dense_cmmd(x[:1], y, False), abs=1e-12) and np.isnan(unbiased)


def gaussian_cubic_kernel_mean(a: np.ndarray, b: np.ndarray) -> float:
    """E (x.y / d + 1)^3 for independent x ~ N(a, I) and y ~ N(b, I), exactly, from the moments of u = x.y."""
    d, eye = len(a), np.eye(len(a))

    def third_moments(mean):  # E x_i x_j x_k
        pairs = np.einsum("i,jk->ijk", mean, eye)
        return np.einsum("i,j,k->ijk", mean, mean, mean) + pairs + pairs.transpose(1, 0, 2) + pairs.transpose(2, 1, 0)

    first = a @ b
    second = np.sum((eye + np.outer(a, a)) * (eye + np.outer(b, b)))
    third = np.sum(third_moments(a) * third_moments(b))
    return 1 + 3 * first / d + 3 * second / d**2 + third / d**3


def test_kid_standard_error_on_a_sample_of_units_covers_and_costs_no_more_than_the_subsets(monkeypatch):
    """Sets too large for the whole jackknife within the subsets' budget: it runs on a sample of the units and is
    scaled up. Over 400 experiments the standard error is about the spread of the KID values (as in the test above;
    never below it), and the normal 95 % intervals cover the population KID (computed exactly) as often as with the
    whole jackknife: 94-95 % at 200 units either way (600 runs: 94.2 % sampled, 95.0 % whole, the normal
    approximation's own shortfall), so >= 93 % here, 95 % less two Monte Carlo standard errors.
    Negative control: without the jackknife term (the subsets' spread alone) they cover far less."""
    mean_x, mean_y = np.zeros(4), np.full(4, 0.5)
    truth = (
        gaussian_cubic_kernel_mean(mean_x, mean_x)
        + gaussian_cubic_kernel_mean(mean_y, mean_y)
        - 2 * gaussian_cubic_kernel_mean(mean_x, mean_y)
    )
    jackknife_rows = []
    real_jackknife = kid.kid_jackknife
    monkeypatch.setattr(
        kid,
        "kid_jackknife",
        lambda x, y, *units: jackknife_rows.append((len(x), len(y))) or real_jackknife(x, y, *units),
    )
    rng, covered, covered_subsets_only, values, errors = np.random.default_rng(11), [], [], [], []
    for _ in range(400):
        x, y = rng.normal(size=(200, 4)) + mean_x, rng.normal(size=(200, 4)) + mean_y
        seed = int(rng.integers(1000))
        value, error = kid.kid(x, y, num_subsets=50, max_subset_size=20, seed=seed)
        covered.append(abs(value - truth) <= 1.96 * error)
        values.append(value)
        errors.append(error)
        subset_rng = np.random.default_rng(seed)  # the same subsets kid drew
        subsets = [
            kid._kid_subset_mmd(
                x[subset_rng.choice(200, 20, replace=False)], y[subset_rng.choice(200, 20, replace=False)]
            )
            for _ in range(50)
        ]
        covered_subsets_only.append(abs(value - truth) <= 1.96 * np.std(subsets, ddof=1) / np.sqrt(50))
    m, n = jackknife_rows[0]
    assert m < 200 and m * m + n * n + m * n <= kid.KID_JACKKNIFE_SHARE * 3 * 50 * 20**2  # within the budget
    assert 1.0 <= np.sqrt(np.mean(np.square(errors))) / np.std(values) <= 1.3
    assert np.mean(covered) >= 0.93
    assert np.mean(covered_subsets_only) < 0.8
