"""Metric math on feature arrays: CMMD, Frechet distance (FID), CLIP score, and the kernel sums that KID
(lanskap.evaluate.kid) shares. No models and no images here: `lanskap.evaluate.features` extracts the arrays;
`lanskap.evaluate.paired` builds the LoRA-minus-base comparisons on these functions. Everything is computed in
float64, and every kernel matrix is summed tile by tile (`kernel_sums`), so memory stays bounded at any number of
images.

Reference implementations, reproduced as they compute (see the project's metric notes for test values):
- CMMD: google-research `cmmd/distance.py` (Jayasumana et al., CVPR 2024) and its PyTorch port
  cmmd-pytorch: Gaussian RBF kernel, sigma = 10, biased MMD^2 (V-statistic) times 1000, not square-rooted.
  The unbiased U-statistic is offered beside it because the biased one carries a positive offset of about
  1000 * [(1 - Axx)/m + (1 - Ayy)/n] (about 1 at n = 10).
- FID: clean-fid 0.1.35 `cleanfid.fid.frechet_distance` on mean / covariance (ddof = 1) of the features.
  The trace of (S1 S2)^(1/2) is computed here from symmetric eigendecompositions rather than with
  clean-fid's `scipy.linalg.sqrtm`: on full-rank covariances the two agree to ~1e-12, but with fewer
  samples than dimensions (any small test set) clean-fid's sqrtm of the singular product can raise
  "Imaginary component" or return slightly negative distances for identical sets.
- KID: clean-fid `cleanfid.fid.kernel_distance`, with a standard error: lanskap.evaluate.kid, on these kernels.
- CLIP score, two conventions (the project's metric notes): `clip_score`, torchmetrics `CLIPScore`: 100 *
  cosine per (image, text) pair, averaged, then clamped at 0 (the paper's number); `clip_s`, CLIP-S of Hessel
  et al. (EMNLP 2021): w * max(cos, 0) per image, then averaged. Both clamp, so a set whose images sit on the far
  side of their captions scores 0 whatever it draws and a gap between two such sets cannot go negative: gaps
  are tested on the unclamped mean cosine (`clip_cosines`, lanskap.evaluate.paired).
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

CMMD_SCALE = 1000.0  # the paper reports MMD^2 times 1000
CLIP_SCORE_SCALE = 100.0
# CLIP-S's w. Hessel et al. use 2.5 (it stretches ViT-B/32 cosines, rarely above 0.4, toward [0, 1]); 100, as most
# image-generation papers do, puts clip_s on clip_score's scale, so the two differ only in where the clamp acts
# (clip_s >= clip_score always). Divide by 40 for the paper's w = 2.5.
CLIP_S_WEIGHT = 100.0
FID_CHUNK_ROWS = 8192  # FID's mean and covariance are summed by chunks of this many rows beyond it
TILE_ROWS = 1024  # kernel matrices are summed in tiles of this many rows and columns (8 MiB of float64)


def _feature_matrix(features: np.ndarray, name: str, min_rows: int = 1, keep_float32: bool = False) -> np.ndarray:
    """The features as a 2-D float64 array; with `keep_float32`, float32 rows stay as they are (KID casts each
    kernel tile and subset as it uses them, the same values without a float64 copy: 470 MiB at 30k x 2048)."""
    matrix = np.asarray(features)
    if not (keep_float32 and matrix.dtype == np.float32):
        matrix = matrix.astype(np.float64, copy=False)
    if matrix.ndim != 2 or matrix.shape[0] < min_rows:
        raise ValueError(f"{name} must be a 2-D array [n, d] with n >= {min_rows}; got shape {matrix.shape}")
    return matrix


def _matching_dims(x: np.ndarray, y: np.ndarray) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows of `x` scaled to unit Euclidean norm. A zero row has no direction: it raises rather than
    silently becoming NaN, since it means the feature extractor produced nothing."""
    x = _feature_matrix(x, "x")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"cannot L2-normalise {int(np.sum(norms == 0))} zero row(s)")
    return x / norms


