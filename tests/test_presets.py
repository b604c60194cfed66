"""`make params` (python -m lanskap.core.presets): a bad override is
one line naming it, and no stale params.yaml stays."""

import os
import subprocess
import sys

import pytest
import yaml

from lanskap.core.errors import UserError
from lanskap.core.params import load_params
from lanskap.core.presets import compose_params
from tests.conftest import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's code, run from another folder


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("lora.rnak=16", "lora.rnak is not a key: did you mean lora.rank?"),  # misspelt key: Hydra would advise +
        ("lroa.rank=16", "lroa.rank is not a key: did you mean lora.rank?"),  # misspelt group
        ("train.lr=0.1", "train.lr is not a key (the keys are in conf/config.yaml)"),  # nothing close
        ("preset=papr", "Could not find 'preset/papr' Available options in 'preset': demo, paper"),
        ("lora.rank=abc", "lora.rank: Input should be a valid integer"),  # composes, but the value is refused
        ("+lora.rnak=3", "lora.rnak is not a key: did you mean lora.rank?"),  # Hydra's advice taken: still named
        ("+lroa.rank=3", "unknown params group(s) ['lroa']; the groups are"),
        ("+lroa.rank=3", "lroa.rank is not a key: did you mean lora.rank?"),
    ],
)
def test_a_bad_override_names_it_and_removes_params_yaml(tmp_path, override, named):
    (tmp_path / "params.yaml").write_text("lora: {rank: 4}\n")  # the previous params, which must not survive
    with pytest.raises(UserError) as error:
        compose_params([override], tmp_path / "params.yaml", ROOT / "conf")
    assert named in str(error.value) and "\n" not in str(error.value)
    assert "was removed so that no stage runs with the previous params" in str(error.value)
    assert not (tmp_path / "params.yaml").exists()
    assert list(tmp_path.iterdir()) == []  # no staging file left either


def test_a_good_override_replaces_params_yaml(tmp_path):
    (tmp_path / "params.yaml").write_text("lora: {rank: 4}\n")
    compose_params(["lora.rank=16"], tmp_path / "params.yaml", ROOT / "conf")
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["lora"]["rank"] == 16


def test_the_command_prints_one_line_and_no_traceback(tmp_path):
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    (tmp_path / "params.yaml").write_text("lora: {rank: 4}\n")
    run = subprocess.run(
        [sys.executable, "-m", "lanskap.core.presets", "preset=papr"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: cannot compose params.yaml")
    assert not (tmp_path / "params.yaml").exists()


@pytest.mark.parametrize(("argument", "returncode"), [("--help", 0), ("-h", 0), ("--bogus", 2)])
def test_an_option_is_not_an_override_and_leaves_params_yaml_alone(tmp_path, argument, returncode):
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    (tmp_path / "params.yaml").write_text("lora: {rank: 4}\n")
    run = subprocess.run(
        [sys.executable, "-m", "lanskap.core.presets", argument], cwd=tmp_path, capture_output=True, text=True, env=ENV
    )
    assert run.returncode == returncode and "Traceback" not in run.stderr
    assert (run.stdout + run.stderr).startswith("usage: python -m lanskap.core.presets")
    assert (tmp_path / "params.yaml").read_text() == "lora: {rank: 4}\n"


def test_a_stage_reading_a_misspelt_key_names_the_nearest_one(tmp_path):
    """`dvc exp run -S +lora.rnk=4` (Hydra's advice) composes; the stage's validation must still say lora.rank."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["lora"]["rnk"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match=r"lora\.rnk is not a key: did you mean lora\.rank\?"):
        load_params("lora", path=tmp_path / "params.yaml")
