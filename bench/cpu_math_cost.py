"""The speed cost of pinned CPU math (lanskap/core/determinism.py) against the libraries' own choice, side by side.

    python bench/cpu_math_cost.py [--steps 20] [--resolution 64] [--rounds 3] [--workdir /tmp/lanskap-cpu-math]

Runs the data stages once on the demo preset (shrunk), then `python -m stages.train_lora` alternately pinned
(AVX2 code paths, one thread: the default) and native (`LANSKAP_CPU_MATH=native`: each library's fastest code for
this CPU, as many threads as it has cores), `rounds` times each, so both share the machine's load. Prints each
run's seconds and LoRA sha256, the median seconds of each and their ratio.
"""

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lanskap.core.determinism import PINNED, SWITCH  # noqa: E402
from tests.conftest import DATA_STAGE_COMMANDS, copy_project, shrink  # noqa: E402

SETTINGS = {"pinned": {}, "native": {SWITCH: "native"}}


def stage(project: Path, env: dict, *args: str) -> float:
    clean = {name: value for name, value in os.environ.items() if name not in PINNED and name != SWITCH}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", *args],
        cwd=project,
        env={**clean, **env},
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def prepare(workdir: Path, steps: int, resolution: int) -> Path:
    project = copy_project(workdir / "project")
    params = shrink(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["preprocess"]["resolution"] = resolution
    params["train"].update(steps=steps, validation_every=steps, batch_size=4)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    for command in DATA_STAGE_COMMANDS:
        stage(project, {}, *command)
    return project


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lanskap-cpu-math"))
    args = parser.parse_args()
    project = prepare(args.workdir, args.steps, args.resolution)
    seconds = {name: [] for name in SETTINGS}
    for round_index in range(args.rounds):
        for name, env in SETTINGS.items():
            out = f"runs/{name}-{round_index}"
            seconds[name].append(
                stage(
                    project,
                    env,
                    "stages.train_lora",
                    "--data",
                    "data/processed",
                    "--out",
                    f"{out}/lora",
                    "--live",
                    f"{out}/live",
                )
            )
            weights = (project / out / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
            print(
                f"{name:7s} round {round_index}: {seconds[name][-1]:7.1f} s  LoRA sha256 "
                f"{hashlib.sha256(weights).hexdigest()[:16]}",
                flush=True,
            )
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(
        f"train_lora, {args.steps} steps at {args.resolution} px on {os.cpu_count()} cores: median pinned "
        f"{medians['pinned']:.1f} s, native {medians['native']:.1f} s, pinned/native "
        f"{medians['pinned'] / medians['native']:.2f}"
    )


if __name__ == "__main__":
    main()
