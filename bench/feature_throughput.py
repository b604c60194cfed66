"""Feature extraction as evaluate runs it: decoded once or twice, from the cache or computed, on 1 or 2 processes.

    python bench/feature_throughput.py [--images 384] [--size 256] [--processes 1 2]

Draws `--images` procedural landscapes at `--size` px into a temporary folder (not timed) and extracts their CLIP
and Inception features with the built-in extractors, as the evaluate stage does (pinned CPU math, one thread per
process), one measurement after the other in this run:

- `decode twice`: the path before the cache, `ClipEmbedder.image_embeddings` then `InceptionEmbedder.features`,
  each decoding every image;
- `miss`: `lanskap.evaluate.extraction.extract_sets` into an empty cache (each image decoded once, entries written);
- `hit`: the same again, every batch from the cache (files read, hashed and verified; nothing decoded);
- `N processes, miss`: the stage's own split under `accelerate launch --num_processes N` (N = 1: a plain process),
  each run into an empty cache; the time is the main process's, from a barrier after the models loaded to the
  gathered features, so start-up and model loading are left out (they are printed apart).

All give the same features bit for bit (checked). Wall seconds and images/s; the load average beside them tells
how busy the machine was (2 processes can only be faster where 2 cores are free).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import stages  # noqa: F401  (pins the CPU math, as the stage does)
from lanskap.data.procedural import generate

ROOT = Path(__file__).resolve().parents[1]
EXTRACTORS = SimpleNamespace(
    clip_model="builtin:tiny-clip", clip_revision=None, inception_weights="builtin:tiny-inception"
)


def draw_images(folder: Path, count: int, size: int) -> list[Path]:
    paths = []
    for index, (image, _) in enumerate(generate(count, size, seed=0)):
        paths.append(folder / f"{index:05d}.png")
        image.save(paths[-1])
    return paths


def extract(paths: list[Path], processes) -> tuple[dict | None, float]:
    """extract_sets over `paths` as one set, through the cache LANSKAP_FEATURE_CACHE names: (features, seconds)."""
    from lanskap.evaluate.extraction import extract_sets
    from stages.evaluate import load_extractors

    _, _, extractors = load_extractors(EXTRACTORS, str(processes.device))
    processes.wait_for_everyone()
    start = time.perf_counter()
    features, _ = extract_sets({"images": paths}, extractors, processes)
    return features, time.perf_counter() - start


def worker(folder: Path) -> None:
    """Under `accelerate launch`: the stage's split; the main process prints its seconds and a digest."""
    import hashlib

    from stages.evaluate import process_state

    processes = process_state()
    features, seconds = extract(sorted(folder.glob("*.png")), processes)
    if features is not None:
        digest = hashlib.sha256(b"".join(features[k]["images"].tobytes() for k in sorted(features))).hexdigest()
        print(json.dumps({"seconds": seconds, "digest": digest}))


def launched(folder: Path, processes: int, cache: Path) -> dict:
    """One worker run on `processes` processes into an empty cache: its JSON line, plus the whole command's time."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
        launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    environment = {**os.environ, "LANSKAP_FEATURE_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    finished = subprocess.run(
        [*launcher, __file__, "--worker", str(folder)], env=environment, capture_output=True, text=True, check=True
    )
    line = next(line for line in finished.stdout.splitlines() if line.startswith("{"))
    return {**json.loads(line), "command": time.perf_counter() - start}


def in_process(paths: list[Path], cache: Path) -> list[tuple[str, float, bytes]]:
    """(variant, seconds, features' bytes) for decode twice, miss and hit, in this process."""
    from stages.evaluate import load_extractors, process_state

    clip, inception, _ = load_extractors(EXTRACTORS, "cpu")
    start = time.perf_counter()
    twice = clip.image_embeddings(paths).tobytes() + inception.features(paths).tobytes()
    rows = [("decode twice (before the cache)", time.perf_counter() - start, twice)]
    os.environ["LANSKAP_FEATURE_CACHE"] = str(cache)
    for variant in ("miss (decoded once, written)", "hit (read and verified)"):
        features, seconds = extract(paths, process_state())
        found = features["clip"]["images"].tobytes() + features["inception"]["images"].tobytes()
        rows.append((variant, seconds, found))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    with tempfile.TemporaryDirectory() as temporary:
        folder, work = Path(temporary) / "images", Path(temporary)
        folder.mkdir()
        paths = draw_images(folder, args.images, args.size)
        print(f"{args.images} images of {args.size} px; load average {os.getloadavg()}")
        print("| variant | seconds | images/s |\n|---|---|---|")
        rows = in_process(paths, work / "cache")
        for variant, seconds, _ in rows:
            print(f"| {variant} | {seconds:.2f} | {args.images / seconds:.1f} |", flush=True)
        assert len({features for *_, features in rows}) == 1, "the variants' features differ"
        digests = set()
        for count in args.processes:
            run = launched(folder, count, work / f"cache-{count}")
            digests.add(run["digest"])
            print(
                f"| {count} process(es), miss | {run['seconds']:.2f} | {args.images / run['seconds']:.1f} |"
                f" (whole command {run['command']:.1f} s)",
                flush=True,
            )
        assert len(digests) == 1, "the process counts' features differ"
        print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
