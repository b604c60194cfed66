"""Throughput and peak memory of ingest and preprocess on a generated folder of large images.

    python bench/data_throughput.py --count 5000 --size 1024 [--workdir /tmp/lanskap-data-bench]

Writes `count` JPEGs of size x size (smooth gradients plus noise, so they compress like photos) into
WORKDIR/raw, then runs the real stages (`python -m stages.ingest`, caption, split, preprocess) in WORKDIR
and prints images/s and each stage's peak resident memory. Memory must stay flat as `count` grows:
the stages stream images one at a time, so compare two counts side by side (e.g. 500 and 5000).
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def write_images(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    for index in range(count):
        if (folder / f"{index:05d}.jpg").exists():
            continue
        rng = np.random.default_rng(index)
        colours = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
        pixels = colours[0] * ramp[:, None, None] + colours[1] * (1 - ramp[:, None, None])
        pixels = np.broadcast_to(pixels, (size, size, 3)) + rng.normal(0, 12, size=(size, size, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{index:05d}.jpg", quality=90)


def run_stage(workdir: Path, module: str, *args: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one stage run in its own process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{module} failed:\n{process.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--resolution", type=int, default=512, help="preprocess.resolution")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lanskap-data-bench"))
    args = parser.parse_args()

    raw = args.workdir / f"raw-{args.count}-{args.size}"
    start = time.perf_counter()
    write_images(raw, args.count, args.size)
    print(f"generated {args.count} images of {args.size}px in {time.perf_counter() - start:.0f} s -> {raw}")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"].update(source=str(raw), min_size=64)
    params["caption"].update(method="template")
    params["preprocess"].update(resolution=args.resolution)
    (args.workdir / "params.yaml").write_text(yaml.safe_dump(params))

    ingest = run_stage(args.workdir, "stages.ingest", "--out", "data/ingested")
    run_stage(args.workdir, "stages.caption", "--manifest", "data/ingested/manifest.csv", "--out", "data/captions.csv")
    run_stage(args.workdir, "stages.split", "--captions", "data/captions.csv", "--out", "data/split")
    preprocess = run_stage(
        args.workdir,
        "stages.preprocess",
        "--split",
        "data/split",
        "--ingested",
        "data/ingested",
        "--out",
        "data/processed",
        "--reports",
        "reports/preprocess",
    )
    print(f"{'stage':12s} {'images':>7s} {'seconds':>8s} {'images/s':>9s} {'peak RSS MiB':>13s}")
    for name, (seconds, rss) in (("ingest", ingest), ("preprocess", preprocess)):
        print(f"{name:12s} {args.count:7d} {seconds:8.1f} {args.count / seconds:9.1f} {rss:13.0f}")


if __name__ == "__main__":
    main()
