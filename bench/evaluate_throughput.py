"""Metric cost at the scale FID needs: lanskap's FID, KID and CMMD against the references, side by side in one run.

    OMP_NUM_THREADS=1 python bench/evaluate_throughput.py [--sizes 2000 10000 30000] [--seed 0]

Random features per side, as the extractors return them (float32): Inception pool features [n, 2048] (non-negative,
as after its ReLU) and L2-normalised CLIP embeddings [n, 768]. For each size and metric, one row per
implementation, measured one after the other in this process:

- FID: `lanskap.evaluate.metrics.frechet_distance` against clean-fid's own path (np.mean, np.cov, then
  `cleanfid.fid.frechet_distance`, scipy's sqrtm);
- KID: `metrics.kid` (100 subsets of 1000, its standard error included) against `cleanfid.fid.kernel_distance`
  (the same subsets' mean, no standard error);
- CMMD: `metrics.cmmd_estimates` (the biased and the unbiased value, tiled) against a NumPy transcription of
  google-research's `cmmd/distance.py` (dense kernel matrices, the biased value only), up to 10k per side (at 30k
  its three dense matrices need 10 GiB).

torchmetrics (FID, KID) is not installed in the project's environment and is not measured.

Time is the process's CPU time (`time.process_time`: fair on a loaded machine, with one math thread each, as
OMP_NUM_THREADS=1 sets); memory is tracemalloc's peak above the features already held (NumPy reports its
buffers to it). The ratio column is lanskap / reference. The goals (issue 21): time <= the reference's, memory
<= the features + 500 MB.
"""

import argparse
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
from cleanfid import fid as cleanfid

from lanskap.evaluate import metrics


def features(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    clip = rng.normal(size=(n, 768)).astype(np.float32)
    return {
        "inception": np.abs(rng.normal(size=(n, 2048))).astype(np.float32),
        "clip": clip / np.linalg.norm(clip, axis=1, keepdims=True),
    }


def measure(run: Callable[[], object]) -> tuple[float, float, object]:
    """(CPU seconds, peak MiB allocated beyond what was held before, the result)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    held = tracemalloc.get_traced_memory()[0]
    start = time.process_time()
    result = run()
    seconds = time.process_time() - start
    peak = tracemalloc.get_traced_memory()[1] - held
    tracemalloc.stop()
    return seconds, peak / 2**20, result


def cleanfid_fid(x: np.ndarray, y: np.ndarray) -> float:
    stats = [(np.mean(f, axis=0), np.cov(f, rowvar=False)) for f in (x, y)]
    return float(cleanfid.frechet_distance(*stats[0], *stats[1]))


def dense_cmmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0) -> float:
    """google-research cmmd/distance.py `mmd`, transcribed from JAX to NumPy: the three dense kernel matrices."""
    gamma = 1 / (2 * sigma**2)
    x_sq, y_sq = np.sum(x * x, axis=1), np.sum(y * y, axis=1)
    k_xx = np.mean(np.exp(-gamma * (-2 * x @ x.T + x_sq[:, None] + x_sq[None, :])))
    k_xy = np.mean(np.exp(-gamma * (-2 * x @ y.T + x_sq[:, None] + y_sq[None, :])))
    k_yy = np.mean(np.exp(-gamma * (-2 * y @ y.T + y_sq[:, None] + y_sq[None, :])))
    return float(1000 * (k_xx + k_yy - 2 * k_xy))


def rows_for(n: int, a: dict, b: dict) -> list[tuple]:
    x, y = a["inception"], b["inception"]
    pairs = [
        ("FID", lambda: metrics.frechet_distance(x, y), "clean-fid", lambda: cleanfid_fid(x, y)),
        ("KID", lambda: metrics.kid(x, y), "clean-fid", lambda: cleanfid.kernel_distance(x, y)),
        (
            "CMMD",
            lambda: metrics.cmmd_estimates(a["clip"], b["clip"]),
            "dense (google-research)" if n <= 10_000 else None,
            lambda: dense_cmmd(a["clip"], b["clip"]),
        ),
    ]
    rows = []
    for name, ours, reference_name, reference in pairs:
        ours_seconds, ours_mib, _ = measure(ours)
        if reference_name is None:
            rows.append((n, name, ours_seconds, ours_mib, "-", None, None))
            continue
        reference_seconds, reference_mib, _ = measure(reference)
        rows.append((n, name, ours_seconds, ours_mib, reference_name, reference_seconds, reference_mib))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10_000])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(
        "| n per side | metric | lanskap s | lanskap peak MiB | reference | reference s | reference peak MiB | "
        "time ratio | features MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        a, b = features(rng, n), features(rng, n)
        feature_mib = sum(f.nbytes for f in (*a.values(), *b.values())) / 2**20
        for n_, name, seconds, mib, reference, ref_seconds, ref_mib in rows_for(n, a, b):
            ratio = f"{seconds / ref_seconds:.2f}" if ref_seconds else "-"
            ref = f"{ref_seconds:.1f} | {ref_mib:.0f}" if ref_seconds else "- | -"
            print(
                f"| {n_} | {name} | {seconds:.1f} | {mib:.0f} | {reference} | {ref} | {ratio} | {feature_mib:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
