"""Contracts of train_lora: deterministic on CPU, learns, stops clearly on a NaN loss."""

import importlib.util
import json

import pytest
import safetensors.torch
import torch

from lanskap.core.errors import UserError
from lanskap.core.params import conf_group
from lanskap.lora.adapters import add_unet_lora
from lanskap.lora.files import DIFFUSERS_WEIGHT_NAME, export_lora
from lanskap.lora.kohya import kohya_alpha, kohya_weight_name
from lanskap.models.resolve import BUILTIN_TINY_SD2, resolve_base_model
from lanskap.train import loop, step
from lanskap.train.batches import BatchShare, global_batch_size, scrambled, training_batches
from lanskap.train.loop import check_same_start
from lanskap.train.optimizers import make_optimizer
from lanskap.train.step import drop_captions, min_snr_weights
from stages import train_lora
from tests.conftest import write_params
from tests.test_data_stages import run_data_stages, tree_digest


def run_train_stage(out="models/lora") -> dict[str, torch.Tensor]:
    """Run train_lora as DVC does and return its diffusers-format LoRA tensors."""
    train_lora.main(["--data", "data/processed", "--out", out, "--live", "dvclive/train"])
    return safetensors.torch.load_file(f"{out}/{DIFFUSERS_WEIGHT_NAME}")


def with_train(workdir, project_params, **values) -> None:
    write_params(workdir, {**project_params, "train": {**project_params["train"], **values}})


def test_same_seed_gives_bit_identical_lora_weights_and_files(workdir):
    run_data_stages(workdir)
    first = run_train_stage("models/first")
    second = run_train_stage("models/second")
    assert first.keys() == second.keys() and first
    assert all(torch.equal(first[key], second[key]) for key in first)
    # the files too (the model card leaves timings to the log), so DVC sees an unchanged output
    assert tree_digest(workdir / "models/first") == tree_digest(workdir / "models/second")


def test_dataloader_workers_change_no_result(workdir, project_params):
    run_data_stages(workdir)
    in_process = run_train_stage("models/in_process")
    with_train(workdir, project_params, dataloader_workers=2)
    with_workers = run_train_stage("models/with_workers")
    assert in_process.keys() == with_workers.keys()
    assert all(torch.equal(in_process[key], with_workers[key]) for key in in_process)


def test_dataloader_workers_are_capped_at_the_cores_this_process_may_use(monkeypatch):
    from lanskap.train import batches

    monkeypatch.setattr(batches.os, "sched_getaffinity", lambda pid: {0, 1})
    assert [batches.loader_workers(setting) for setting in (0, 1, 2, 4)] == [0, 1, 2, 2]


def test_held_out_validation_loss_falls(workdir, project_params):
    run_data_stages(workdir)
    with_train(workdir, project_params, steps=20, validation_every=10, learning_rate=1.0e-2)
    run_train_stage()
    metrics = json.loads((workdir / "dvclive/train/metrics.json").read_text())
    assert metrics["validation_loss_final"] < metrics["validation_loss_base"]


