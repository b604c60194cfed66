"""make queue (lanskap/sweep/run_queue.py): reading `dvc queue status`, and the PATH its DVC workers need.
The loop itself runs for real in tests/test_readme_commands.py (slow), over the README's sweep."""

import os
import sys
from pathlib import Path

import pytest

from lanskap.core.errors import UserError
from lanskap.sweep.run_queue import DVC, parse_status, venv_environment

# `dvc queue status` of DVC 3.67 with two experiments queued, and (dates, workers) as in treeverse/dvc#10562
QUEUED = """Task     Name        Created    Status
332241c  crank-tach  11:27 AM   Queued
9470fb5  melic-spit  11:28 AM   Queued

Worker status: 0 active, 0 idle
"""
MIXED = """Task     Name                                 Created       Status
9294987  tumor_dysp_weight_hsv_rgb_min_mean   Sep 19, 2024  Running
22c83f3  tumor_dysp_weight_hsv_rgb_mean_mean  Sep 19, 2024  Queued
f1ce1d2  tumor_dysp_weight_hard_min_mean      Sep 19, 2024  Success
10f8332  tumor_dysp_weight_hard_min_min       Sep 19, 2024  Failed

Worker status: 1 active, 1 idle
"""


def test_status_counts_experiments_by_state_and_workers():
    tasks, workers = parse_status(QUEUED)
    assert dict(tasks) == {"Queued": 2} and workers == 0
    tasks, workers = parse_status(MIXED)
    assert dict(tasks) == {"Running": 1, "Queued": 1, "Success": 1, "Failed": 1} and workers == 2
    tasks, workers = parse_status("No experiment tasks in the queue.\n\nWorker status: 0 active, 0 idle\n")
    assert not tasks and workers == 0


def test_a_status_without_its_worker_line_is_an_error_not_an_empty_queue():
    with pytest.raises(UserError, match="no worker line"):
        parse_status("Task     Name        Created    Status\n")


def test_workers_find_this_environments_dvc_first_on_path():
    """DVC starts workers as the bare `dvc` on PATH: the project's must come first."""
    first = venv_environment()["PATH"].split(os.pathsep)[0]
    assert Path(first) == Path(sys.executable).parent and Path(first, "dvc") == Path(DVC)
    assert Path(DVC).is_file()
