"""Prodigy and schedule-free AdamW: they train, resume bit-identically, say what to install, and schedule-free's
evaluation weights are the ones validated and exported."""

import sys

import pytest
import torch

from lanskap.core.errors import UserError
from lanskap.core.params import conf_group
from lanskap.lora.adapters import add_unet_lora
from lanskap.train.optimizers import evaluation_weights, keep_evaluation_weights, make_optimizer
from tests.test_data_stages import run_data_stages
from tests.test_train import run_interrupted_then_resumed, run_train_stage, tiny_unet, with_train

OPTIMIZERS = {  # the settings each is run at: Prodigy's lr multiplies its own step-size estimate
    "adamw": {"learning_rate": 1.0e-2},
    "prodigy": {"learning_rate": 1.0},
    "adamw_schedulefree": {"learning_rate": 1.0e-2, "warmup_steps": 2},
}


def fixed_batch_loss(unet) -> torch.Tensor:
    """The denoising loss of one fixed batch on the tiny UNet: latents [2, 4, 16, 16], states [2, 77, 32]."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    states = torch.randn(2, 77, 32, generator=generator)
    target = torch.randn(2, 4, 16, 16, generator=generator)
    return torch.nn.functional.mse_loss(unet(latents, torch.tensor([100, 700]), states).sample, target)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_optimizer_lowers_the_loss_of_a_fixed_batch_on_the_tiny_model(optimizer):
    torch.manual_seed(0)
    unet = tiny_unet()
    parameters = add_unet_lora(unet, conf_group("lora"))
    params = conf_group("train", optimizer=optimizer, steps=12, **OPTIMIZERS[optimizer])
    optimizer_, lr_scheduler = make_optimizer([{"params": parameters}], params)
    with torch.no_grad():
        before = fixed_batch_loss(unet).item()
    for _ in range(params.steps):
        fixed_batch_loss(unet).backward()
        optimizer_.step()
        lr_scheduler.step()
        optimizer_.zero_grad(set_to_none=True)
    keep_evaluation_weights(optimizer_, params)
    with torch.no_grad():
        after = fixed_batch_loss(unet).item()
    assert after < 0.98 * before, (before, after)


def test_schedule_free_validates_on_its_average_and_training_does_not_notice():
    """Inside evaluation_weights the parameters are schedule-free's evaluation weights (what .eval() gives), after it
    the training weights exactly, so a run that validates every step trains bit-identically to one that never
    does; the weights kept at the end are those validated."""
    params = conf_group("train", optimizer="adamw_schedulefree", learning_rate=0.1)
    runs = []
    for validate in (False, True):
        weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        optimizer, _ = make_optimizer([{"params": [weight]}], params)
        validated = []
        for step in range(5):
            weight.grad = weight.detach() * (step + 1)
            optimizer.step()
            if validate:
                training = weight.detach().clone()
                with evaluation_weights(optimizer, params, [weight]):
                    validated.append(weight.detach().clone())
                assert torch.equal(weight.detach(), training)
                assert step == 0 or not torch.equal(validated[-1], training)  # y = x after the first step only
        keep_evaluation_weights(optimizer, params)
        runs.append((weight.detach().clone(), validated))
    (unvalidated_final, _), (validated_final, validated) = runs
    assert torch.equal(unvalidated_final, validated_final) and torch.equal(validated_final, validated[-1])


@pytest.mark.parametrize(("optimizer", "package"), [("prodigy", "prodigyopt"), ("adamw_schedulefree", "schedulefree")])
def test_a_missing_optimizer_package_is_an_error_saying_how_to_install_it(optimizer, package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    params = conf_group("train", optimizer=optimizer, **OPTIMIZERS[optimizer])
    with pytest.raises(UserError, match=f"train.optimizer={optimizer} needs {package}.*uv pip install {package}"):
        make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}], params)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"optimizer": "prodigy", "learning_rate": 1.0e-3}, "prodigy estimates its own step size.*learning_rate: 1.0"),
        ({"optimizer": "prodigy", "learning_rate": 1.0, "text_encoder_learning_rate": 0.5}, "one learning rate"),
        ({"optimizer": "adamw_schedulefree", "lr_scheduler": "cosine"}, "lr_scheduler='cosine' must be constant"),
    ],
)
def test_optimizer_settings_that_would_not_take_effect_are_refused(values, message):
    with pytest.raises(UserError, match=f"train.*{message}"):
        conf_group("train", **values)
    # schedule-free's warm-up is its own, under the constant schedule the other optimizers' warm-up is refused with
    assert conf_group("train", **{"optimizer": "adamw_schedulefree", "warmup_steps": 5}).warmup_steps == 5


def test_prodigy_steps_scale_with_the_lr_schedule():
    """The scheduler sets the lr Prodigy multiplies its estimate by: 0 at the start of a linear warm-up (no move),
    then rising."""
    params = conf_group("train", optimizer="prodigy", learning_rate=1.0, lr_scheduler="linear", warmup_steps=4, steps=8)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer, lr_scheduler = make_optimizer([{"params": [weight]}], params)
    rates, weights = [], []
    for _ in range(params.steps):
        rates.append(optimizer.param_groups[0]["lr"])
        weight.grad = torch.ones(3)
        optimizer.step()
        lr_scheduler.step()
        weights.append(weight.detach().clone())
    assert rates == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25])
    assert torch.equal(weights[0], torch.ones(3)) and (weights[1] < weights[0]).all()


@pytest.mark.parametrize("optimizer", ["prodigy", "adamw_schedulefree"])
def test_resumed_run_is_bit_identical(optimizer, workdir, project_params, monkeypatch):
    run_data_stages(workdir)
    settings = {"steps": 6, "validation_every": 1, "images_every": 0, "optimizer": optimizer, **OPTIMIZERS[optimizer]}
    with_train(workdir, project_params, **settings)
    uninterrupted = run_train_stage("models/uninterrupted")
    with_train(workdir, project_params, **settings, checkpoint_every=3)
    resumed = run_interrupted_then_resumed(monkeypatch, "models/resumed")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)
    with_train(workdir, project_params, **{**settings, "validation_every": 6})  # validating changes no weight
    assert all(torch.equal(value, uninterrupted[key]) for key, value in run_train_stage("models/rare").items())
