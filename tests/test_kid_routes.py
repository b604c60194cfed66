"""KID's two routes to the same numbers (lanskap/evaluate/metrics.py): each subset's own kernel matrices, or one tiled
pass over the whole sets' matrices with each subset summed as s^T K s, which `kid` takes where it is less work."""

import numpy as np
import pytest

from lanskap.evaluate import metrics


@pytest.fixture
def sets():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(300, 16)), rng.normal(size=(250, 16)) + 0.2
    return x, y, (np.arange(300) % 50, np.arange(250) % 50)


def test_whole_kernel_route_gives_each_subsets_value_and_the_whole_jackknife(sets, monkeypatch):
    x, y, units = sets
    monkeypatch.setattr(metrics, "TILE_ROWS", 64)  # several tiles, a partial one at the end
    draws = metrics._subset_draws(len(x), len(y), 40, 7, seed=3)
    values, variance = metrics._kid_by_whole_kernels(x, y, units, draws)
    own = [metrics._kid_subset_mmd(x[a], y[b]) for a, b in draws]
    np.testing.assert_allclose(values, own, rtol=1e-12, atol=1e-12)
    assert variance == pytest.approx(metrics.kid_jackknife(x, y, *units)[1], rel=1e-12)


def test_kid_takes_the_cheaper_route_and_both_give_one_value(sets, monkeypatch):
    x, y, units = sets
    whole = metrics.kid(x, y, num_subsets=50, max_subset_size=200, seed=1, units=units)  # subsets overlap: whole
    monkeypatch.setattr(metrics, "_kid_by_whole_kernels", lambda *args: pytest.fail("not the cheaper route"))
    metrics.kid(x, y, num_subsets=5, max_subset_size=20, seed=1, units=units)  # small subsets: their own matrices
    draws = metrics._subset_draws(len(x), len(y), 200, 50, seed=1)
    own = [metrics._kid_subset_mmd(x[a], y[b]) for a, b in draws]
    assert whole[0] == pytest.approx(np.mean(own), rel=1e-12)