def rbf_kernel_minus_one(x: np.ndarray, y: np.ndarray, sigma: float = 10.0) -> np.ndarray:
    """The Gaussian RBF kernel exp(-|a - b|^2 / (2 sigma^2)) minus 1. Every MMD weighs its three kernel
    means 1 + 1 - 2, so the constant cancels, and values near 0 sum with far less rounding than values
    near 1 (CMMD is 1000 x a small difference of means close to 1)."""
    # Squared distances expanded as in the reference (|a|^2 + |b|^2 - 2 a.b), not clipped at 0, so that
    # values match it to rounding.
    squared_distances = np.sum(x**2, axis=1)[:, None] + np.sum(y**2, axis=1)[None, :] - 2 * x @ y.T
    return np.expm1(-squared_distances / (2 * sigma**2))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel, (x.y / d + 1)^3, in float64 whatever the rows' float type."""
    x, y = x.astype(np.float64, copy=False), y.astype(np.float64, copy=False)
    return (x @ y.T / x.shape[1] + 1) ** 3


@dataclass(frozen=True)
class KernelSums:
    """Sums of the entries of a kernel matrix K(x, y) by unit: every row of x and of y belongs to one of
    `units` units (for generated images, their prompt; x and y share the numbering)."""

    rows: np.ndarray  # [units] sum of K[a, b] over x-rows a of unit i and every y-row b
    columns: np.ndarray  # [units] sum over every x-row a and y-rows b of unit i
    within: np.ndarray  # [units] sum over x-rows and y-rows both of unit i
    diagonal: np.ndarray  # [units] sum of K[a, a] over rows a of unit i (x is y); zeros otherwise
    subsets: np.ndarray | None = None  # [k] sum of K[a, b] over the x-rows and y-rows of subset j (`indicators`)

    @property
    def total(self) -> float:
        return float(self.rows.sum())

    def without_each_unit(self) -> np.ndarray:
        """[units] the sum of K over the rows of every unit but i (the leave-one-out sums)."""
        return self.total - self.rows - self.columns + self.within


