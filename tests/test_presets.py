"""`make params` (python -m lanskap.core.presets): a bad override is
one line naming it, and no stale params.yaml stays."""

import subprocess
import sys

import pytest
import yaml

from lanskap.core.errors import UserError
from lanskap.core.presets import compose_params
from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("lora.rnak=16", "Could not override 'lora.rnak'. No such key in conf/ (misspelt?)"),  # misspelt key
        ("lroa.rank=16", "Could not override 'lroa.rank'"),  # misspelt group
        ("preset=papr", "Could not find 'preset/papr' Available options in 'preset': demo, paper"),
        ("lora.rank=abc", "lora.rank: Input should be a valid integer"),  # composes, but the value is refused
        ("+lora.rnak=3", "lora.rnak: Extra inputs are not permitted"),
        ("+lroa.rank=3", "unknown params group(s) ['lroa']"),
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
        [sys.executable, "-m", "lanskap.core.presets", "preset=papr"], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: cannot compose params.yaml")
    assert not (tmp_path / "params.yaml").exists()
