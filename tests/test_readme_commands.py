"""Every shell command of the README (its ```bash blocks) runs as written from a fresh clone of the project.

One clone and one demo run (`make repro`) are shared; the commands then run in the README's order, each as the
README says: `dvc` as `.venv/bin/dvc` and `python` as `.venv/bin/python` with the environment NOT on PATH. `make`
runs its recipe with `uv run --frozen` replaced by the environment on PATH: uv would sync the project into the
shared `.venv` (an editable install of the clone) and needs the network. The first `dvc exp run` runs exactly as
written; later experiments get CHEAP's overrides appended, so that the queue's six experiments take seconds each.
The commands this test cannot run are in SKIPPED with the reason, and a README that drops one fails the test.
"""

import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, copy_project

pytestmark = pytest.mark.slow

SKIPPED = {  # the README's commands this test does not run, and why
    "make test": "the whole test suite, this test included (what CI runs)",
    "dvc exp run -S preset=paper": "the paper preset: SD 2.1-768 and CLIP/Inception weights from the network, a GPU",
    "dvc exp run -S preset=paper -S lora.rank=16": "the paper preset: network weights and a GPU",
    "make rate": "a server that runs until Ctrl-C (tests/test_rate_browser.py drives it in a browser)",
    "git add ratings/votes.sqlite '&&' git commit -m ratings": "commits the votes cast on the page: none here",
}
CHEAP = "-S train.steps=4 -S train.validation_every=2 -S generate.steps=2 -S evaluate.permutations=20"
HEADLINE_METRICS = {  # the compact table's metric columns (README, Experiments)
    "cmmd_vs_test_lora_minus_base",
    "cmmd_test_vs_lora",
    "fid_test_vs_lora",
    "kid_test_vs_lora",
    "clip_cosine_lora_minus_base",
    "validation_loss_final",
}
PARAM_GROUPS = set(yaml.safe_load((ROOT / "params.yaml").read_text()))
TIMEOUT_SECONDS = {"make repro": 1800}  # the demo from scratch; anything else gets DEFAULT_TIMEOUT
DEFAULT_TIMEOUT = 900
VENV = (ROOT / ".venv").resolve()


@dataclass
class Ran:
    command: str  # as the README writes it
    executed: str  # as it was run
    returncode: int
    output: str
    seconds: float


def readme_commands() -> list[str]:
    """Each line of each ```bash block, its comment removed."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    lines = (shlex.join(shlex.split(line, comments=True)) for block in blocks for line in block.splitlines())
    return [line for line in lines if line]


def as_executed(command: str, dvc_runs_so_far: int) -> str:
    """The command as the README says to run it with the project's environment not activated."""
    program, _, rest = command.partition(" ")
    if program == "make":  # the recipe, with `uv run --frozen` as the environment on PATH (see the docstring)
        return f"make -o .venv/.synced {rest} RUN='env PATH={VENV / 'bin'}:{environment()['PATH']}'"
    if program in ("dvc", "python"):
        cheap = f" {CHEAP}" if command.startswith("dvc exp run -S") and dvc_runs_so_far else ""
        cheap = f" {CHEAP}" if command.startswith("dvc exp run --queue") else cheap
        return f".venv/bin/{program} {rest}{cheap}"
    return command


def environment() -> dict[str, str]:
    """The user's shell: no project environment on PATH, no virtualenv active, offline, one thread, wide output."""
    path = [entry for entry in os.environ["PATH"].split(os.pathsep) if Path(entry).resolve() != VENV / "bin"]
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "LANSKAP_PYTHON")}
    return {**env, "PATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "400"}


def execute(repo: Path, command: str, executed: str) -> Ran:
    started = time.monotonic()
    process = subprocess.Popen(
        ["bash", "-c", executed],
        cwd=repo,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a timeout ends the command and whatever it started
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_SECONDS.get(command, DEFAULT_TIMEOUT))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0] + f"\n[killed after {TIMEOUT_SECONDS.get(command, DEFAULT_TIMEOUT)} s]"
    return Ran(command, executed, process.returncode, output, time.monotonic() - started)


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The project as a fresh clone of `main` holds it (committed results included), with the shared .venv."""
    repo = copy_project(tmp_path_factory.mktemp("readme") / "project", without=())
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "project")
    (repo / ".venv").symlink_to(VENV)
    (repo / ".tools").symlink_to((ROOT / ".tools").resolve())  # make's order-only $(UV) prerequisite
    return repo


@pytest.fixture(scope="module")
def ran(clone) -> list[Ran]:
    """Every README command not in SKIPPED, in order; after the last `--queue`, the compact table once more."""
    results, dvc_runs = [], 0
    one_screen = next(command for command in readme_commands() if "--only-changed" in command)
    commands = [command for command in readme_commands() if command not in SKIPPED]
    last_queue = max(index for index, command in enumerate(commands) if "--queue" in command)
    commands.insert(last_queue + 1, one_screen)
    for command in commands:
        results.append(execute(clone, command, as_executed(command, dvc_runs)))
        dvc_runs += command.startswith("dvc exp run -S")
        print(f"{results[-1].seconds:7.1f} s  rc {results[-1].returncode}  {results[-1].executed}")
    return results


def test_skipped_commands_are_still_in_the_readme():
    """A skip list that outlives its command would hide nothing, silently."""
    assert set(SKIPPED) <= set(readme_commands())


def test_every_readme_command_succeeds(ran):
    failed = [f"{result.executed}\n{result.output[-3000:]}" for result in ran if result.returncode != 0]
    assert not failed, "\n\n".join(failed)


def test_a_rank_experiment_reruns_only_the_stages_after_the_data(ran):
    (result,) = [result for result in ran if result.command == "dvc exp run -S lora.rank=8"]
    stages = re.findall(r"Running stage '(\w+)'", result.output)
    assert stages == ["train_lora", "generate", "evaluate", "qualitative"], result.output[-3000:]


def test_the_compact_table_shows_the_six_metrics_and_params_only_with_experiments_queued(ran):
    tables = [result for result in ran if "--only-changed" in result.command]
    assert len(tables) == 2  # as the README runs it, and again after the sweep's experiments were queued
    queued = tables[-1].output
    # the sweep's six experiments are rows, beside the three the README ran before
    assert len(re.findall(r"[├└]── \w+ \[", queued)) >= 6, queued
    header = next(line.split() for line in queued.splitlines() if line.split()[:1] == ["Experiment"])
    assert {column for column in header if "." not in column} == {"Experiment", *HEADLINE_METRICS}, header
    assert all(column.split(".")[0] in PARAM_GROUPS for column in header if "." in column), header


def test_the_sweep_summarises_the_queued_experiments(clone, ran):
    summary = (clone / "reports/sweep/summary.csv").read_text()
    assert "lora.rank=4" in summary and "lora.rank=16" in summary, summary
