"""Stages run in the project's environment however DVC is called: `.venv/bin/dvc` from a plain shell, `dvc` in an
activated venv (what `make repro` and `uv run dvc` amount to), `dvc exp run --temp`, each time with a decoy
`python` first on PATH. The real DVC runs a probe project whose stage command goes through stages/python."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

VENV = ROOT / ".venv"
PROBE = """import sys
from pathlib import Path

import pandas  # a project dependency: the decoy or a system python would not have it

import stages

Path(sys.argv[1]).write_text(f"{sys.prefix}\\n{Path(stages.__file__).resolve().parent}\\n")
"""


def test_every_stage_command_runs_its_module_through_the_launcher():
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        assert stage["cmd"].startswith(f"sh stages/python -m stages.{name} "), name


def run(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture
def probe_project(tmp_path) -> Path:
    """A DVC project with one stage, `sh stages/python -m stages.probe REPORT`, and a .venv that is the project's."""
    project = tmp_path / "project"
    (project / "stages").mkdir(parents=True)
    (project / "stages" / "python").write_bytes((ROOT / "stages" / "python").read_bytes())
    (project / "stages" / "__init__.py").write_text("")
    (project / "stages" / "probe.py").write_text(PROBE)
    (project / ".venv").symlink_to(VENV)
    stage = {
        "cmd": f"sh stages/python -m stages.probe {tmp_path / 'report.txt'}",
        "deps": ["stages/probe.py"],
        "always_changed": True,
    }
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"probe": stage}}))
    (project / ".gitignore").write_text(".venv\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for command in (
        ["git", "init", "-q"],
        [str(VENV / "bin" / "dvc"), "init", "-q"],
        [*git, "add", "-A"],
        [*git, "commit", "-qm", "probe"],
    ):
        assert run(command, project, os.environ).returncode == 0, command
    return project


def shell_env(tmp_path: Path, activated: bool) -> dict:
    """The caller's environment: a decoy `python` first on PATH, the project's venv activated or not."""
    decoy = tmp_path / "decoy"
    decoy.mkdir(exist_ok=True)
    (decoy / "python").write_text("#!/bin/sh\necho 'the decoy python ran' >&2\nexit 3\n")
    (decoy / "python").chmod(0o755)
    env = {name: value for name, value in os.environ.items() if name not in ("VIRTUAL_ENV", "LANSKAP_PYTHON")}
    path = [str(decoy), "/usr/bin", "/bin"]
    if activated:
        path.insert(0, str(VENV / "bin"))
        env["VIRTUAL_ENV"] = str(VENV)
    return {**env, "PATH": os.pathsep.join(path)}


def report(tmp_path: Path) -> tuple[str, str]:
    prefix, stages_folder = (tmp_path / "report.txt").read_text().splitlines()
    return prefix, stages_folder


@pytest.mark.parametrize("activated", [False, True], ids=["venv-dvc-from-plain-shell", "activated-venv"])
def test_dvc_repro_runs_the_project_interpreter(probe_project, tmp_path, activated):
    dvc = str(VENV / "bin" / "dvc") if not activated else "dvc"
    result = run([dvc, "repro"], probe_project, shell_env(tmp_path, activated))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    prefix, stages_folder = report(tmp_path)
    assert Path(prefix) == probe_project / ".venv"  # the project's (here a link to the real one, which has pandas)
    assert Path(stages_folder) == (probe_project / "stages").resolve()


def test_a_temporary_experiment_runs_the_project_interpreter_on_its_own_copy(probe_project, tmp_path):
    result = run([str(VENV / "bin" / "dvc"), "exp", "run", "--temp"], probe_project, shell_env(tmp_path, False))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    prefix, stages_folder = report(tmp_path)
    assert Path(prefix) == probe_project / ".venv"  # the project root's: the experiment's copy has none
    assert Path(stages_folder).is_relative_to((probe_project / ".dvc" / "tmp" / "exps").resolve())


def test_lanskap_python_overrides_and_a_missing_environment_says_what_to_do(probe_project, tmp_path):
    env = {**shell_env(tmp_path, False), "LANSKAP_PYTHON": str(tmp_path / "decoy" / "python")}
    assert "the decoy python ran" in run(["sh", "stages/python", "-c", "pass"], probe_project, env).stderr
    (probe_project / ".venv").unlink()
    missing = run(["sh", "stages/python", "-c", "pass"], probe_project, shell_env(tmp_path, False))
    assert missing.returncode == 127
    assert f"no Python at {probe_project.resolve()}/.venv/bin/python" in missing.stderr
    assert "make install" in missing.stderr and "LANSKAP_PYTHON" in missing.stderr