def kernel_sums(
    kernel: Callable[[np.ndarray, np.ndarray], np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    x_units: np.ndarray | None = None,
    y_units: np.ndarray | None = None,
    same_set: bool = False,
    tile: int | None = None,
    indicators: tuple[np.ndarray, np.ndarray] | None = None,
    symmetric: bool = False,
) -> KernelSums:
    """KernelSums of kernel(x, y), built tile by tile: memory stays at a few tile x tile matrices whatever
    the number of rows (the dense n x n matrix of 30,000 images would take 7 GiB). Units default to one
    unit for all rows. `same_set` (y is x, with the same units) also sums the diagonal, for U-statistics.
    `indicators` ([m, k] and [n, k], 0/1: which rows subset j holds) also sums each subset's block, s_x^T K s_y,
    at k / d of the kernel's own cost. `symmetric` (same_set, a symmetric kernel, the same indicators on both
    sides): only the tiles on and above the diagonal are computed, each one above it counted for its mirror too."""
    tile = tile or TILE_ROWS
    x_units = np.zeros(len(x), dtype=int) if x_units is None else np.asarray(x_units)
    y_units = np.zeros(len(y), dtype=int) if y_units is None else np.asarray(y_units)
    units = int(max(x_units.max(), y_units.max())) + 1
    sums = {name: np.zeros(units) for name in ("rows", "columns", "within", "diagonal")}
    if indicators is not None:
        sums["subsets"] = np.zeros(indicators[0].shape[1])
    for row in range(0, len(x), tile):
        for column in range(row if symmetric else 0, len(y), tile):
            block = kernel(x[row : row + tile], y[column : column + tile])
            units_of = (x_units[row : row + tile], y_units[column : column + tile])
            add_tile(sums, block, units_of, units, mirror=symmetric and column > row)
            if same_set and row == column:
                sums["diagonal"] += np.bincount(units_of[0], np.diagonal(block), units)
            if indicators is not None:
                rows, columns = indicators[0][row : row + tile], indicators[1][column : column + tile]
                sums["subsets"] += np.sum(rows * (block @ columns), axis=0) * (2 if symmetric and column > row else 1)
    return KernelSums(**sums)


def add_tile(sums: dict, block: np.ndarray, units_of: tuple[np.ndarray, np.ndarray], units: int, mirror: bool):
    """Add one tile's sums by unit (its row and column units); with `mirror`, its transpose's too."""
    row_units, column_units = units_of
    by_row, by_column = block.sum(axis=1), block.sum(axis=0)
    within = np.where(row_units[:, None] == column_units[None, :], block, 0.0)
    sums["rows"] += np.bincount(row_units, by_row, units)
    sums["columns"] += np.bincount(column_units, by_column, units)
    sums["within"] += np.bincount(row_units, within.sum(axis=1), units)
    if mirror:
        sums["rows"] += np.bincount(column_units, by_column, units)
        sums["columns"] += np.bincount(row_units, by_row, units)
        sums["within"] += np.bincount(column_units, within.sum(axis=0), units)


def rbf_self_sums(x: np.ndarray, sigma: float = 10.0) -> KernelSums:
    """The kernel sums of one embedding set with itself, diagonal included: computed once per set, they serve
    every CMMD of that set (`cmmd_estimates`)."""
    x = _feature_matrix(x, "x")
    return kernel_sums(partial(rbf_kernel_minus_one, sigma=sigma), x, x, same_set=True)


def cmmd_estimates(
    x: np.ndarray,
    y: np.ndarray,
    sigma: float = 10.0,
    self_sums: tuple[KernelSums, KernelSums] | None = None,
) -> tuple[float, float]:
    """(biased, unbiased) CMMD between x [m, d] and y [n, d] (see `cmmd`) from one pass over each of the three
    kernels; `self_sums` passes each set's `rbf_self_sums` when the caller reuses them across pairs. The unbiased
    value is nan when a set has a single row."""
    x, y = _feature_matrix(x, "x"), _feature_matrix(y, "y")
    _matching_dims(x, y)
    k_xx, k_yy = self_sums or (rbf_self_sums(x, sigma), rbf_self_sums(y, sigma))
    between = kernel_sums(partial(rbf_kernel_minus_one, sigma=sigma), x, y).total / (len(x) * len(y))
    biased = CMMD_SCALE * (k_xx.total / len(x) ** 2 + k_yy.total / len(y) ** 2 - 2 * between)
    if min(len(x), len(y)) < 2:
        return biased, float("nan")
    unbiased = CMMD_SCALE * (_off_diagonal_mean(k_xx, len(x)) + _off_diagonal_mean(k_yy, len(y)) - 2 * between)
    return biased, unbiased


def cmmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0, unbiased: bool = False) -> float:
    """CMMD between embedding sets x [m, d] and y [n, d], which the caller has already L2-normalised.

    Biased (default, the paper's number): 1000 * [mean K(x, x) + mean K(y, y) - 2 mean K(x, y)] with the
    diagonals included, so cmmd(x, x) == 0. Unbiased (`unbiased=True`, needs m, n >= 2): the within-set
    means skip the diagonal (divisors m(m-1), n(n-1)); it removes the small-n offset and can be negative.
    m != n is allowed; every row is used (the reference drops a partial last batch of 32). Computed in
    tiles (`kernel_sums`), so memory does not grow with m and n.
    """
    min_rows = 2 if unbiased else 1
    x, y = _feature_matrix(x, "x", min_rows), _feature_matrix(y, "y", min_rows)
    return cmmd_estimates(x, y, sigma)[int(unbiased)]


def _off_diagonal_mean(sums: KernelSums, size: int) -> float:
    return (sums.total - float(sums.diagonal.sum())) / (size * (size - 1))


def _psd_eigenvalues_above_rounding(eigenvalues: np.ndarray) -> np.ndarray:
    # Eigenvalues of a rank-deficient PSD matrix that should be 0 come out as +-rounding noise; their
    # square roots (~1e-8 each) would add up over a 2048-d null space, so they are set to exactly 0
    # with numpy.linalg.matrix_rank's default tolerance.
    tolerance = eigenvalues.size * np.finfo(np.float64).eps * float(np.max(np.abs(eigenvalues)))
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    # tr((S1 S2)^(1/2)) = tr((R S2 R)^(1/2)) with R = S1^(1/2): S1 S2 is similar to the symmetric PSD
    # matrix R S2 R, so its eigenvalues are real and >= 0 and eigh stays accurate when S1 or S2 is
    # rank-deficient, where a general sqrtm of S1 S2 is not.
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    root1 = (eigenvectors * np.sqrt(_psd_eigenvalues_above_rounding(eigenvalues))) @ eigenvectors.T
    middle = root1 @ sigma2 @ root1
    product_eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sum(np.sqrt(_psd_eigenvalues_above_rounding(product_eigenvalues))))


