"""The paper's claim, on the demo as it ships: a LoRA moves the pretrained base model's images toward the
fine-tuning data, as CMMD and FID against the held-out test images measure it.

`dvc repro` of the unshrunk demo preset in a fresh repo (built-in base model pretrained on the procedural base
world, LoRA trained on the fantasy world it has never drawn), then two negative controls that show the test has
teeth: the LoRA switched off at generation (`generate.lora_scale=0`) moves nothing, and a LoRA trained on the
wrong target (epsilon on the v-prediction model) does measurably worse than the right one.
"""

import json
from pathlib import Path

import pytest

from tests.conftest import copy_project
from tests.test_pipeline import run

pytestmark = pytest.mark.slow
SIGNIFICANCE = 0.05


def commit_all(repo: Path, message: str) -> None:
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


def metrics(repo: Path) -> dict:
    return json.loads((repo / "metrics/eval.json").read_text())


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    repo = copy_project(tmp_path_factory.mktemp("science") / "project")
    run(repo, "git", "init", "-q")
    commit_all(repo, "project")
    run(repo, "dvc", "repro")
    commit_all(repo, "demo results")
    return repo


@pytest.fixture(scope="module")
def demo_metrics(demo) -> dict:
    return metrics(demo)


def experiment_metrics(repo: Path, override: str) -> dict:
    run(repo, "dvc", "exp", "run", "-S", override)
    return metrics(repo)


def test_lora_moves_images_toward_the_test_images_by_cmmd(demo_metrics):
    assert demo_metrics["cmmd_vs_test_lora_minus_base"] < 0, demo_metrics
    assert demo_metrics["cmmd_vs_test_lora_minus_base_pvalue"] <= SIGNIFICANCE, demo_metrics


def test_lora_images_are_closer_to_the_test_images_by_fid(demo_metrics):
    assert demo_metrics["fid_test_vs_lora"] < demo_metrics["fid_test_vs_base"], demo_metrics


def test_lora_images_match_their_captions_no_worse(demo_metrics):
    gap, p_value = demo_metrics["clip_cosine_lora_minus_base"], demo_metrics["clip_cosine_lora_minus_base_pvalue"]
    assert gap >= 0 or p_value > SIGNIFICANCE, demo_metrics


def test_control_lora_switched_off_moves_nothing(demo):
    control = experiment_metrics(demo, "generate.lora_scale=0")
    assert control["cmmd_vs_test_lora_minus_base_changed_pvalue"] > SIGNIFICANCE, control
    assert control["cmmd_test_vs_lora"] == pytest.approx(control["cmmd_test_vs_base"], abs=1e-9)


def test_control_wrong_training_target_does_worse(demo, demo_metrics):
    control = experiment_metrics(demo, "train.prediction_type=epsilon")
    assert control["cmmd_test_vs_lora"] > demo_metrics["cmmd_test_vs_lora"], (control, demo_metrics)
    assert control["fid_test_vs_lora"] > demo_metrics["fid_test_vs_lora"], (control, demo_metrics)
