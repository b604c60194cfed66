"""Metric cost at the scale FID needs: lanskap's FID, KID and CMMD against the references, side by side in one run.

    OMP_NUM_THREADS=1 python bench/evaluate_throughput.py [--sizes 2000 10000 30000] [--seed 0]

Random features per side, as the extractors return them (float32): Inception pool features [n, 2048] (non-negative,
as after its ReLU) and L2-normalised CLIP embeddings [n, 768]. For each size and metric, one row per
implementation, measured one after the other on the same features:

- FID: `lanskap.evaluate.metrics.frechet_distance` against clean-fid's own path (np.mean, np.cov, then
  `cleanfid.fid.frechet_distance`, scipy's sqrtm) and torchmetrics' `FrechetInceptionDistance` (its float64 sums
  of the features and their outer products, then its eigenvalue path), fed the features through an identity
  extractor;
- KID: `kid.kid` (100 subsets of 1000, its standard error included) against `cleanfid.fid.kernel_distance`
  (the same subsets' mean, no standard error) and torchmetrics' `KernelInceptionDistance` (100 subsets of 1000,
  mean and standard deviation over subsets), both computing in the features' float32;
- CMMD: `metrics.cmmd_estimates` (the biased and the unbiased value, tiled) against a NumPy transcription of
  google-research's `cmmd/distance.py` (dense kernel matrices, the biased value only), up to 10k per side (at 30k
  its three dense matrices need 10 GiB).

torchmetrics is not a project dependency: its rows appear when it is importable (`uv pip install torchmetrics`, or
PYTHONPATH at a folder holding it and lightning-utilities).

Each measurement runs in a child forked from this process (the features shared, copy-on-write): time is the child's
CPU time (`time.process_time`: fair on a loaded machine, with one math thread each, as OMP_NUM_THREADS=1 sets),
memory its peak resident set above its resident set at the start (VmHWM after resetting it, less VmRSS: NumPy's and
torch's allocations alike). The ratio columns are lanskap / reference. The goals (issue 21): time <= the
references', memory <= the features + 500 MB.
"""

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from cleanfid import fid as cleanfid

from lanskap.evaluate import kid, metrics


def features(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    clip = rng.normal(size=(n, 768)).astype(np.float32)
    return {
        "inception": np.abs(rng.normal(size=(n, 2048))).astype(np.float32),
        "clip": clip / np.linalg.norm(clip, axis=1, keepdims=True),
    }


def memory_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith(field + ":")).split()[1])


def measure(run: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds, peak MiB resident beyond what the process held at the start) of `run`, in a forked child."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(reader)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        held, start = memory_kib("VmRSS"), time.process_time()
        run()
        result = f"{time.process_time() - start} {(memory_kib('VmHWM') - held) / 1024}"
        os.write(writer, result.encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as stream:
        seconds, mib = stream.read().split()
    os.waitpid(child, 0)
    return float(seconds), float(mib)


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


def torchmetrics_runs(x: np.ndarray, y: np.ndarray) -> dict[str, Callable[[], object]]:
    """torchmetrics' FID and KID on these features (an identity extractor), or none where it is not installed."""
    try:
        import torch
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError:
        return {}

    class Identity(torch.nn.Module):
        num_features = x.shape[1]

        def forward(self, features):
            return features

    def run(metric) -> object:
        torch.manual_seed(0)
        metric.update(torch.from_numpy(x), real=True)
        metric.update(torch.from_numpy(y), real=False)
        return metric.compute()

    return {
        "FID": lambda: run(FrechetInceptionDistance(feature=Identity())),
        "KID": lambda: run(KernelInceptionDistance(feature=Identity(), subsets=100, subset_size=1000)),
    }


def rows_for(n: int, a: dict, b: dict) -> list[tuple]:
    """(metric, lanskap's (s, MiB), [(reference, s, MiB), ...]) for one size."""
    x, y = a["inception"], b["inception"]
    torchmetrics = torchmetrics_runs(x, y)
    pairs = [
        ("FID", lambda: metrics.frechet_distance(x, y), {"clean-fid": lambda: cleanfid_fid(x, y)}),
        ("KID", lambda: kid.kid(x, y), {"clean-fid": lambda: cleanfid.kernel_distance(x, y)}),
        (
            "CMMD",
            lambda: metrics.cmmd_estimates(a["clip"], b["clip"]),
            {"dense (google-research)": lambda: dense_cmmd(a["clip"], b["clip"])} if n <= 10_000 else {},
        ),
    ]
    rows = []
    for name, ours, references in pairs:
        if name in torchmetrics:
            references["torchmetrics"] = torchmetrics[name]
        rows.append((name, measure(ours), [(ref, *measure(run)) for ref, run in references.items()]))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10_000, 30_000])
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
        for name, (seconds, mib), references in rows_for(n, a, b):
            for reference, ref_seconds, ref_mib in references or [("-", None, None)]:
                ratio = f"{seconds / ref_seconds:.2f}" if ref_seconds else "-"
                ref = f"{ref_seconds:.1f} | {ref_mib:.0f}" if ref_seconds else "- | -"
                print(
                    f"| {n} | {name} | {seconds:.1f} | {mib:.0f} | {reference} | {ref} | {ratio} | {feature_mib:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
