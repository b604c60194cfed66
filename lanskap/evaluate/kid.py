"""KID, the Kernel Inception Distance, with its standard error: clean-fid's `cleanfid.fid.kernel_distance`
(cubic polynomial kernel (x.y / d + 1)^3, unbiased MMD^2 on random subsets of size min(m, n, max_subset_size),
averaged), here with a seeded generator and a standard error (a jackknife over prompts plus the subsets' Monte Carlo
error) instead of the spread across subsets that torch-fidelity reports, which is 0 whenever the subsets are the
whole sets. Float64 throughout, every kernel matrix summed tile by tile (`metrics.kernel_sums`), as in
lanskap.evaluate.metrics, whose kernels and tiles this module shares.
"""

from functools import partial

import numpy as np

from lanskap.evaluate import metrics  # metrics.TILE_ROWS read at call time: tests shrink the tiles
from lanskap.evaluate.metrics import (
    KernelSums,
    _feature_matrix,
    _matching_dims,
    jackknife_variance,
    kernel_sums,
    polynomial_kernel,
)

# KID's jackknife costs at most this share of its subsets' kernel work; beyond, it runs on a sample of the units
# (fewer units: a noisier standard error, whose normal intervals then cover less often at small n)
KID_JACKKNIFE_SHARE = 1.0


def _unbiased_mmd(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray, m, n):
    """Unbiased MMD^2 from kernel sums over distinct within-set pairs (k_xx, k_yy) and all cross pairs
    (k_xy) of m and n rows; elementwise, so it serves whole sets and leave-one-out sets alike."""
    return k_xx / (m * (m - 1)) + k_yy / (n * (n - 1)) - 2 * k_xy / (m * n)


def _cubic_kernel_sum(x: np.ndarray, y: np.ndarray) -> float:
    gram = x @ y.T  # x @ x.T (the same array): NumPy computes one triangle (BLAS syrk), half the work
    gram /= x.shape[1]
    gram += 1
    return float(np.sum(gram * gram * gram))


def _kid_subset_mmd(x: np.ndarray, y: np.ndarray) -> float:
    # clean-fid's per-subset term, t / m: unbiased MMD^2 of equal-size subsets under the cubic kernel. A subset of
    # up to metrics.TILE_ROWS rows is summed as one dense block (8 MiB), larger ones in tiles.
    x, y = x.astype(np.float64, copy=False), y.astype(np.float64, copy=False)
    if len(x) > metrics.TILE_ROWS:
        k_xx, k_yy = (kernel_sums(polynomial_kernel, s, s, same_set=True) for s in (x, y))
        within = (k_xx.total - k_xx.diagonal.sum(), k_yy.total - k_yy.diagonal.sum())
        between = kernel_sums(polynomial_kernel, x, y).total
    else:
        diagonals = (float(np.sum((np.sum(s * s, axis=1) / s.shape[1] + 1) ** 3)) for s in (x, y))
        within = tuple(_cubic_kernel_sum(s, s) - diagonal for s, diagonal in zip((x, y), diagonals))
        between = _cubic_kernel_sum(x, y)
    return float(_unbiased_mmd(*within, between, len(x), len(y)))


def kid_jackknife(x: np.ndarray, y: np.ndarray, x_units: np.ndarray, y_units: np.ndarray) -> tuple[float, float]:
    """(value, jackknife variance) of the unbiased MMD^2 of the whole sets under KID's kernel, leaving out
    one unit (prompt) at a time: all its rows in x and in y. Needs 2 rows per set without any one unit."""
    self_sums = partial(kernel_sums, polynomial_kernel, same_set=True, symmetric=True)  # upper tiles: half the work
    k_xx, k_yy = self_sums(x, x, x_units, x_units), self_sums(y, y, y_units, y_units)
    return jackknife_from_sums(k_xx, k_yy, kernel_sums(polynomial_kernel, x, y, x_units, y_units), x_units, y_units)