def frechet_distance_from_stats(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)): clean-fid's `frechet_distance` on the same
    statistics, computed without its complex `sqrtm` (see the module docstring)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: means {mu1.shape}, {mu2.shape}; covariances {s1.shape}, {s2.shape}")
    mean_difference = mu1 - mu2
    return float(mean_difference @ mean_difference + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2))


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between feature sets x [m, d] and y [n, d] (FID on Inception pool features):
    means and covariances with ddof = 1, as clean-fid computes them. Needs m, n >= 2; below d + 1 samples
    the covariances are rank-deficient and the value is large and not comparable across n."""
    (mean_x, covariance_x), (mean_y, covariance_y) = _mean_and_covariance(x, "x"), _mean_and_covariance(y, "y")
    if mean_x.size != mean_y.size:
        raise ValueError(f"feature dimensions differ: {mean_x.size} vs {mean_y.size}")
    return frechet_distance_from_stats(mean_x, covariance_x, mean_y, covariance_y)


def _mean_and_covariance(features: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """np.mean and np.cov (ddof = 1) in float64. Up to FID_CHUNK_ROWS rows, exactly those calls on a float64 copy;
    beyond, the same sums by chunks of rows, so memory stays at a chunk (a whole float64 copy and np.cov's centred
    one take 940 MiB at 30k x 2048), with the values equal to rounding."""
    matrix = _feature_matrix(features, name, 2, keep_float32=True)
    if len(matrix) <= FID_CHUNK_ROWS:
        matrix = matrix.astype(np.float64, copy=False)
        return matrix.mean(axis=0), np.cov(matrix, rowvar=False)
    chunks = [slice(row, row + FID_CHUNK_ROWS) for row in range(0, len(matrix), FID_CHUNK_ROWS)]
    mean = np.sum([matrix[rows].astype(np.float64).sum(axis=0) for rows in chunks], axis=0) / len(matrix)
    covariance = np.zeros((matrix.shape[1], matrix.shape[1]))
    for rows in chunks:
        centred = matrix[rows].astype(np.float64) - mean
        covariance += centred.T @ centred  # NumPy's syrk: one triangle
    return mean, covariance / (len(matrix) - 1)


def jackknife_variance(leave_one_out: np.ndarray) -> float:
    """Delete-one jackknife variance of a statistic from its n leave-one-unit-out values."""
    n = len(leave_one_out)
    return float((n - 1) / n * np.sum((leave_one_out - np.mean(leave_one_out)) ** 2))


def clip_cosines(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """[n] cos(image_i, text_i) of row-paired embeddings image_emb [n, d] and text_emb [n, d] (need not be
    normalised), unclamped."""
    images, texts = l2_normalise(image_emb), l2_normalise(text_emb)
    if images.shape != texts.shape:
        raise ValueError(f"image and text embeddings must pair row by row; got {images.shape} and {texts.shape}")
    return np.sum(images * texts, axis=1)


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """torchmetrics' CLIP score: the mean over pairs of 100 * cos(image_i, text_i), then clamped at 0; the clamp
    follows the mean, so negative pairs do pull a positive mean down, but a negative mean reads 0."""
    return max(CLIP_SCORE_SCALE * float(np.mean(clip_cosines(image_emb, text_emb))), 0.0)


def clip_s(image_emb: np.ndarray, text_emb: np.ndarray, weight: float = CLIP_S_WEIGHT) -> float:
    """CLIP-S (Hessel et al. 2021): the mean over pairs of weight * max(cos(image_i, text_i), 0), the clamp per
    image; weight defaults to CLIP_S_WEIGHT (see there)."""
    return weight * float(np.mean(np.maximum(clip_cosines(image_emb, text_emb), 0.0)))
