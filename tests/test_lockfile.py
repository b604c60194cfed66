"""The committed dvc.lock and git-tracked metrics match dvc.yaml, params and code."""

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_committed_pipeline_state_is_up_to_date():
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["dvc", "repro", "--dry", "--allow-missing"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    # `--allow-missing` exits 0 even when a stage is stale: the closing line is what tells.
    assert result.returncode == 0, result.stderr
    assert "Data and pipelines are up to date." in result.stdout, (
        "dvc.lock is stale: run `make repro` and commit dvc.lock, metrics/, dvclive/ and reports/\n" + result.stdout
    )
