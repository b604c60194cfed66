"""generate with 1 and with N processes (`accelerate launch`, gloo on CPU), side by side, and their bytes compared.

    python bench/generate_processes.py [--processes 2] [--images-per-prompt 1 4] [--rounds 2]
        [--source /path/to/project] [--workdir /tmp/lanskap-generate-processes]

Runs the generate stage on the demo's inputs as `dvc repro` left them in `--source` (default: this project;
`data/processed` and `models/lora`, linked, not copied) with the demo's params and `generate.images_per_prompt` set
to each value given, as `python -m stages.generate` and as `accelerate launch --num_processes N -m stages.generate`,
alternately, `rounds` times each, so both share the machine's load. Prints for each run the stage's wall seconds
(start-up included: imports and model loading, once per process) and the progress line's own seconds (images only),
then the median of each and the 1-process / N-process ratio; checks that every output file has the same sha256
whatever the number of processes. Each process computes with one thread (the pinned CPU math), so N processes need
N free cores to draw N times as fast: note the machine's load beside the figures.
"""

import argparse
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import GENERATE_ARGS, launcher  # noqa: E402

STAGE = ["-m", "stages.generate", *GENERATE_ARGS]
OUTPUTS = ("data/generated", "reports/generate")


def workdir_for(source: Path, root: Path, images_per_prompt: int) -> Path:
    """A project folder holding the demo's params (images_per_prompt changed) and links to its inputs."""
    workdir = root / f"images-per-prompt-{images_per_prompt}"
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "data").mkdir(parents=True)
    params = yaml.safe_load((source / "params.yaml").read_text())
    params["generate"]["images_per_prompt"] = images_per_prompt
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    (workdir / "data/processed").symlink_to(source / "data/processed")
    (workdir / "models").mkdir()
    (workdir / "models/lora").symlink_to(source / "models/lora")
    return workdir


def run(workdir: Path, processes: int) -> tuple[float, float, dict[str, str]]:
    """Stage wall seconds, the progress line's seconds, and the outputs' sha256 by path."""
    for folder in (*OUTPUTS, ".lanskap-cache"):
        shutil.rmtree(workdir / folder, ignore_errors=True)
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    finished = subprocess.run(
        [*launcher(processes), *STAGE], cwd=workdir, env=environment, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if finished.returncode:
        raise SystemExit(finished.stderr[-3000:])
    minutes, seconds = re.findall(r"\| *\d+/\d+ \[(\d+):(\d+)<", finished.stderr)[-1]
    files = sorted(path for folder in OUTPUTS for path in (workdir / folder).rglob("*") if path.is_file())
    digests = {path.relative_to(workdir).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}
    return wall, 60 * int(minutes) + int(seconds), digests


def compare(workdir: Path, processes: int, rounds: int) -> None:
    times = {1: [], processes: []}
    digests = {}
    for round_number in range(rounds):
        for count in (1, processes):
            wall, drawing, digests[count] = run(workdir, count)
            times[count].append((wall, drawing))
            print(f"  round {round_number + 1}, {count} process(es): stage {wall:.1f} s, images {drawing} s")
    same = digests[1] == digests[processes]
    walls = {count: statistics.median(wall for wall, _ in runs) for count, runs in times.items()}
    images = {count: statistics.median(drawing for _, drawing in runs) for count, runs in times.items()}
    print(
        f"{workdir.name}: {len(digests[1]) - 2} images; median stage {walls[1]:.1f} s vs {walls[processes]:.1f} s "
        f"(1/{processes} processes: {walls[1] / walls[processes]:.2f}x); images {images[1]:.0f} s vs "
        f"{images[processes]:.0f} s ({images[1] / max(images[processes], 1):.2f}x); outputs byte-identical: {same}"
    )
    if not same:
        raise SystemExit("the outputs differ with the number of processes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--images-per-prompt", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--source", type=Path, default=ROOT)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lanskap-generate-processes"))
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}, {os.cpu_count()} cores")
    for images_per_prompt in args.images_per_prompt:
        compare(workdir_for(args.source.resolve(), args.workdir, images_per_prompt), args.processes, args.rounds)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
