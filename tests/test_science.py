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


def clip_rater_votes(repo: Path, votes: Path, raters: int, pick) -> None:
    """Simulated raters on the demo's images, through the real votes database and each rater's real sides: they
    see A and B and answer "overall" by `pick(reference, a, b)` over the built-in CLIP's image embeddings."""
    from lanskap.evaluate.features import load_clip
    from lanskap.rate import votes as db
    from lanskap.rate.items import rater_plan, read_items

    items = read_items(repo / "data/generated/index.csv", root=repo)
    clip = load_clip("builtin:tiny-clip", None)
    embed = {}
    for name in ("reference", "base", "lora"):
        embed[name] = clip.image_embeddings([getattr(item, name) for item in items])
    connection = db.connect(votes, create=True)
    for rater in (f"sim{r}" for r in range(raters)):
        for n, (item, side) in enumerate(zip(items, rater_plan(items, rater, seed=0)[1], strict=True)):
            a, b = (embed["lora"][n], embed["base"][n]) if side == "left" else (embed["base"][n], embed["lora"][n])
            vote = db.Vote(rater, item.prompt_index, item.sample, item.caption, item.base_sha256, item.lora_sha256,
                           side, "overall", pick(embed["reference"][n], a, b))  # fmt: skip
            db.record(connection, vote)
    db.close(connection)


def qualitative_metrics(repo: Path, votes: Path, out: Path) -> dict:
    run(repo, "python", "-m", "stages.qualitative", "--votes", str(votes), "--generated", "data/generated",
        "--out", str(out / "qualitative.json"), "--reports", str(out / "reports"))  # fmt: skip
    return json.loads((out / "qualitative.json").read_text())


def test_a_rater_who_prefers_the_image_closer_to_the_reference_prefers_the_lora(demo, tmp_path):
    """The blind rating's statistics on the demo: a simulated rater who picks the image nearer the reference test
    image in CLIP space finds the LoRA better overall (sign test); one who always picks A (left) finds nothing,
    and is flagged for position bias instead."""
    closer = lambda reference, a, b: "A" if a @ reference >= b @ reference else "B"  # noqa: E731
    clip_rater_votes(demo, tmp_path / "closer.sqlite", 1, closer)
    found = qualitative_metrics(demo, tmp_path / "closer.sqlite", tmp_path / "closer")
    assert found["overall_lora_win_rate"] > 0.5 and found["overall_sign_pvalue"] <= SIGNIFICANCE, found

    clip_rater_votes(demo, tmp_path / "left.sqlite", 1, lambda reference, a, b: "A")
    control = qualitative_metrics(demo, tmp_path / "left.sqlite", tmp_path / "left")
    assert control["overall_sign_pvalue"] > SIGNIFICANCE, control
    assert control["overall_left_share"] == 1.0 and control["overall_left_pvalue"] <= SIGNIFICANCE, control


def test_control_lora_switched_off_moves_nothing(demo):
    control = experiment_metrics(demo, "generate.lora_scale=0")
    assert control["cmmd_vs_test_lora_minus_base_changed_pvalue"] > SIGNIFICANCE, control
    assert control["cmmd_test_vs_lora"] == pytest.approx(control["cmmd_test_vs_base"], abs=1e-9)


def test_control_wrong_training_target_does_worse(demo, demo_metrics):
    control = experiment_metrics(demo, "train.prediction_type=epsilon")
    assert control["cmmd_test_vs_lora"] > demo_metrics["cmmd_test_vs_lora"], (control, demo_metrics)
    assert control["fid_test_vs_lora"] > demo_metrics["fid_test_vs_lora"], (control, demo_metrics)
