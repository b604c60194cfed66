"""The training loop: set up, resume, preflight, then steps with monitoring and checkpoints."""

import resource
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from lanskap.core.console import progress
from lanskap.core.errors import UserError
from lanskap.core.params import AugmentParams, LoraParams, TrainParams
from lanskap.data.buckets import bucket_groups, nominal_resolution, table_sizes, untrained_message
from lanskap.train.batches import global_batch_size, pixel_batches, training_batches
from lanskap.train.checkpoints import CHECKPOINTS_KEPT, load_checkpoint, save_checkpoint
from lanskap.train.ema import LoraEMA, make_ema
from lanskap.train.latents import LatentCache, encode
from lanskap.train.monitor import HeldOut, Monitor
from lanskap.train.optimizers import evaluation_weights, keep_evaluation_weights
from lanskap.train.setup import Trainer, check_training_sizes, prepare_trainer
from lanskap.train.step import CaptionEncoder, accumulate_gradients, check_finite, diffusion_loss, optimizer_step

DEFAULT_IMAGE_PROMPTS = 4  # validation images of the first test captions when train.image_prompts is empty


@dataclass
class TrainResult:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module | None  # None: the text encoder was frozen
    losses: list[float]
    validation_losses: dict[int, float]
    seconds: float  # this run's, not counting steps restored from a checkpoint
    images_per_second: float  # of the training steps alone
    monitoring_seconds: float  # of `seconds`, spent on validation (losses, images) and checkpoints
    prediction_type: str
    ema: LoraEMA | None  # None: train.ema_decay is off
    ema_validation_losses: dict[int, float]


def train_lora(
    model_dir: Path,
    train_table: pd.DataFrame,
    test_table: pd.DataFrame,
    lora: LoraParams,
    params: TrainParams,
    augment: AugmentParams,
    live=None,
    checkpoint_dir: Path | None = None,
) -> TrainResult:
    """Train a LoRA on the UNet (and the text encoder if train.text_encoder_learning_rate is set); return the
    trained modules (adapters attached, holding the weights to export: schedule-free AdamW's average) and the loss
    history. Run by each of `accelerate launch`'s processes; only the main one logs, samples and writes
    checkpoints (pass `live` there only).

    With `checkpoint_dir` and `params.checkpoint_every`, the full training state is saved there every that many
    steps, and a run finding a checkpoint there resumes from it, bit-identically to an uninterrupted run.
    Each image trains at its table row's bucket size; validation images are squares of about the buckets' area."""
    from accelerate.utils import set_seed

    set_seed(params.seed)
    trainer, optimizer, lr_scheduler = prepare_trainer(model_dir, lora, params)
    parts, accelerator = trainer.parts, trainer.accelerator
    sizes = table_sizes(train_table)
    check_training_sizes(parts, sizes + table_sizes(test_table))
    text_encoder_trains = params.text_encoder_learning_rate is not None
    ema = make_ema(trainer.lora_parameters, params)
    resumed = (
        load_checkpoint(checkpoint_dir, trainer.lora_parameters, optimizer, lr_scheduler, ema)
        if checkpoint_dir
        else None
    )
    first_step = resumed.step if resumed else 0
    check_same_start(accelerator, first_step, checkpoint_dir)
    dataset, keys, captions = training_batches(
        train_table, augment, params, trainer.share, first_batch=first_step * params.gradient_accumulation_steps
    )
    caption_encoder = CaptionEncoder(captions, parts, accelerator.device, text_encoder_trains)
    preflight(trainer, caption_encoder, params, max(sizes, key=lambda size: size[0] * size[1]), checkpoint_dir)
    batches = (
        cached_batches(dataset, keys, trainer, params)
        if params.cached_latents
        else pixel_batches(dataset, keys, params)
    )
    monitor = Monitor(
        live,
        HeldOut.load(test_table, parts, accelerator.device, text_encoder_trains, params.batch_size),
        params.image_prompts or test_table["caption"].tolist()[:DEFAULT_IMAGE_PROMPTS],
        nominal_resolution(sizes),
        params,
        checkpoint_dir / "images" if checkpoint_dir and params.checkpoint_every else None,
        accelerator.is_main_process,
        lambda: evaluation_weights(optimizer, params, list(trainer.lora_parameters.values())),
        ema,
    )
    state = monitor.start(parts, resumed)
    if monitor.main:
        print(
            f"train_lora: global batch {global_batch_size(params, accelerator.num_processes)} = batch_size "
            f"{params.batch_size} x gradient_accumulation_steps {params.gradient_accumulation_steps} x processes "
            f"{accelerator.num_processes}"
        )
        untrained = untrained_message(bucket_groups(sizes), trainer.share.total)
        if untrained:
            print(f"train_lora: warning: {untrained}")
    images_seen, start, training_seconds = 0, time.perf_counter(), 0.0
    bar = progress(
        range(first_step + 1, params.steps + 1),
        desc="train_lora",
        unit="step",
        initial=first_step,
        total=params.steps,
        disable=not monitor.main,
    )
    for step in bar:
        step_start = time.perf_counter()
        loss, images = accumulate_gradients(
            trainer, batches, caption_encoder, params, first_micro_batch=(step - 1) * params.gradient_accumulation_steps
        )
        check_finite(loss, step, params)
        optimizer_step(
            accelerator, list(trainer.lora_parameters.values()), optimizer, lr_scheduler, params.max_grad_norm
        )
        if ema is not None:
            ema.update(step)
        state.step = step
        state.losses.append(loss.item())
        images_seen += images * accelerator.num_processes
        training_seconds += time.perf_counter() - step_start  # the bar's own rate counts validation time too
        images_per_second = images_seen / training_seconds
        train_step_seconds = training_seconds / (step - first_step)
        bar.set_postfix(
            loss=f"{state.losses[-1]:.4f}", img_s=f"{images_per_second:.1f}", s_step=f"{train_step_seconds:.2f}"
        )
        monitor.record(parts, state, lr_scheduler.get_last_lr()[0], images_per_second)
        if monitor.main and checkpoint_dir and params.checkpoint_every and step % params.checkpoint_every == 0:
            save_checkpoint(checkpoint_dir, state, trainer.lora_parameters, optimizer, lr_scheduler, ema)
    seconds = time.perf_counter() - start
    monitoring_seconds = seconds - training_seconds
    keep_evaluation_weights(optimizer, params)
    return TrainResult(
        parts.unet,
        parts.text_encoder if text_encoder_trains else None,
        state.losses,
        state.validation_losses,
        seconds,
        images_seen / training_seconds if images_seen else 0.0,
        monitoring_seconds,
        parts.noise_scheduler.config.prediction_type,
        ema,
        state.ema_validation_losses,
    )


