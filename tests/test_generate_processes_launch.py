"""`accelerate launch -m stages.generate` with two CPU processes (gloo) writes the bytes one process writes, shows one
progress line, and a killed two-process run resumes with one process to those bytes."""

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from stages import train_lora
from tests.conftest import GENERATE_ARGS, ROOT, launcher, shrink, write_params
from tests.test_data_stages import run_data_stages

PROMPTS_IMAGES = 2  # images per prompt
STAGE = ["-m", "stages.generate", *GENERATE_ARGS]
OUTPUTS = ("data/generated", "reports/generate")


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def generate(workdir, processes: int) -> subprocess.CompletedProcess:
    finished = subprocess.run(
        [*launcher(processes), *STAGE], cwd=workdir, env=environment(), capture_output=True, text=True, timeout=600
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return finished


def digests(workdir) -> dict[str, str]:
    files = sorted(path for folder in OUTPUTS for path in (workdir / folder).rglob("*") if path.is_file())
    return {path.relative_to(workdir).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny project trained in-process (generate's inputs), copied into each test's workdir."""
    root = tmp_path_factory.mktemp("generate-processes")
    params = shrink(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["generate"].update(images_per_prompt=PROMPTS_IMAGES, batch_size=3)  # batches of 3: some shorter
    write_params(root, params)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        run_data_stages(root)
        train_lora.main(["--data", "data/processed", "--out", "models/lora", "--live", "dvclive/train"])
    return root, params


def images(workdir) -> int:
    """Images per model: every test prompt's."""
    return PROMPTS_IMAGES * (len((workdir / "data/processed/test.csv").read_text().splitlines()) - 1)


def copy_of(trained, tmp_path, name: str, **generate_params):
    root, params = trained
    workdir = tmp_path / name
    shutil.copytree(root, workdir)
    write_params(workdir, {**params, "generate": {**params["generate"], **generate_params}})
    return workdir


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc): torchrun starts each worker in a session of its own, so a kill of the
    launcher's process group would leave the workers running."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # the task ended meanwhile
            children += [int(child) for child in (task / "children").read_text().split()]
    return [pid, *(descendant for child in children for descendant in process_tree(child))]


def kill_all(pid: int) -> None:
    """SIGKILL the launcher and every process it started, as a lost machine would stop them."""
    tree = process_tree(pid)
    for process in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process, signal.SIGKILL)


def progress_counts(stderr: str) -> list[str]:
    """The count/total of every redraw of a progress line ("generate: 45%|...| 18/40 [...]")."""
    return re.findall(r"generate: +\d+%\|[^|]*\| *(\d+/\d+)", stderr)


@pytest.mark.slow
def test_two_processes_write_the_bytes_of_one_with_one_progress_line(trained, tmp_path):
    one, two = copy_of(trained, tmp_path, "one"), copy_of(trained, tmp_path, "two")
    single, double = generate(one, 1), generate(two, 2)
    assert digests(one) == digests(two)
    total = 2 * images(one)
    assert len(digests(one)) == total + 2  # the images, index.csv, comparison.png
    for run in (single, double):
        counts = progress_counts(run.stderr)
        assert counts and all(count.endswith(f"/{total}") for count in counts), run.stderr[-2000:]
        assert counts.count(f"{total}/{total}") == 1  # one line, closed once: no bar per process or per model
    assert "; 2 processes) -> data/generated" in double.stdout
    assert not any((two / ".lanskap-cache/generate").iterdir())  # every process discarded its cache once published


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_with_one_process_to_the_same_bytes(trained, tmp_path):
    reference = copy_of(trained, tmp_path, "reference", batch_size=1, steps=8)
    generate(reference, 1)
    killed = copy_of(trained, tmp_path, "killed", batch_size=1, steps=8)
    cache = killed / ".lanskap-cache/generate"
    run = subprocess.Popen([*launcher(2), *STAGE], cwd=killed, env=environment(), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(cache.glob("*/*.sha256"))) < 6 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_all(run.pid)  # the launcher and both processes
    run.wait()
    time.sleep(1)  # the workers, orphaned, are reaped by init
    drawn = len(list(cache.glob("*/*.sha256")))
    assert 6 <= drawn < 2 * images(killed), "the run ended before the kill: slow it down (steps)"
    assert not (killed / "data/generated").exists()  # nothing published
    resumed = generate(killed, 1)
    reused = sum(int(n) for n in re.findall(r"generate (?:base|lora): (\d+) of \d+ images reused", resumed.stdout))
    assert reused >= drawn - 2  # each process's batch in flight may have lost its sha256 to the kill
    assert digests(killed) == digests(reference)
    assert not any(cache.iterdir())  # published: the resume cache is gone