def test_nan_loss_stops_naming_fp16_and_learning_rate_and_writes_nothing(workdir, monkeypatch):
    run_data_stages(workdir)
    monkeypatch.setattr(step, "diffusion_loss", lambda *args, **kwargs: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(UserError, match="(?s)fp16.*learning_rate"):
        run_train_stage()
    assert not (workdir / "models").exists()


@pytest.mark.parametrize("cached_latents", [0, 3])
def test_interrupted_run_resumes_to_bit_identical_weights(workdir, project_params, monkeypatch, cached_latents):
    """Kill the run right after its second checkpoint (step 10, mid second epoch), rerun: same weights, validation
    losses and validation images as a run never interrupted, and no checkpoint left once the output is written;
    with augmented images encoded every step, or looked up in a latent cache the resumed run builds again."""
    run_data_stages(workdir)
    with_train(workdir, project_params, steps=12, checkpoint_every=0, images_every=5, cached_latents=cached_latents)
    uninterrupted = run_train_stage("models/uninterrupted")
    uninterrupted_log = training_log(workdir)

    with_train(workdir, project_params, steps=12, checkpoint_every=5, images_every=5, cached_latents=cached_latents)
    saved_steps, save_checkpoint = [], loop.save_checkpoint

    def save_then_die_on_the_second(checkpoint_dir, state, *args):
        saved_steps.append(save_checkpoint(checkpoint_dir, state, *args).name)
        if len(saved_steps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_train_stage("models/resumed")
    assert saved_steps == ["step-00000005", "step-00000010"] and not (workdir / "models/resumed").exists()
    monkeypatch.setattr(loop, "save_checkpoint", save_checkpoint)

    resumed = run_train_stage("models/resumed")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)
    assert training_log(workdir) == uninterrupted_log
    assert sorted(uninterrupted_log["images"]) == [f"step-{step:06d}.jpg" for step in (0, 5, 10, 12)]
    assert not any((workdir / ".lanskap-cache/checkpoints").iterdir())


def run_interrupted_then_resumed(monkeypatch, out: str, stop_after: int = 1) -> dict[str, torch.Tensor]:
    """Run train_lora until its `stop_after`-th checkpoint is written, kill it there, and run it again: the resumed
    run's diffusers-format LoRA tensors (params.yaml must set train.checkpoint_every)."""
    saved, save_checkpoint = [], loop.save_checkpoint

    def save_then_die(checkpoint_dir, state, *args):
        saved.append(save_checkpoint(checkpoint_dir, state, *args))
        if len(saved) == stop_after:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run_train_stage(out)
    assert len(saved) == stop_after
    return run_train_stage(out)


def training_log(workdir) -> dict:
    """The DVCLive log's validation-loss rows and validation images (bytes), which must not depend on timing."""
    plots = workdir / "dvclive/train/plots"
    return {
        "validation_loss": (plots / "metrics/validation/loss.tsv").read_text(),
        "images": {path.name: path.read_bytes() for path in (plots / "images/validation").glob("*.jpg")},
    }


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_formula(prediction_type):
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(prediction_type=prediction_type)
    timesteps = torch.tensor([0, 100, 500, 999])  # SNR from ~10^4 (clipped by gamma) down to ~0 (not clipped)
    alphas_cumprod = noise_scheduler.alphas_cumprod[timesteps].double()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    gamma = 5.0
    divisor = snr + 1 if prediction_type == "v_prediction" else snr
    expected = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / divisor
    weights = min_snr_weights(noise_scheduler, timesteps, gamma)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=0)
    assert snr[0] > gamma > snr[-1]  # both branches of the min are exercised


