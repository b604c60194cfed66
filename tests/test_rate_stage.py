"""The qualitative stage (`python -m stages.qualitative`) on a small generated index: with no votes it runs and says
so, with votes it counts those on the current images only, and a missing votes file is one clear error."""

import json
import math
import subprocess
import sys

import numpy as np
from PIL import Image

from lanskap.rate import votes as db
from lanskap.rate.items import rater_plan, read_items
from tests import test_rate_server
from tests.conftest import ROOT

project = test_rate_server.project  # the fixture: a small generated index and its images


def run_stage(root, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "stages.qualitative", "--generated", "data/generated", "--out", "q.json"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command, *extra], cwd=root, env=env, capture_output=True, text=True)


def test_no_votes_runs_and_says_no_ratings_yet(project):
    db.close(db.connect(project / "ratings/votes.sqlite", create=True))
    result = run_stage(project, "--votes", "ratings/votes.sqlite", "--reports", "rep")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((project / "q.json").read_text())
    assert metrics["n_votes"] == 0 and metrics["overall_n_votes"] == 0
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())  # flat, numeric, no NaN
    assert "No ratings yet" in (project / "rep/summary.md").read_text()
    assert (project / "rep/win_rates.csv").read_text() == "criterion,lora_win_rate,low,high\n"
    assert sorted(p.name for p in (project / "ratings").iterdir()) == ["votes.sqlite"]  # no WAL side file left


def test_votes_on_replaced_images_are_counted_as_stale(project):
    connection = db.connect(project / "ratings/votes.sqlite", create=True)
    items = read_items(project / "data/generated/index.csv", root=project)
    for item, side in zip(items, rater_plan(items, "alice", 0)[1], strict=True):
        vote = db.Vote("alice", item.prompt_index, 0, item.caption, item.base_sha256, item.lora_sha256, side,
                       "overall", "A" if side == "left" else "B")  # fmt: skip
        db.record(connection, vote)
    db.close(connection)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(project / "data/generated/lora/0000_00.png")  # regenerated
    result = run_stage(project, "--votes", "ratings/votes.sqlite", "--reports", "rep")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((project / "q.json").read_text())
    assert metrics["n_stale_votes"] == 1 and metrics["overall_n_votes"] == len(items) - 1
    assert metrics["overall_lora_win_rate"] == 1.0
    assert "1 stale votes" in (project / "rep/summary.md").read_text()


def test_a_missing_votes_file_is_one_clear_error(project):
    result = run_stage(project, "--votes", "ratings/none.sqlite", "--reports", "rep")
    assert result.returncode == 2
    assert "ratings/none.sqlite: no votes database" in result.stderr and "Traceback" not in result.stderr
    assert not (project / "ratings").exists() and not (project / "q.json").exists()
