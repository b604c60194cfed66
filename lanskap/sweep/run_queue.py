"""`python -m lanskap.sweep.run_queue` (`make queue`): run DVC's experiment queue until no experiment is left queued.

It works around two problems of DVC's queue (3.67):

- DVC starts its queue worker, and each experiment in it, as the bare command `dvc` looked up on PATH
  (`dvc/repo/experiments/queue/celery.py` `_spawn_worker`, `queue/tasks.py` `run_exp`; only Windows uses
  `sys.executable`). `.venv/bin/dvc exp run --run-all` without the environment activated therefore fails with
  `FileNotFoundError: ... 'dvc'` and then waits forever for an experiment to start. Here this interpreter's bin
  folder (the project's `.venv/bin`) goes first on PATH.
- A worker can stop with experiments still queued (treeverse/dvc#10562, treeverse/dvc#8165); `--run-all` then
  waits forever too. Here a queue with experiments queued and no worker is started again, and a queue that makes
  no progress over `MAX_FRUITLESS_STARTS` starts is an error naming `dvc queue logs`.
"""

import argparse
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from lanskap.core.errors import UserError, run_stage

STATUSES = ("Queued", "Running", "Success", "Failed")
MAX_FRUITLESS_STARTS = 3  # starts in a row after which no experiment had left the queue
WORKER_LINE = re.compile(r"Worker status: (\d+) active, (\d+) idle")
DVC = str(Path(sys.executable).with_name("dvc"))  # the project's .venv/bin/dvc when run with .venv/bin/python


def venv_environment() -> dict[str, str]:
    """os.environ with this interpreter's bin folder (the one holding `dvc`) first on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def parse_status(text: str) -> tuple[Counter, int]:
    """(experiments per status, workers active or idle) from `dvc queue status`'s table."""
    rows = (line.split() for line in text.splitlines())
    tasks = Counter(words[-1] for words in rows if words and words[-1] in STATUSES)
    workers = WORKER_LINE.search(text)
    if workers is None:
        raise UserError(f"`dvc queue status` printed no worker line; this DVC is not the one expected:\n{text}")
    return tasks, int(workers[1]) + int(workers[2])


def queue_status(env: dict[str, str]) -> tuple[Counter, int]:
    result = subprocess.run([DVC, "queue", "status"], env=env, capture_output=True, text=True)
    if result.returncode:
        raise UserError(f"`dvc queue status` failed:\n{result.stdout}{result.stderr}")
    return parse_status(result.stdout)


def run_queue(jobs: int, poll_seconds: float, settle_seconds: float) -> tuple[Counter, Counter]:
    """Start workers whenever experiments wait with none running, until none waits; the counts before and after."""
    env = venv_environment()
    tasks, workers = before, _ = queue_status(env)
    fruitless, queued_at_start = 0, None
    while tasks["Queued"] or tasks["Running"]:
        if tasks["Queued"] and not tasks["Running"] and not workers:
            fruitless = fruitless + 1 if queued_at_start == tasks["Queued"] else 0
            if fruitless >= MAX_FRUITLESS_STARTS:
                raise UserError(
                    f"{tasks['Queued']} experiments stay queued after {fruitless} queue starts: "
                    "see `dvc queue logs NAME` and `dvc queue status`"
                )
            print(f"queue: {tasks['Queued']} queued, starting {jobs} worker(s)", flush=True)
            subprocess.run([DVC, "queue", "start", "--jobs", str(jobs)], env=env, check=True)
            queued_at_start = tasks["Queued"]
            time.sleep(settle_seconds)  # a worker takes seconds to register: do not start a second one
        time.sleep(poll_seconds)
        previous, (tasks, workers) = tasks, queue_status(env)
        if tasks != previous:
            print("queue: " + ", ".join(f"{tasks[status]} {status.lower()}" for status in STATUSES), flush=True)
    return before, tasks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1, help="workers, each running one experiment at a time")
    parser.add_argument("--poll", type=float, default=15.0, help="seconds between `dvc queue status` calls")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds a newly started worker gets to register")
    args = parser.parse_args(argv)
    try:
        before, after = run_queue(args.jobs, args.poll, args.settle)
    except KeyboardInterrupt:
        raise UserError(
            "stopped watching: the queue runs on in the background (`dvc queue status`, `dvc queue stop`)"
        ) from None
    new = after - before  # the queue's table keeps earlier runs' rows
    if new["Failed"]:
        raise UserError(f"{new['Failed']} queued experiments failed: see `dvc queue status` and `dvc queue logs NAME`")
    print(f"queue: done, {new['Success']} experiments succeeded")


if __name__ == "__main__":
    run_stage(main)