def jackknife_from_sums(k_xx: KernelSums, k_yy: KernelSums, k_xy: KernelSums, x_units, y_units) -> tuple[float, float]:
    """kid_jackknife's (value, variance) from the whole sets' kernel sums by unit and each row's unit."""
    units, m, n = len(k_xy.rows), len(x_units), len(y_units)
    m_out = m - np.bincount(x_units, minlength=units)
    n_out = n - np.bincount(y_units, minlength=units)
    if units < 2 or min(m_out.min(), n_out.min()) < 2:
        raise ValueError(
            f"KID's jackknife needs 2 rows per set without any one of its units (so 3 rows per set with one row "
            f"per unit); got {m} and {n} rows in {units} unit(s)"
        )
    off_diagonal = [k.without_each_unit() - (k.diagonal.sum() - k.diagonal) for k in (k_xx, k_yy)]
    leave_one_out = _unbiased_mmd(*off_diagonal, k_xy.without_each_unit(), m_out, n_out)
    value = _unbiased_mmd(k_xx.total - k_xx.diagonal.sum(), k_yy.total - k_yy.diagonal.sum(), k_xy.total, m, n)
    return float(value), jackknife_variance(leave_one_out)


def jackknife_units(
    units: tuple[np.ndarray, np.ndarray], sizes: tuple[int, int], budget: float, seed: int
) -> tuple[np.ndarray, float]:
    """The units KID's jackknife runs on, and the factor that scales its variance to the whole sets'.

    All of them while the whole sets' kernel work (m^2 + n^2 + m n pairs) stays within `budget` pairs (a share of
    the subsets'); beyond that, a seeded random sample of them, as many as the budget holds (at least 3), with the
    variance scaled by kept / all units. The jackknife variance of an MMD^2 U-statistic on u units is a/u + b/u^2
    (a: the Hajek projection's part, which dominates whenever the sets differ; b: the degenerate part), so the
    scaled variance keeps a/U exactly and overstates b/U^2 by U / u: never too small, at a fraction of the cost."""
    all_units = np.union1d(*units)
    m, n = sizes
    fraction = min(1.0, float(np.sqrt(budget / (m * m + n * n + m * n))))
    kept = max(3, int(fraction * len(all_units)))
    if kept >= len(all_units):
        return all_units, 1.0
    rng = np.random.default_rng([seed, 1])  # its own stream: the subsets' draws stay as they were
    return np.sort(rng.choice(all_units, kept, replace=False)), kept / len(all_units)


