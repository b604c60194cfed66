"""End to end: `dvc repro` of all seven stages in a fresh git repo, then the experiment workflow.

Runs the real commands (dvc, python -m stages.*) on the demo preset shrunk in conf/, so Hydra's
recomposition on `dvc exp run -S` keeps the shrunk values.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lanskap.core.presets import compose_params
from tests.conftest import TINY_OVERRIDES, copy_project

pytestmark = pytest.mark.slow
STAGES = ["ingest", "caption", "split", "preprocess", "train_lora", "generate", "evaluate"]


def run(cwd: Path, *command: str) -> str:
    # LANSKAP_PYTHON: the copies have no .venv of their own for stages/python to find
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "LANSKAP_PYTHON": sys.executable,
    }
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def shrink_conf(repo: Path) -> None:
    config_file = repo / "conf" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    for group, values in TINY_OVERRIDES.items():
        config[group].update(values)
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    compose_params([], repo / "params.yaml", repo / "conf")


def ran_stages(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = copy_project(tmp_path_factory.mktemp("e2e") / "project")
    shrink_conf(repo)
    run(repo, "git", "init", "-q")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project")
    output = run(repo, "dvc", "repro")
    assert ran_stages(output) == STAGES
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results")
    return repo


def test_repro_writes_metrics_loss_log_lora_and_images(repo):
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    for key in ("cmmd_test_vs_lora", "cmmd_test_vs_text", "fid_test_vs_lora", "kid_test_vs_lora", "n_test", "n_lora"):
        assert isinstance(metrics[key], float), key
    assert all(isinstance(value, float) for value in metrics.values())  # flat and numeric for `dvc metrics diff`
    assert (repo / "dvclive/train/plots/metrics/train/loss.tsv").is_file()
    assert (repo / "models/lora/pytorch_lora_weights.safetensors").is_file()
    assert (repo / "models/lora/lora_kohya.safetensors").is_file()
    assert len(list((repo / "data/generated/lora").glob("*.png"))) == metrics["n_lora"]
    assert (repo / "reports/generate/comparison.png").is_file()


def test_second_repro_does_nothing(repo):
    output = run(repo, "dvc", "repro")
    assert ran_stages(output) == []
    assert "Data and pipelines are up to date." in run(repo, "dvc", "repro", "--dry", "--allow-missing")


def test_metrics_and_plots_are_git_tracked_not_cached(repo):
    tracked = run(repo, "git", "ls-files").split()
    for path in ("metrics/eval.json", "dvc.lock", "dvclive/train/metrics.json", "reports/generate/comparison.png"):
        assert path in tracked, path
    assert not any(path.startswith(("data/ingested", "models/lora")) for path in tracked)


def test_a_queued_two_seed_sweep_aggregates(repo):
    """`dvc exp run --queue -S 'train.seed=0,1'` (Hydra's comma list), `dvc exp run --run-all`, then the sweep
    (`python -m lanskap.sweep`). Queued from the committed run, before the experiments below change the workspace:
    seed 0 is that run (every stage up to date) and only seed 1 runs."""
    assert "Queued experiment" in run(repo, "dvc", "exp", "run", "--queue", "-S", "train.seed=0,1")
    run(repo, "dvc", "exp", "run", "--run-all")
    run(repo, "python", "-m", "lanskap.sweep", "--metric", "validation_loss_final", "--metric", "fid_test_vs_lora")
    summary = json.loads((repo / "reports/sweep/summary.json").read_text())
    assert [experiment["seed"] for experiment in summary["settings"]["all"]] == [0, 1]
    losses = {experiment["metrics"]["validation_loss_final"] for experiment in summary["settings"]["all"]}
    assert len(losses) == 2  # the seed changes training: two draws, not one run counted twice
    assert all(row["n"] == 2 and row["ci_low"] < row["mean"] < row["ci_high"] for row in summary["summary"])
    changed = run(repo, "git", "status", "--porcelain", "--untracked-files=all").split("\n")
    sweep_files = ("comparison.csv", "summary.csv", "summary.json", "summary.md")
    assert sorted(filter(None, changed)) == [f"?? reports/sweep/{name}" for name in sweep_files]  # workspace untouched


def test_experiment_reruns_only_the_stages_downstream_of_lora(repo):
    output = run(repo, "dvc", "exp", "run", "-S", "lora.rank=8")
    assert ran_stages(output) == ["train_lora", "generate", "evaluate"]
    assert yaml.safe_load((repo / "params.yaml").read_text())["lora"]["rank"] == 8
    assert "lora.rank" in run(repo, "dvc", "exp", "show", "--csv")
    diff = run(repo, "dvc", "metrics", "diff", "HEAD")
    assert "cmmd_test_vs_lora" in diff
    run(repo, "dvc", "plots", "diff", "HEAD", "-o", str(repo / "plots-diff"))
    assert (repo / "plots-diff" / "index.html").is_file()


def test_a_clone_without_remote_shows_metrics(repo, tmp_path):
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert "cmmd_test_vs_lora" in run(clone, "dvc", "metrics", "show")