def cached_batches(dataset, keys, trainer: Trainer, params: TrainParams):
    """Micro-batches looked up in a latent cache of train.cached_latents augmented variants per image, built now."""
    start = time.perf_counter()
    cache = LatentCache.build(
        dataset, trainer.parts.vae, trainer.accelerator, params.cached_latents, params.seed, params.dataloader_workers
    )
    if trainer.accelerator.is_main_process:
        print(
            f"train_lora: cached {len(dataset)} images x {params.cached_latents} augmented variants "
            f"({cache.nbytes() / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s"
        )
    return cache.batches(keys)


def preflight(
    trainer: Trainer, captions: CaptionEncoder, params: TrainParams, size: tuple[int, int], checkpoint_dir: Path | None
) -> None:
    """Stop before training, not hours in, when the disk cannot hold the checkpoints and outputs or the GPU cannot
    hold a step at train.batch_size of the largest training size (the error names the batch that fits)."""
    from lanskap.preflight import require_batch_fits, require_free_space, train_lora_bytes

    trainable = sum(parameter.numel() for parameter in trainer.lora_parameters.values())
    require_free_space(
        checkpoint_dir or Path("."),
        train_lora_bytes(trainable, CHECKPOINTS_KEPT, params.optimizer, params.ema_decay is not None),
        "train_lora",
        "lora.rank, or train.checkpoint_every: 0",
    )
    require_batch_fits(
        lambda batch: probe_step(trainer, captions, params, size, batch),
        params.batch_size,
        "train.batch_size",
        trainer.accelerator.device,
        if_none_fits="set train.mixed_precision: bf16 and train.gradient_checkpointing: true, or lower "
        "preprocess.resolution",
        accumulation_key="train.gradient_accumulation_steps",
        accumulation_steps=params.gradient_accumulation_steps,
    )


def probe_step(
    trainer: Trainer, captions: CaptionEncoder, params: TrainParams, size: tuple[int, int], batch: int
) -> None:
    """One forward and backward at `batch` on blank images of size (width, height), on the unwrapped modules (no
    cross-process sync), leaving no gradient and no random draw behind."""
    parts, device = trainer.parts, trainer.accelerator.device
    pixel_values = torch.zeros(batch, 3, size[1], size[0], device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with trainer.accelerator.autocast():
            states = captions(parts.text_encoder, torch.zeros(batch, dtype=torch.long, device=device))
            generator = torch.Generator(device).manual_seed(0)
            loss = diffusion_loss(
                parts,
                encode(parts.vae, pixel_values),
                states,
                generator,
                noise_offset=params.noise_offset,
                snr_gamma=params.snr_gamma,
            )
        loss.backward()
    for parameter in trainer.lora_parameters.values():
        parameter.grad = None


def check_same_start(accelerator, first_step: int, checkpoint_dir: Path | None) -> None:
    """Every process must resume from the same step: on several machines the checkpoint folder has to be on a
    filesystem they all see, or they would train on different steps and the run would be garbage."""
    starts = accelerator.gather(torch.tensor([first_step], device=accelerator.device)).tolist()
    if len(set(starts)) > 1:
        raise UserError(
            f"train_lora: processes would start at different steps {starts}: {checkpoint_dir} must be on "
            "a filesystem every machine shares (or delete it to start over)"
        )


def summarise(result: TrainResult) -> dict:
    best_step = min(result.validation_losses, key=result.validation_losses.get)
    last_step = max(result.validation_losses)
    tail = result.losses[-max(1, len(result.losses) // 10) :]
    ema = {"validation_loss_ema_final": result.ema_validation_losses[last_step]} if result.ema else {}
    return {
        "steps": len(result.losses),
        "loss_first": result.losses[0],
        "loss_final": sum(tail) / len(tail),
        "validation_loss_base": result.validation_losses[0],
        "validation_loss_final": result.validation_losses[last_step],
        "validation_loss_best": result.validation_losses[best_step],
        "validation_loss_best_step": best_step,
        **ema,
        "seconds": round(result.seconds, 2),
        "images_per_second": round(result.images_per_second, 3),
        "monitoring_seconds": round(result.monitoring_seconds, 2),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if torch.cuda.is_available()
        else 0.0,
        "peak_process_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),  # KiB on Linux
    }
