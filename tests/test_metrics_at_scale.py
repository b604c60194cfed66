"""The metrics' paths for large sets (lanskap/evaluate/metrics.py) give the plain paths' values: KID from one tiled
pass over the whole sets' kernel matrices (each subset summed as s^T K s, taken where it is less work than the
subsets' own matrices), KID on float32 rows cast tile by tile, FID's statistics summed by chunks of rows."""

import numpy as np
import pytest

from lanskap.evaluate import kid, metrics


@pytest.fixture
def sets():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(300, 16)), rng.normal(size=(250, 16)) + 0.2
    return x, y, (np.arange(300) % 50, np.arange(250) % 50)


def test_whole_kernel_route_gives_each_subsets_value_and_the_whole_jackknife(sets, monkeypatch):
    x, y, units = sets
    monkeypatch.setattr(metrics, "TILE_ROWS", 64)  # several tiles, a partial one at the end
    draws = kid._subset_draws(len(x), len(y), 40, 7, seed=3)
    values, variance = kid._kid_by_whole_kernels(x, y, units, draws)
    own = [kid._kid_subset_mmd(x[a], y[b]) for a, b in draws]
    np.testing.assert_allclose(values, own, rtol=1e-12, atol=1e-12)
    assert variance == pytest.approx(kid.kid_jackknife(x, y, *units)[1], rel=1e-12)


def test_kid_takes_the_cheaper_route_and_both_give_one_value(sets, monkeypatch):
    x, y, units = sets
    whole = kid.kid(x, y, num_subsets=50, max_subset_size=200, seed=1, units=units)  # subsets overlap: whole
    monkeypatch.setattr(kid, "_kid_by_whole_kernels", lambda *args: pytest.fail("not the cheaper route"))
    kid.kid(x, y, num_subsets=5, max_subset_size=20, seed=1, units=units)  # small subsets: their own matrices
    draws = kid._subset_draws(len(x), len(y), 200, 50, seed=1)
    own = [kid._kid_subset_mmd(x[a], y[b]) for a, b in draws]
    assert whole[0] == pytest.approx(np.mean(own), rel=1e-12)


def test_float32_features_give_the_values_of_their_float64_copy(sets):
    x, y, units = sets
    for subsets, size in ((50, 200), (5, 20)):  # the whole-kernel route, then the subsets' own matrices
        wide = kid.kid(x, y, num_subsets=subsets, max_subset_size=size, units=units)
        narrow = [a.astype(np.float32) for a in (x, y)]
        settings = {"num_subsets": subsets, "max_subset_size": size, "units": units}
        assert kid.kid(*narrow, **settings) == kid.kid(*(a.astype(np.float64) for a in narrow), **settings)
        assert kid.kid(*narrow, **settings) == pytest.approx(wide, rel=1e-5)


def test_fid_statistics_by_chunks_equal_the_whole_sets(sets, monkeypatch):
    x, y, _ = sets
    whole = metrics.frechet_distance(x, y)
    monkeypatch.setattr(metrics, "FID_CHUNK_ROWS", 64)
    assert metrics.frechet_distance(x, y) == pytest.approx(whole, rel=1e-12)
    narrow = x.astype(np.float32)
    mean, covariance = metrics._mean_and_covariance(narrow, "x")
    wide = narrow.astype(np.float64)
    np.testing.assert_allclose(covariance, np.cov(wide, rowvar=False), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(mean, wide.mean(axis=0), rtol=1e-12, atol=1e-14)


def test_symmetric_kernel_sums_by_upper_tiles_equal_the_full_square(sets, monkeypatch):
    x, _, units = sets
    monkeypatch.setattr(metrics, "TILE_ROWS", 64)
    marks = (np.random.default_rng(0).random((len(x), 3)) < 0.5).astype(float)
    square = metrics.kernel_sums(metrics.polynomial_kernel, x, x, units[0], units[0], True, indicators=(marks, marks))
    upper = metrics.kernel_sums(
        metrics.polynomial_kernel, x, x, units[0], units[0], True, indicators=(marks, marks), symmetric=True
    )
    for field in ("rows", "columns", "within", "diagonal", "subsets"):
        np.testing.assert_allclose(getattr(upper, field), getattr(square, field), rtol=1e-12)