def test_caption_dropout_replaces_captions_at_the_given_rate_whatever_the_process_split():
    ids, empty_id, total = torch.arange(20_000), -1, 20_000
    whole = drop_captions(ids, empty_id, 0.3, torch.Generator().manual_seed(0), BatchShare(total))
    assert (whole == empty_id).float().mean().item() == pytest.approx(0.3, abs=0.015)
    assert ((whole == ids) | (whole == empty_id)).all()
    halves = [
        drop_captions(
            ids[start : start + total // 2],
            empty_id,
            0.3,
            torch.Generator().manual_seed(0),
            BatchShare(total, start, total // 2),
        )
        for start in (0, total // 2)
    ]
    assert torch.equal(torch.cat(halves), whole)  # two processes drop exactly what one process drops
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert drop_captions(ids, empty_id, 0.0, generator, BatchShare(total)) is ids
    assert torch.equal(generator.get_state(), state)  # off: no draw, so runs without it are unchanged


def test_shuffled_captions_give_every_image_another_images_caption():
    import pandas as pd

    captions = [f"caption {i}" for i in range(9)]
    paths = [f"{i}.png" for i in range(9)]
    table = pd.DataFrame({"path": paths, "caption": captions, "bucket_width": 8, "bucket_height": 8})
    kept, shuffled = (
        training_batches(
            table, conf_group("augment"), conf_group("train", shuffle_captions=on, seed=3), BatchShare(4), 0
        )[0]
        for on in (False, True)
    )
    own = [captions.index(c) for c in captions]  # load_split indexes the sorted distinct captions: here in order
    assert kept.caption_index == own
    assert sorted(shuffled.caption_index) == own  # the same captions, each trained on once
    assert all(moved != mine for moved, mine in zip(shuffled.caption_index, own))  # none on its own image
    assert scrambled(own, 3) == shuffled.caption_index and scrambled(own, 4) != scrambled(own, 3)


def test_text_encoder_lora_trains_at_its_own_learning_rate_and_is_exported(workdir, project_params):
    run_data_stages(workdir)
    with_train(workdir, project_params, steps=2, text_encoder_learning_rate=1.0e-2)
    weights = run_train_stage()
    text_up = [key for key in weights if key.startswith("text_encoder.") and ".lora_B." in key]
    assert text_up and all(weights[key].abs().max() > 0 for key in text_up)  # B moved off its zero init
    kohya = safetensors.torch.load_file(f"models/lora/{kohya_weight_name('lora')}")
    assert any(key.startswith("lora_te_text_model_encoder_layers_") for key in kohya)
    with_train(workdir, project_params, steps=2)
    frozen = run_train_stage("models/frozen")
    assert not any(key.startswith("text_encoder.") for key in frozen)


def test_optimizer_groups_carry_each_learning_rate_and_adamw8bit_needs_bitsandbytes():
    unet_weight, text_weight = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    params = conf_group(
        "train",
        learning_rate=1.0e-4,
        text_encoder_learning_rate=5.0e-5,
        lr_scheduler="linear",
        warmup_steps=10,
        steps=100,
    )
    optimizer, lr_scheduler = make_optimizer(
        [{"params": [unet_weight], "lr": 1.0e-4}, {"params": [text_weight], "lr": 5.0e-5}], params
    )
    for _ in range(5):
        optimizer.step()
        lr_scheduler.step()
    assert lr_scheduler.get_last_lr() == pytest.approx([0.5e-4, 2.5e-5])  # half-way through the warm-up, each
    if importlib.util.find_spec("bitsandbytes") is None:  # not a dependency: the option says what to install
        with pytest.raises(UserError, match="adamw8bit needs bitsandbytes"):
            make_optimizer([{"params": [unet_weight]}], conf_group("train", optimizer="adamw8bit"))


def test_global_batch_size_and_trainer_option_validation():
    assert global_batch_size(conf_group("train", batch_size=4, gradient_accumulation_steps=3), num_processes=2) == 24
    for key, value in [
        ("snr_gamma", 0.0),
        ("gradient_accumulation_steps", 0),
        ("caption_dropout", 1.0),
        ("noise_offset", -0.1),
    ]:
        with pytest.raises(UserError, match=f"train.{key}"):
            conf_group("train", **{key: value})
    with pytest.raises(UserError, match="lora.init_lora_weights"):
        conf_group("lora", **{"init_lora_weights": "pissa"})


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(resolve_base_model(BUILTIN_TINY_SD2, None).path, subfolder="unet")


def test_dora_adds_magnitude_vectors_and_skips_the_kohya_file(tmp_path, capsys):
    params = conf_group("lora", use_dora=True)
    unet = tiny_unet()
    add_unet_lora(unet, params)
    names = [name for name, p in unet.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in name for name in names)
    base = {
        "model": "tiny",
        "revision": "n/a",
        "prediction_type": "v_prediction",
        "resolution": 32,
        "steps": 1,
        "train_images": 1,
        "data_sha256": "0" * 64,
    }
    files = export_lora(unet, tmp_path, params, base)
    assert set(files) == {"diffusers"} and files["diffusers"].is_file()
    assert not (tmp_path / kohya_weight_name("lora")).exists() and "kohya format has no DoRA" in capsys.readouterr().out


@pytest.mark.parametrize(("use_rslora", "scale"), [(False, 8.0 / 4), (True, 8.0 / 2)])
def test_rslora_scales_by_alpha_over_sqrt_rank_and_kohya_alpha_keeps_that_scale(use_rslora, scale):
    params = conf_group("lora", rank=4, alpha=8.0, use_rslora=use_rslora, init_lora_weights="kaiming")
    unet = tiny_unet()
    add_unet_lora(unet, params)
    config = unet.peft_config["default"]
    assert config.use_rslora is use_rslora and config.init_lora_weights is True
    layers = [module for module in unet.modules() if hasattr(module, "lora_B") and "default" in module.lora_B]
    assert layers and all(layer.scaling["default"] == scale for layer in layers)
    assert all(not layer.lora_B["default"].weight.any() for layer in layers)  # B = 0: starts as the base model
    assert kohya_alpha(params) / params.rank == scale  # what kohya's loaders apply


def test_all_trainer_options_together_train_finitely(workdir, project_params, capsys):
    run_data_stages(workdir)
    with_train(
        workdir,
        project_params,
        steps=2,
        batch_size=1,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        snr_gamma=5.0,
        noise_offset=0.1,
        caption_dropout=0.5,
    )
    write_params(workdir, {**yaml_params(workdir), "lora": {**project_params["lora"], "use_rslora": True}})
    weights = run_train_stage()
    assert "global batch 2 = batch_size 1 x gradient_accumulation_steps 2 x processes 1" in capsys.readouterr().out
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    metrics = json.loads((workdir / "dvclive/train/metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["images_per_second"] > 0 and metrics["monitoring_seconds"] > 0


def test_lora_dropout_acts_and_gradient_checkpointing_changes_no_result(workdir, project_params):
    """The UNet trains in train mode (from_pretrained leaves it in eval, where dropout is off); checkpointing
    recomputes the same activations."""
    run_data_stages(workdir)
    plain = run_train_stage("models/plain")
    with_train(workdir, project_params, gradient_checkpointing=True)
    checkpointed = run_train_stage("models/checkpointed")
    assert all(torch.allclose(plain[key], checkpointed[key], rtol=0, atol=1e-6) for key in plain)
    write_params(workdir, {**yaml_params(workdir), "lora": {**project_params["lora"], "dropout": 0.5}})
    with_dropout = run_train_stage("models/dropout")
    assert not all(torch.allclose(plain[key], with_dropout[key], atol=1e-6) for key in plain)


def yaml_params(workdir) -> dict:
    import yaml

    return yaml.safe_load((workdir / "params.yaml").read_text())


def test_gpu_preflight_names_the_batch_that_fits_and_the_probe_leaves_no_trace(workdir, project_params, monkeypatch):
    """A pretend GPU on which only a batch of 1 fits: the stage stops before training, suggesting batch 1 with
    accumulation; the real probe step (run for batch 1) leaves no gradient and draws nothing from the RNG."""
    from lanskap import preflight

    run_data_stages(workdir)
    with_train(workdir, project_params, batch_size=2)
    probed, real_probe = [], loop.probe_step

    def probe_on_a_small_gpu(trainer, captions, params, resolution, batch):
        probed.append(batch)
        if batch > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (pretend)")
        rng = torch.get_rng_state()
        real_probe(trainer, captions, params, resolution, batch)
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(parameter.grad is None for parameter in trainer.lora_parameters.values())

    monkeypatch.setattr(preflight, "is_cuda", lambda device: True)
    monkeypatch.setattr(preflight, "gpu_memory", lambda device: (24 * 2**30, 20 * 2**30))
    monkeypatch.setattr(loop, "probe_step", probe_on_a_small_gpu)
    with pytest.raises(
        UserError,
        match="train.batch_size=2 does not fit .* batch 1 fits: set train.batch_size: 1 "
        "and train.gradient_accumulation_steps: 2 to keep the global batch of 2",
    ):
        run_train_stage()
    assert probed == [2, 1] and not (workdir / "models").exists()


def test_fp16_is_refused_for_a_unet_whose_attention_overflows_in_fp16(workdir, project_params):
    run_data_stages(workdir)
    with_train(workdir, project_params, mixed_precision="fp16")
    with pytest.raises(UserError, match="train.mixed_precision=fp16 .* upcast_attention .* bf16"):
        run_train_stage()
    assert not (workdir / "models").exists()


def test_bf16_is_refused_on_a_cpu_that_would_emulate_it_and_accepted_where_it_is_native(monkeypatch):
    from lanskap.core import determinism
    from lanskap.models import resolve
    from lanskap.train.setup import check_mixed_precision

    model_dir = resolve.resolve_base_model("builtin:tiny-sd2", None).path
    params = conf_group("train", mixed_precision="bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(determinism, "cpu_flags", lambda: {"avx2", "fma"})  # AVX2 only: bf16 emulated
    monkeypatch.setenv(determinism.SWITCH, "native")
    with pytest.raises(UserError, match="train.mixed_precision=bf16 on this CPU: .*100x slower.*'no'"):
        check_mixed_precision(model_dir, params)
    monkeypatch.setattr(determinism, "cpu_flags", lambda: {"avx2", "fma", "amx_bf16"})
    check_mixed_precision(model_dir, params)  # native bf16 with unpinned math: accepted
    monkeypatch.setenv(determinism.SWITCH, "pinned")
    with pytest.raises(UserError, match="LANSKAP_CPU_MATH is not `native`"):
        check_mixed_precision(model_dir, params)


def test_processes_that_would_resume_from_different_steps_stop():
    class TwoMachines:  # the gather of a checkpoint step seen by one machine and not the other
        device = torch.device("cpu")

        def gather(self, tensor):
            return torch.cat([tensor, torch.tensor([0])])

    check_same_start(TwoMachines(), 0, None)  # both start fresh: fine
    with pytest.raises(UserError, match=r"different steps \[8, 0\].*filesystem every machine shares"):
        check_same_start(TwoMachines(), 8, "/local/checkpoints")
