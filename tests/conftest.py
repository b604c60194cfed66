"""Shared fixtures: the real params.yaml, shrunk; the stages' arguments; the order test files run in."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The test files that take longest, in an order that balances the two workers: CPU seconds measured per test
# (stage and DVC processes included; the queue's detached workers estimated), an idle core runs them in about that
# wall time: science ~490, readme_commands ~420, interruptions ~130, pipeline ~125, distributed ~85, train ~70,
# hostile_inputs ~20 (the fast tier ~210 in all). Under `pytest -n 2 --dist loadfile --no-loadscope-reorder` (the
# Makefile) they start first and the short files fill in behind them; xdist's own order (files with the most tests
# first) started test_science 25th and test_readme_commands 32nd of 47 files. xdist hands a worker its next file
# while two of its tests are still to run, hence interruptions before readme_commands (simulated: the order below
# leaves the workers within seconds of each other; longest-first left one with ~60 s more).
LONGEST_FIRST = [
    "test_science.py",
    "test_interruptions.py",
    "test_readme_commands.py",
    "test_train.py",
    "test_distributed.py",
    "test_generate_processes_launch.py",
    "test_pipeline.py",
    "test_evaluate_distributed.py",
    "test_hostile_inputs.py",
    "test_builtin.py",
    "test_optimizers.py",
    "test_lycoris.py",
    "test_cpu_determinism.py",
    "test_ema.py",
    "test_latent_cache.py",
    "test_generate_evaluate.py",
    "test_buckets.py",
]


def pytest_collection_modifyitems(items):
    """LONGEST_FIRST's files first, in its order; the others after them, as collected. Within a file, the order
    stays as written (test_science reads the demo's images before its experiments replace them)."""
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


TINY_OVERRIDES = {  # the demo preset made faster still; everything else stays as the project ships it
    "ingest": {"num_images": 20, "image_size": 64},
    "split": {"test_fraction": 0.5},  # evaluate needs 3 test prompts: 0.2 of 20 images can leave 2 (split refuses)
    "preprocess": {"resolution": 32, "preview_samples": 2},
    "train": {"steps": 4, "batch_size": 2, "validation_every": 2},
    "generate": {"steps": 2, "batch_size": 4},
    "evaluate": {"kid_subsets": 10, "permutations": 20},
}

# Each stage's arguments as dvc.yaml gives them, for `stages.NAME.main(...)` or `python -m stages.NAME ...`
PREPROCESS_ARGS = ["--split", "data/split", "--ingested", "data/ingested"]
PREPROCESS_ARGS += ["--out", "data/processed", "--reports", "reports/preprocess"]
TRAIN_ARGS = ["--data", "data/processed", "--out", "models/lora", "--live", "dvclive/train"]
GENERATE_ARGS = ["--data", "data/processed", "--lora", "models/lora"]
GENERATE_ARGS += ["--out", "data/generated", "--reports", "reports/generate"]
EVALUATE_ARGS = ["--data", "data/processed", "--generated", "data/generated", "--out", "metrics/eval.json"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous or a server the test starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher(processes: int) -> list[str]:
    """The command prefix that runs `-m MODULE ...` on `processes` CPU processes: Python itself for 1, else
    `accelerate launch` (gloo on CPU, a free rendezvous port)."""
    if processes == 1:
        return [sys.executable]
    return [
        sys.executable,
        *("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_port", str(free_port())),
    ]


# `python -m` arguments of the stages before training, with dvc.yaml's paths
DATA_STAGE_COMMANDS = [
    ("stages.ingest", "--out", "data/ingested"),
    ("stages.caption", "--manifest", "data/ingested/manifest.csv", "--out", "data/captions.csv"),
    ("stages.split", "--captions", "data/captions.csv", "--out", "data/split"),
    ("stages.preprocess", *PREPROCESS_ARGS),
]


def shrink(params: dict) -> dict:
    shrunk = {group: dict(values) for group, values in params.items() if isinstance(values, dict)}
    for group, values in TINY_OVERRIDES.items():
        shrunk[group].update(values)
    return {**params, **shrunk}


@pytest.fixture
def project_params() -> dict:
    """The project's params.yaml, shrunk for speed."""
    return shrink(yaml.safe_load((ROOT / "params.yaml").read_text()))


@pytest.fixture
def workdir(tmp_path, project_params, monkeypatch):
    """A temporary project root holding the shrunk params.yaml; stages run with it as cwd."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(project_params))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def copy_project(
    destination: Path, without: tuple[str, ...] = ("dvc.lock", "metrics/", "dvclive/", "reports/")
) -> Path:
    """The project's files as git sees them (tracked or not ignored), minus the pipeline's recorded results."""
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in listing:
        if name.startswith(without) or not (ROOT / name).is_file():
            continue
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, destination / name)
    return destination
