"""Metric math on feature arrays: CMMD, Frechet distance (FID), KID, CLIP score, and the small-sample
helpers for LoRA-minus-base comparisons. No models and no images here: `lanskap.features` extracts the
arrays. Everything is computed in float64.

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
- KID: clean-fid `cleanfid.fid.kernel_distance`: cubic polynomial kernel (x.y / d + 1)^3, unbiased MMD^2
  on random subsets of size min(m, n, max_subset_size), averaged; here with a seeded generator and the
  spread across subsets reported too (std with ddof = 0, as torch-fidelity and torchmetrics report it).
- CLIP score: torchmetrics `CLIPScore`: 100 * cosine per (image, text) pair, averaged, then clamped at 0.
"""

from collections.abc import Callable

import numpy as np

CMMD_SCALE = 1000.0  # the paper reports MMD^2 times 1000
CLIP_SCORE_SCALE = 100.0


def _feature_matrix(features: np.ndarray, name: str, min_rows: int = 1) -> np.ndarray:
    matrix = np.asarray(features, dtype=np.float64)
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


def _rbf_kernel(x: np.ndarray, y: np.ndarray, sigma: float) -> np.ndarray:
    # Squared distances expanded as in the reference (|a|^2 + |b|^2 - 2 a.b), not clipped at 0, so that
    # values match it to rounding.
    squared_distances = (np.sum(x**2, axis=1)[:, None] + np.sum(y**2, axis=1)[None, :] - 2 * x @ y.T)
    return np.exp(-squared_distances / (2 * sigma**2))


def _off_diagonal_mean(kernel: np.ndarray) -> float:
    size = kernel.shape[0]
    return float((kernel.sum() - np.trace(kernel)) / (size * (size - 1)))


def cmmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0, unbiased: bool = False) -> float:
    """CMMD between embedding sets x [m, d] and y [n, d], which the caller has already L2-normalised.

    Biased (default, the paper's number): 1000 * [mean K(x, x) + mean K(y, y) - 2 mean K(x, y)] with the
    diagonals included, so cmmd(x, x) == 0. Unbiased (`unbiased=True`, needs m, n >= 2): the within-set
    means skip the diagonal (divisors m(m-1), n(n-1)); it removes the small-n offset and can be negative.
    m != n is allowed; every row is used (the reference drops a partial last batch of 32).
    """
    min_rows = 2 if unbiased else 1
    x, y = _feature_matrix(x, "x", min_rows), _feature_matrix(y, "y", min_rows)
    _matching_dims(x, y)
    k_xx, k_yy, k_xy = _rbf_kernel(x, x, sigma), _rbf_kernel(y, y, sigma), _rbf_kernel(x, y, sigma)
    if unbiased:
        within = _off_diagonal_mean(k_xx) + _off_diagonal_mean(k_yy)
    else:
        within = float(k_xx.mean() + k_yy.mean())
    return CMMD_SCALE * (within - 2 * float(k_xy.mean()))


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
    return float(mean_difference @ mean_difference + np.trace(s1) + np.trace(s2)
                 - 2 * _trace_sqrt_product(s1, s2))


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between feature sets x [m, d] and y [n, d] (FID on Inception pool features):
    means and covariances with ddof = 1, as clean-fid computes them. Needs m, n >= 2; below d + 1 samples
    the covariances are rank-deficient and the value is large and not comparable across n."""
    x, y = _feature_matrix(x, "x", 2), _feature_matrix(y, "y", 2)
    _matching_dims(x, y)
    return frechet_distance_from_stats(x.mean(axis=0), np.cov(x, rowvar=False),
                                       y.mean(axis=0), np.cov(y, rowvar=False))


def _kid_subset_mmd(x: np.ndarray, y: np.ndarray) -> float:
    # clean-fid's per-subset term, t / m: unbiased MMD^2 of equal-size subsets under (x.y / d + 1)^3.
    size, dims = x.shape
    within = (x @ x.T / dims + 1) ** 3 + (y @ y.T / dims + 1) ** 3
    between = (x @ y.T / dims + 1) ** 3
    return float((within.sum() - np.trace(within)) / (size * (size - 1)) - 2 * between.sum() / size**2)


def kid(x: np.ndarray, y: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance between x [m, d] and y [n, d]: (mean, std) over `num_subsets` subsets of
    size min(m, n, max_subset_size), each drawn without replacement from x and from y with
    `np.random.default_rng(seed)`. The mean is clean-fid's `kernel_distance` value for the same subsets;
    clean-fid draws from numpy's unseeded global RNG, so its value differs run to run unless m == n <=
    max_subset_size (every subset is then the whole set)."""
    x, y = _feature_matrix(x, "x"), _feature_matrix(y, "y")
    _matching_dims(x, y)
    subset_size = min(x.shape[0], y.shape[0], max_subset_size)
    if subset_size < 2:
        raise ValueError(f"KID needs subsets of at least 2 samples; got {subset_size}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x_subset = x[rng.choice(x.shape[0], subset_size, replace=False)]
        y_subset = y[rng.choice(y.shape[0], subset_size, replace=False)]
        values.append(_kid_subset_mmd(x_subset, y_subset))
    return float(np.mean(values)), float(np.std(values))


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """CLIP score of row-paired embeddings image_emb [n, d] and text_emb [n, d] (need not be normalised):
    the mean over pairs of 100 * cos(image_i, text_i), then clamped at 0 as torchmetrics does; the clamp
    follows the mean, so negative pairs do pull a positive mean down."""
    images, texts = l2_normalise(image_emb), l2_normalise(text_emb)
    if images.shape != texts.shape:
        raise ValueError(f"image and text embeddings must pair row by row; got {images.shape} and {texts.shape}")
    mean_score = CLIP_SCORE_SCALE * float(np.mean(np.sum(images * texts, axis=1)))
    return max(mean_score, 0.0)


def paired_resampling_interval(stat: Callable[[np.ndarray], float], n: int, num_resamples: int = 200,
                               fraction: float = 0.8, confidence: float = 0.95,
                               seed: int = 0) -> tuple[float, float]:
    """Resampling interval for a LoRA-minus-base statistic over n prompts.

    `stat(prompts)` must compute the statistic from the prompts whose indices are in `prompts` (a sorted
    int array of distinct indices) and nothing else, e.g. for the CMMD gap against the test set:

        gap = lambda p: cmmd(lora[p], test[p]) - cmmd(base[p], test[p])
        low, high = paired_resampling_interval(gap, n)

    Each resample keeps k = max(2, round(fraction * n)) prompts WITHOUT replacement (repeated images would
    inflate MMD and FD), LoRA and base images of a prompt staying together. A size-k subsample varies less
    than the full-size statistic (variance ratio (n - k) / n), so the deviations of the resampled values
    from their mean are scaled by sqrt(k / (n - k)) before taking percentiles around stat(all prompts):
    the delete-d jackknife scaling (Shao & Wu 1989), exact for a mean; the raw percentiles of 80 %
    subsamples would be half as wide as the statistic's real spread. Needs k < n, so n >= 3.
    Deterministic for a given seed.
    """
    subset_size = max(2, round(fraction * n))
    if subset_size >= n:
        raise ValueError(f"a resampling interval needs subsets smaller than the {n} prompts "
                         f"(subset size {subset_size}); use at least 3 prompts or a smaller fraction")
    rng = np.random.default_rng(seed)
    resampled = np.array([stat(np.sort(rng.choice(n, subset_size, replace=False)))
                          for _ in range(num_resamples)])
    scale = np.sqrt(subset_size / (n - subset_size))
    deviations = scale * (resampled - resampled.mean())
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(deviations, [tail, 100 - tail])
    full_value = stat(np.arange(n))
    return float(full_value + low), float(full_value + high)


def permutation_pvalue(stat: Callable[[np.ndarray], float], n: int, num_permutations: int = 200,
                       seed: int = 0) -> float:
    """Two-sided paired permutation (swap) p-value for a LoRA-minus-base statistic over n prompts.

    `stat(swap)` gets a bool array [n]: for each prompt where it is True the caller exchanges that
    prompt's LoRA and base images, then computes the statistic on all prompts, e.g.

        def swapped_gap(swap):
            rows = swap[:, None]
            return cmmd(np.where(rows, base, lora), test) - cmmd(np.where(rows, lora, base), test)

    Under "the LoRA changes nothing" each prompt's pair is exchangeable, so swapping leaves the statistic's
    distribution unchanged. observed = stat(no swaps); p = (1 + #{|stat(swap)| >= |observed|}) /
    (1 + num_permutations) with uniformly random swaps, never 0. Values within 100 ulp of |observed|
    count as extreme, so ties lost to rounding do not shrink p (as scipy.stats.permutation_test does).
    Deterministic for a given seed.
    """
    rng = np.random.default_rng(seed)
    observed = abs(stat(np.zeros(n, dtype=bool)))
    tolerance = 100 * np.finfo(np.float64).eps * observed
    as_extreme = sum(abs(stat(rng.random(n) < 0.5)) >= observed - tolerance for _ in range(num_permutations))
    return (1 + as_extreme) / (1 + num_permutations)