def kid(
    x: np.ndarray,
    y: np.ndarray,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int = 0,
    units: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[float, float]:
    """Kernel Inception Distance between x [m, d] and y [n, d]: (mean, standard error).

    The mean is clean-fid's `kernel_distance`: the average over `num_subsets` subsets of size
    min(m, n, max_subset_size), each drawn without replacement from x and from y with
    `np.random.default_rng(seed)` (clean-fid draws from numpy's unseeded global RNG). When m == n <=
    max_subset_size every subset is the whole set and the mean is the whole sets' unbiased MMD^2.

    The standard error is the mean's, by the law of total variance: the jackknife variance of the whole
    sets' unbiased MMD^2 (which the subset average estimates without bias) over units, plus the subsets'
    Monte Carlo variance (their variance / num_subsets; 0 when every subset is the whole set). `units`
    gives each row's unit in x and in y (for generated images, their prompt: images of one prompt are
    not independent); None pairs row i of x with row i of y, which needs m == n. The jackknife needs 2 rows
    per set without any one unit (3 rows per set at one row per unit).

    Two routes to the same values (to rounding), whichever is less kernel work: where the subsets overlap (sets up
    to ~13k rows at 1000 per subset), one tiled pass over the whole sets' kernel matrices gives every subset's sums
    and the jackknife over every unit (`_kid_by_whole_kernels`); on larger sets each subset's own matrices, and a
    jackknife that never costs more than KID_JACKKNIFE_SHARE of their kernel work: it runs on a sample of the units
    (`jackknife_units`), conservatively scaled. float32 rows are cast to float64 tile by tile, not copied whole."""
    x, y = _feature_matrix(x, "x", keep_float32=True), _feature_matrix(y, "y", keep_float32=True)
    _matching_dims(x, y)
    if max_subset_size < 2:
        raise ValueError(f"KID needs subsets of at least 2 samples; got max_subset_size {max_subset_size}")
    subset_size = min(x.shape[0], y.shape[0], max_subset_size)
    if units is None:
        if len(x) != len(y):
            raise ValueError(f"KID without units pairs rows, which needs equal sizes; got {len(x)} and {len(y)}")
        units = (np.arange(len(x)), np.arange(len(y)))
    if len(x) == len(y) == subset_size:  # every subset is the whole set: one pass gives the value and its error
        whole_sets, jackknife = kid_jackknife(x, y, *units)
        return whole_sets, float(np.sqrt(jackknife))
    draws = _subset_draws(len(x), len(y), subset_size, num_subsets, seed)
    budget = KID_JACKKNIFE_SHARE * 3 * num_subsets * subset_size**2
    # The whole route computes half of this (the self-kernels by their upper tiles); counted in full, it is taken
    # only where it is cheaper whatever the tiling.
    whole = len(x) ** 2 + len(y) ** 2 + len(x) * len(y)
    if whole <= 2 * num_subsets * subset_size**2 + min(whole, budget):  # no more than the subsets and jackknife
        values, jackknife = _kid_by_whole_kernels(x, y, units, draws)
        scale = 1.0
    else:
        values, jackknife, scale = _kid_by_subsets(x, y, units, draws, budget, seed)
    monte_carlo = np.var(values, ddof=1) / num_subsets if num_subsets > 1 else 0.0
    return float(np.mean(values)), float(np.sqrt(jackknife * scale + monte_carlo))


def _subset_draws(m: int, n: int, size: int, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """KID's subsets: row indices into x and into y, drawn without replacement, x's then y's for each subset."""
    rng = np.random.default_rng(seed)
    return [(rng.choice(m, size, replace=False), rng.choice(n, size, replace=False)) for _ in range(count)]


def _kid_by_subsets(x, y, units, draws, budget: float, seed: int) -> tuple[np.ndarray, float, float]:
    """(each subset's MMD^2 from its own kernel matrices, the jackknife variance within `budget` pairs, the
    factor that scales it to the whole sets'): for sets much larger than the subsets."""
    kept, scale = jackknife_units(units, (len(x), len(y)), budget, seed)
    jackknife_sets = (x, y, *units)
    if scale < 1:  # a sample of the units, renumbered 0..u-1 for the kernel sums (all of them: no copy of the sets)
        x_rows, y_rows = np.isin(units[0], kept), np.isin(units[1], kept)
        renumbered = (np.searchsorted(kept, units[0][x_rows]), np.searchsorted(kept, units[1][y_rows]))
        jackknife_sets = (x[x_rows], y[y_rows], *renumbered)
    _, jackknife = kid_jackknife(*jackknife_sets)  # first: it refuses sets too small for a standard error
    return np.array([_kid_subset_mmd(x[x_rows], y[y_rows]) for x_rows, y_rows in draws]), jackknife, scale


def _cubic_self_kernel(x: np.ndarray) -> np.ndarray:
    """[m] each row's (x.x / d + 1)^3, in float64, TILE_ROWS rows at a time (a row's sum is the same either way)."""
    chunks = [x[row : row + metrics.TILE_ROWS].astype(np.float64) for row in range(0, len(x), metrics.TILE_ROWS)]
    return np.concatenate([(np.sum(c * c, axis=1) / x.shape[1] + 1) ** 3 for c in chunks])


def _kid_by_whole_kernels(x, y, units, draws) -> tuple[np.ndarray, float]:
    """(each subset's MMD^2, the whole sets' jackknife variance over every unit) from one tiled pass over the whole
    kernel matrices, each subset's sums as s^T K s with s its 0/1 column. Where subsets overlap (sets up to ~10k
    rows at 1000 per subset) this is less kernel work than the subsets' own matrices, jackknife included."""
    marks = [np.zeros((len(x), len(draws))), np.zeros((len(y), len(draws)))]
    for subset, drawn in enumerate(draws):
        marks[0][drawn[0], subset] = marks[1][drawn[1], subset] = 1.0
    k_xx, k_yy = (
        kernel_sums(polynomial_kernel, s, s, u, u, same_set=True, indicators=(mark, mark), symmetric=True)
        for s, u, mark in ((x, units[0], marks[0]), (y, units[1], marks[1]))
    )
    k_xy = kernel_sums(polynomial_kernel, x, y, *units, indicators=(marks[0], marks[1]))
    _, jackknife = jackknife_from_sums(k_xx, k_yy, k_xy, *units)
    diagonals = [mark.T @ _cubic_self_kernel(s) for mark, s in zip(marks, (x, y))]
    size = len(draws[0][0])
    return _unbiased_mmd(k_xx.subsets - diagonals[0], k_yy.subsets - diagonals[1], k_xy.subsets, size, size), jackknife
