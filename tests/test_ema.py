"""EMA of the LoRA weights: the update rule, resume, export, and generate's choice of the weights it scores."""

import json

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch
from PIL import Image

from lanskap.core.errors import UserError
from lanskap.core.params import conf_group
from lanskap.lora.files import DIFFUSERS_WEIGHT_NAME, EMA_SUBDIR
from lanskap.lora.kohya import kohya_weight_name
from lanskap.train.ema import LoraEMA
from stages import evaluate, generate
from tests.conftest import EVALUATE_ARGS, GENERATE_ARGS, write_params
from tests.test_data_stages import run_data_stages
from tests.test_train import run_interrupted_then_resumed, run_train_stage, with_train

SEQUENCE = [1.0, 2.0, 4.0]  # the parameter after optimizer steps 1, 2, 3 (it starts at 0)


def shadows_along(ema: LoraEMA, parameter: torch.nn.Parameter) -> list[float]:
    values = []
    for update, value in enumerate(SEQUENCE, start=1):
        with torch.no_grad():
            parameter.fill_(value)
        ema.update(update)
        values.append(ema.shadow["weight"][0].item())
    return values


@pytest.mark.parametrize(
    ("warmup", "decay", "expected"),
    [
        # decay_1 = 0, decay_2 = min(0.2, 2/11) = 2/11, decay_3 = min(0.2, 3/12) = 0.2 (the cap acts)
        (True, 0.2, [1.0, 2 / 11 * 1.0 + 9 / 11 * 2.0, 0.2 * (2 / 11 + 18 / 11) + 0.8 * 4.0]),
        # from the initial 0 at a constant 0.5: 0.5, 1.25, 2.625
        (False, 0.5, [0.5, 0.5 * 0.5 + 0.5 * 2.0, 0.5 * 1.25 + 0.5 * 4.0]),
    ],
)
def test_ema_follows_the_hand_computed_average(warmup, decay, expected):
    parameter = torch.nn.Parameter(torch.zeros(3))
    ema = LoraEMA({"weight": parameter}, decay, warmup)
    assert shadows_along(ema, parameter) == pytest.approx(expected, rel=1e-6)
    with ema.applied():
        assert torch.equal(parameter.detach(), ema.shadow["weight"])
    assert torch.equal(parameter.detach(), torch.full((3,), SEQUENCE[-1]))  # the trained value back, exactly


def test_ema_warmup_starts_at_the_first_step_weights_exactly():
    parameter = torch.nn.Parameter(torch.linspace(-1, 1, 7))
    ema = LoraEMA({"weight": parameter}, 0.999, warmup=True)
    with torch.no_grad():
        parameter.mul_(1 / 3)
    ema.update(1)
    assert torch.equal(ema.shadow["weight"], parameter.detach())  # decay_1 = 0: no trace of the initial weights


def test_ema_options_are_validated_and_refused_with_schedule_free():
    for values in ({"ema_decay": 1.0}, {"ema_decay": 0.0}):
        with pytest.raises(UserError, match="train.ema_decay"):
            conf_group("train", **values)
    with pytest.raises(UserError, match="ema_decay with optimizer=adamw_schedulefree"):
        conf_group("train", **{"ema_decay": 0.99, "optimizer": "adamw_schedulefree"})
    with pytest.raises(UserError, match="generate.lora_weights"):
        conf_group("generate", **{"lora_weights": "best"})


def test_resumed_run_with_ema_gives_bit_identical_raw_and_ema_weights(workdir, project_params, monkeypatch):
    run_data_stages(workdir)
    with_train(workdir, project_params, steps=6, ema_decay=0.9, validation_every=2, images_every=0)
    uninterrupted = run_train_stage("models/uninterrupted")
    uninterrupted_ema = safetensors.torch.load_file(f"models/uninterrupted/{EMA_SUBDIR}/{DIFFUSERS_WEIGHT_NAME}")
    ema_log = (workdir / "dvclive/train/plots/metrics/validation/loss_ema.tsv").read_text()

    with_train(workdir, project_params, steps=6, ema_decay=0.9, validation_every=2, images_every=0, checkpoint_every=3)
    resumed = run_interrupted_then_resumed(monkeypatch, "models/resumed")
    resumed_ema = safetensors.torch.load_file(f"models/resumed/{EMA_SUBDIR}/{DIFFUSERS_WEIGHT_NAME}")
    for expected, got in ((uninterrupted, resumed), (uninterrupted_ema, resumed_ema)):
        assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)
    assert (workdir / "dvclive/train/plots/metrics/validation/loss_ema.tsv").read_text() == ema_log
    assert len(ema_log.splitlines()) == 1 + 4  # header, steps 0, 2, 4, 6
    assert not all(torch.equal(resumed[key], resumed_ema[key]) for key in resumed)  # an average, not a copy
    card = (workdir / "models/resumed/README.md").read_text()
    assert f"`{EMA_SUBDIR}/`: the same files for the exponential moving average" in card
    assert (workdir / f"models/resumed/{EMA_SUBDIR}/{kohya_weight_name('lora')}").is_file()
    metrics = json.loads((workdir / "dvclive/train/metrics.json").read_text())
    assert metrics["validation_loss_ema_final"] != metrics["validation_loss_final"]


def generated_images(model: str) -> dict[str, np.ndarray]:
    index = pd.read_csv("data/generated/index.csv")
    rows = index[index["model"] == model]
    return {
        f"{p}-{s}": np.asarray(Image.open(path), dtype=np.float64)
        for p, s, path in zip(rows["prompt_index"], rows["sample"], rows["path"])
    }


def distance_to_base(model: str) -> float:
    base, other = generated_images("base"), generated_images(model)
    return float(np.mean([np.abs(other[key] - base[key]).mean() for key in base]))


def run_generate(workdir, params: dict, lora_weights: str) -> None:
    write_params(workdir, {**params, "generate": {**params["generate"], "lora_weights": lora_weights}})
    generate.main(GENERATE_ARGS)


@pytest.mark.slow
def test_generate_scores_the_ema_weights_when_asked_and_evaluate_records_it(workdir, project_params):
    """Decay 0.99 without warm-up keeps the EMA at 96% of the initial adapter (B = 0: the base model) after 4 steps:
    its images are closer to the base model's than the trained LoRA's are."""
    run_data_stages(workdir)
    params = {**project_params, "train": {**project_params["train"], "ema_decay": 0.99, "ema_warmup": False}}
    write_params(workdir, params)
    run_train_stage()
    run_generate(workdir, params, "raw")
    raw_distance = distance_to_base("lora")
    run_generate(workdir, params, "ema")
    assert set(pd.read_csv("data/generated/index.csv").groupby("model")["lora_weights"].first().items()) == {
        ("base", "none"),
        ("lora", "ema"),
    }
    assert 0 < distance_to_base("lora") < raw_distance
    evaluate.main(EVALUATE_ARGS)
    assert json.loads((workdir / "metrics/eval.json").read_text())["ema_weights_scored"] == 1.0
    assert "from the EMA weights" in (workdir / "reports/evaluate/report.md").read_text()


def test_generate_refuses_ema_weights_that_were_not_trained(workdir, project_params):
    (workdir / "data/processed").mkdir(parents=True)
    (workdir / "data/processed/test.csv").write_text("path,caption\nfjord.png,a fjord\n")
    (workdir / "models/lora").mkdir(parents=True)  # trained without train.ema_decay: no ema/ folder
    with pytest.raises(UserError, match="generate.lora_weights=ema .* train.ema_decay .* generate.lora_weights: raw"):
        run_generate(workdir, project_params, "ema")
    assert not (workdir / "data/generated").exists()
