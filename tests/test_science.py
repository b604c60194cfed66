"""The paper's claim, on the demo as it ships: a LoRA moves the pretrained base model's images toward the
fine-tuning data, as CMMD and FID against the held-out test images measure it; and the controls a reviewer asks
for, each of which could fail.

`dvc repro` of the unshrunk demo preset in a fresh repo (built-in base model pretrained on the procedural base
world, LoRA trained on the fantasy world it has never drawn), then, in the same repo:

- the LoRA switched off at generation and at half strength (`generate.lora_scale` 0 / 0.5 / 1, generate and
  evaluate only): off moves nothing; FID and text alignment move monotonically with the dose;
- a LoRA trained on the wrong target (epsilon on the v-prediction model) does worse;
- a LoRA trained on the base world (`ingest.world=base`), which the base model already draws: a far smaller CMMD
  gap to its own test images, or none that its interval can tell from 0;
- a LoRA trained on scrambled captions (`train.shuffle_captions`): its images match their prompts worse than the
  right captions' LoRA images, by a t-interval over prompts (paired by prompt and seed) that excludes 0;
- three training seeds through the project's own sweep (`dvc exp run --queue`, `python -m lanskap.sweep`): the
  direction holds for each.

Six trainings in all (the sweep's seed 0 is the demo's run: queued from the committed demo, all its stages are up
to date; DVC keeps no run cache for train_lora, whose outputs persist): about 490 CPU-s, which an idle core runs
in about 8 minutes (356 CPU-s measured for all but the sweep, whose queue workers run detached, plus two
trainings of about 65 CPU-s each).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tests.conftest import copy_project
from tests.test_pipeline import run

pytestmark = pytest.mark.slow
SIGNIFICANCE = 0.05
GAP = "cmmd_vs_test_lora_minus_base"
ALIGNMENT = "clip_cosine_lora_minus_base"


def commit_all(repo: Path, message: str) -> None:
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


def metrics(repo: Path) -> dict:
    return json.loads((repo / "metrics/eval.json").read_text())


def lora_cosines(repo: Path) -> np.ndarray:
    """The unclamped CLIP cosine of each test prompt's LoRA images to its caption, averaged per prompt [n_test]:
    the per-prompt terms of `clip_cosine_lora`, read from the workspace's current run."""
    from lanskap.evaluate.features import load_clip
    from lanskap.evaluate.metrics import clip_cosines

    captions = pd.read_csv(repo / "data/processed/test.csv")["caption"].tolist()
    index = pd.read_csv(repo / "data/generated/index.csv")
    lora = index[index["model"] == "lora"].sort_values(["prompt_index", "sample"])
    clip = load_clip("builtin:tiny-clip", None, device="cpu")
    images = clip.image_embeddings([repo / path for path in lora["path"]])
    cosines = clip_cosines(images, clip.text_embeddings(captions)[lora["prompt_index"].to_numpy()])
    return np.bincount(lora["prompt_index"], cosines) / np.bincount(lora["prompt_index"])


@dataclass(frozen=True)
class Demo:
    repo: Path
    metrics: dict
    cosines: np.ndarray  # per prompt, read before any experiment replaces the demo's images


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Demo:
    repo = copy_project(tmp_path_factory.mktemp("science") / "project")
    run(repo, "git", "init", "-q")
    commit_all(repo, "project")
    run(repo, "dvc", "repro")
    commit_all(repo, "demo results")
    return Demo(repo, metrics(repo), lora_cosines(repo))


def experiment_metrics(repo: Path, *overrides: str) -> dict:
    run(repo, "dvc", "exp", "run", *(arg for override in overrides for arg in ("-S", override)))
    return metrics(repo)


@pytest.fixture(scope="module")
def dose(demo) -> dict[float, dict]:
    """Metrics at generate.lora_scale 0, 0.5 and 1 (the demo): the same LoRA, generate and evaluate only."""
    return {scale: experiment_metrics(demo.repo, f"generate.lora_scale={scale}") for scale in (0.0, 0.5)} | {
        1.0: demo.metrics
    }


def test_lora_moves_images_toward_the_test_images_by_cmmd(demo):
    assert demo.metrics[GAP] < 0, demo.metrics
    assert demo.metrics[GAP + "_ci_high"] < 0 and demo.metrics[GAP + "_pvalue"] <= SIGNIFICANCE, demo.metrics


def test_lora_images_are_closer_to_the_test_images_by_fid(demo):
    assert demo.metrics["fid_test_vs_lora"] < demo.metrics["fid_test_vs_base"], demo.metrics


def test_lora_images_match_their_captions_better(demo):
    """The unclamped cosine gap can fall below 0, so this can fail (the clamped CLIP score could not)."""
    assert demo.metrics[ALIGNMENT + "_ci_low"] > 0, demo.metrics


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
    and is flagged for position bias instead. It reads the demo's own images, so it runs before the experiments
    below replace them in the workspace (tests run in file order)."""
    closer = lambda reference, a, b: "A" if a @ reference >= b @ reference else "B"  # noqa: E731
    clip_rater_votes(demo.repo, tmp_path / "closer.sqlite", 1, closer)
    found = qualitative_metrics(demo.repo, tmp_path / "closer.sqlite", tmp_path / "closer")
    assert found["overall_lora_win_rate"] > 0.5 and found["overall_sign_pvalue"] <= SIGNIFICANCE, found

    clip_rater_votes(demo.repo, tmp_path / "left.sqlite", 1, lambda reference, a, b: "A")
    control = qualitative_metrics(demo.repo, tmp_path / "left.sqlite", tmp_path / "left")
    assert control["overall_sign_pvalue"] > SIGNIFICANCE, control
    assert control["overall_left_share"] == 1.0 and control["overall_left_pvalue"] <= SIGNIFICANCE, control


def test_control_lora_switched_off_moves_nothing(dose):
    off = dose[0.0]
    assert off[GAP] == 0 and off["cmmd_test_vs_lora"] == pytest.approx(off["cmmd_test_vs_base"], abs=1e-9), off
    assert off[GAP + "_changed_pvalue"] > SIGNIFICANCE and off[GAP + "_pvalue"] > SIGNIFICANCE, off


def test_dose_response_fid_and_text_alignment_move_monotonically(dose):
    fid = [dose[scale]["fid_test_vs_lora"] for scale in (0.0, 0.5, 1.0)]
    alignment = [dose[scale]["clip_cosine_lora"] for scale in (0.0, 0.5, 1.0)]
    assert fid[0] > fid[1] > fid[2], fid
    assert alignment[0] < alignment[1] < alignment[2], alignment


def test_control_wrong_training_target_does_worse(demo):
    control = experiment_metrics(demo.repo, "train.prediction_type=epsilon")
    assert control["cmmd_test_vs_lora"] > demo.metrics["cmmd_test_vs_lora"], (control, demo.metrics)
    assert control["fid_test_vs_lora"] > demo.metrics["fid_test_vs_lora"], (control, demo.metrics)


def test_control_a_lora_on_the_world_the_base_already_draws_moves_little(demo):
    control = experiment_metrics(demo.repo, "ingest.world=base")
    includes_zero = control[GAP + "_ci_low"] <= 0 <= control[GAP + "_ci_high"]
    assert includes_zero or 5 * abs(control[GAP]) <= abs(demo.metrics[GAP]), (control, demo.metrics)


def test_control_scrambled_captions_match_their_prompts_worse(demo):
    experiment_metrics(demo.repo, "train.shuffle_captions=true")
    # Same prompts and seeds in both runs: paired by prompt, a t-interval of scrambled minus right.
    differences = lora_cosines(demo.repo) - demo.cosines
    half_width = stats.t.ppf(0.975, len(differences) - 1) * stats.sem(differences)
    assert differences.mean() + half_width < 0, (differences.mean(), half_width, differences)


def test_the_direction_holds_for_each_of_three_training_seeds(demo):
    # DVC queues the workspace as it is, and the controls above left their last experiment in it (dvc.lock and
    # params.yaml of the scrambled captions): from there seed 0 would train again. Queued from the committed demo,
    # seed 0 is the demo's run (all its stages up to date) and only seeds 1 and 2 train.
    run(demo.repo, "git", "checkout", "--", ".")
    queued = run(demo.repo, "dvc", "exp", "run", "--queue", "-S", "train.seed=range(0,3)")
    names = re.findall(r"Queued experiment '([^']+)'", queued)
    assert len(names) == 3, queued
    run(demo.repo, "dvc", "exp", "run", "--run-all")
    metric_args = [arg for metric in (GAP, "fid_test_vs_lora", "fid_test_vs_base") for arg in ("--metric", metric)]
    run(demo.repo, "python", "-m", "lanskap.sweep", *metric_args, *(arg for name in names for arg in ("--exp", name)))
    (setting,) = json.loads((demo.repo / "reports/sweep/summary.json").read_text())["settings"].values()
    assert sorted(seed["seed"] for seed in setting) == [0, 1, 2]
    for seed in setting:
        values = seed["metrics"]
        assert values[GAP] < 0 and values["fid_test_vs_lora"] < values["fid_test_vs_base"], seed
