"""LoRA fine-tuning of a Stable Diffusion 2.x UNet with diffusers, peft and accelerate.

One training step, in diffusers vocabulary:
    pixel_values --vae--> latents; noise ~ N(0, 1); timesteps ~ U{0, T-1}
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise (epsilon) or noise_scheduler.get_velocity(...) (v_prediction), from the scheduler config
    loss = mse(unet(noisy_latents, timesteps, encoder_hidden_states), target)
Only the LoRA parameters train (in fp32, whatever the frozen weights' dtype). The frozen text encoder runs
once per distinct caption, not once per step; augmentation runs on the fly, so latents are not cached.
"""

import json
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lanskap.augment import eval_transform, train_transform
from lanskap.errors import UserError
from lanskap.io import atomic_dir
from lanskap.params import AugmentParams, LoraParams, TrainParams

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHECKPOINTS_KEPT = 2  # the newest is complete (atomic rename); the one before is a spare


@dataclass
class Components:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object


def load_components(model_dir: Path, weight_dtype: torch.dtype, device: torch.device) -> Components:
    """The pipeline's parts from a local diffusers folder, frozen, in the frozen-weights dtype."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    parts = Components(
        tokenizer=CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder"),
        vae=AutoencoderKL.from_pretrained(model_dir, subfolder="vae"),
        unet=UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet"),
        noise_scheduler=DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler"),
    )
    for module in (parts.text_encoder, parts.vae, parts.unet):
        module.requires_grad_(False)
        module.to(device, dtype=weight_dtype)
    return parts


@torch.inference_mode()
def encode_captions(captions: list[str], parts: Components, device) -> torch.Tensor:
    """Text-encoder hidden states for each caption: [n_captions, 77, hidden]; computed once per run."""
    tokens = parts.tokenizer(captions, padding="max_length", truncation=True,
                             max_length=parts.tokenizer.model_max_length, return_tensors="pt")
    states = [parts.text_encoder(ids[None].to(device))[0] for ids in tokens.input_ids]
    return torch.cat(states).clone()  # clone: leave inference mode so autograd can use it as an input


class CaptionedImages(Dataset):
    """Canonical training images, transformed on access; returns (pixels [3, H, W], caption index)."""

    def __init__(self, paths: list[str], caption_index: list[int], transform):
        self.paths, self.caption_index, self.transform = paths, caption_index, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.caption_index[index]


def training_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet learns to predict, as the base model was trained: never silently changed."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(f"model scheduler has prediction_type={prediction_type!r}; only epsilon and v_prediction are supported")


def min_snr_weights(noise_scheduler, timesteps, snr_gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), one per sample: min(SNR, gamma) / SNR for an epsilon target
    and min(SNR, gamma) / (SNR + 1) for a v target, whose loss is already SNR + 1 times the epsilon one."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=snr_gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(parts: Components, pixel_values, encoder_hidden_states, generator=None, noise_offset: float = 0.0,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """The denoising loss of one batch: pixels [B, 3, H, W] in [-1, 1], states [B, 77, hidden].

    noise_offset adds per-channel constant noise (lets the model shift mean brightness); snr_gamma weights each
    sample by min-SNR. Both default off, as the validation loss uses it."""
    vae_dtype = next(parts.vae.parameters()).dtype
    latents = parts.vae.encode(pixel_values.to(vae_dtype)).latent_dist.sample(generator)
    latents = latents * parts.vae.config.scaling_factor  # [B, 4, H/f, W/f]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator,
                                                   device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=latents.device)
    noisy_latents = parts.noise_scheduler.add_noise(latents, noise, timesteps)
    target = training_target(parts.noise_scheduler, latents, noise, timesteps)
    prediction = parts.unet(noisy_latents, timesteps, encoder_hidden_states.to(noisy_latents.dtype)).sample
    if snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(parts.noise_scheduler, timesteps, snr_gamma)).mean()


def drop_captions(encoder_hidden_states, empty_caption_state, probability: float) -> torch.Tensor:
    """Replace each sample's caption states by the empty caption's with `probability` (teaches the unconditional
    prediction classifier-free guidance uses). Draws no random numbers when off, so default runs are unchanged."""
    if not probability:
        return encoder_hidden_states
    dropped = torch.rand(encoder_hidden_states.shape[0], device=encoder_hidden_states.device) < probability
    return torch.where(dropped[:, None, None], empty_caption_state, encoder_hidden_states)


def check_finite(loss: torch.Tensor, step: int, params: TrainParams) -> None:
    if not torch.isfinite(loss):
        raise UserError(
            f"train_lora: loss is {loss.item()} at step {step}. Likely causes: train.mixed_precision=fp16 with "
            "SD 2.x (its attention overflows in fp16: use bf16 or no), or train.learning_rate="
            f"{params.learning_rate} too high. Nothing was saved."
        )


def validation_loss(parts: Components, pixel_values, encoder_hidden_states, seed: int) -> float:
    """Loss on held-out images with fixed noise and timesteps, so values are comparable across steps; the UNet
    is in eval mode meanwhile (no LoRA dropout)."""
    generator = torch.Generator(pixel_values.device).manual_seed(seed)
    was_training = parts.unet.training
    parts.unet.eval()
    try:
        with torch.no_grad():
            return diffusion_loss(parts, pixel_values, encoder_hidden_states, generator).item()
    finally:
        parts.unet.train(was_training)


def load_split(table: pd.DataFrame) -> tuple[list[str], list[int], list[str]]:
    """Paths, each row's index into the distinct captions, and the distinct captions."""
    captions = sorted(set(table["caption"]))
    position = {caption: index for index, caption in enumerate(captions)}
    return table["path"].tolist(), [position[c] for c in table["caption"]], captions


def make_optimizer(lora_parameters, params: TrainParams, fused: bool | None = None):
    """AdamW and its lr scheduler; `fused` picks torch's single-kernel AdamW (None: torch's default)."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(
        lora_parameters, lr=params.learning_rate, betas=(params.adam_beta1, params.adam_beta2),
        weight_decay=params.adam_weight_decay, eps=params.adam_epsilon, fused=fused,
    )
    lr_scheduler = get_scheduler(params.lr_scheduler, optimizer, num_warmup_steps=params.warmup_steps,
                                 num_training_steps=params.steps)
    return optimizer, lr_scheduler


def held_out_batch(table: pd.DataFrame, parts: Components, device, resolution: int):
    """Test images (canonical, centre-cropped, not augmented) and their caption states, for the validation loss."""
    to_tensor = eval_transform(resolution)
    pixels = torch.stack([to_tensor(Image.open(path).convert("RGB")) for path in table["path"]])
    return pixels.to(device), encode_captions(table["caption"].tolist(), parts, device)


def batch_indices(num_images: int, batch_size: int, seed: int, start: int) -> Iterator[list[int]]:
    """Index batches forever, from batch number `start` on; each epoch is a fresh permutation drawn from one seeded
    generator, so the loader's position is a function of the batch count alone and a resumed run draws the same
    batches. The last partial batch of an epoch is dropped unless it is the only one."""
    batches_per_epoch = max(1, num_images // batch_size)
    epoch, position = divmod(start, batches_per_epoch)
    order_generator = torch.Generator().manual_seed(seed)
    for _ in range(epoch):  # replay the permutations of the epochs already done
        torch.randperm(num_images, generator=order_generator)
    while True:
        order = torch.randperm(num_images, generator=order_generator).tolist()
        for batch in range(position, batches_per_epoch):
            yield order[batch * batch_size:(batch + 1) * batch_size]
        position = 0


@dataclass
class TrainingState:
    """What a resumed run needs besides the modules: where it is and what it has logged."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    validation_losses: dict[int, float] = field(default_factory=dict)
    logged: list[dict] = field(default_factory=list)  # DVCLive rows, replayed on resume (DVC deletes the log)


def save_checkpoint(checkpoint_dir: Path, state: TrainingState, lora_parameters: dict[str, torch.nn.Parameter],
                    optimizer, lr_scheduler) -> Path:
    """The full training state after `state.step`, written atomically; only the newest CHECKPOINTS_KEPT stay."""
    import safetensors.torch

    target = checkpoint_dir / f"step-{state.step:08d}"
    with atomic_dir(target) as staging:
        lora_tensors = {name: parameter.detach().contiguous() for name, parameter in lora_parameters.items()}
        safetensors.torch.save_file(lora_tensors, staging / "lora.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   staging / "optimizer.pt")
        numpy_rng = np.random.get_state()
        (staging / "state.json").write_text(json.dumps({
            "state": vars(state), "python_rng": random.getstate(),
            "numpy_rng": [numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]],
        }))
    for old in sorted(checkpoint_dir.glob("step-*"))[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old)
    return target


def load_checkpoint(checkpoint_dir: Path, lora_parameters: dict[str, torch.nn.Parameter], optimizer,
                    lr_scheduler) -> TrainingState | None:
    """Restore the newest checkpoint into the LoRA parameters, optimizer, lr scheduler and RNGs; None if none."""
    import safetensors.torch

    saved = sorted(checkpoint_dir.glob("step-*"))
    if not saved:
        return None
    tensors = safetensors.torch.load_file(saved[-1] / "lora.safetensors")
    with torch.no_grad():
        for name, parameter in lora_parameters.items():
            parameter.copy_(tensors[name])
    states = torch.load(saved[-1] / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    lr_scheduler.load_state_dict(states["lr_scheduler"])
    torch.set_rng_state(states["torch_rng"])
    if states["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda_rng"])
    document = json.loads((saved[-1] / "state.json").read_text())
    version, internal, gauss = document["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = document["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    state = TrainingState(**document["state"])
    state.validation_losses = {int(step): loss for step, loss in state.validation_losses.items()}  # JSON keys are str
    print(f"train_lora: resuming from {saved[-1]} (step {state.step})")
    return state


@dataclass
class TrainResult:
    unet: torch.nn.Module
    losses: list[float]
    validation_losses: dict[int, float]
    seconds: float  # this run's, not counting steps restored from a checkpoint
    images_per_second: float
    prediction_type: str


def train_lora(model_dir: Path, train_table: pd.DataFrame, test_table: pd.DataFrame, lora: LoraParams,
               params: TrainParams, augment: AugmentParams, resolution: int, live=None,
               checkpoint_dir: Path | None = None) -> TrainResult:
    """Train a LoRA on the UNet and return the trained UNet (adapter attached) and its loss history.

    With `checkpoint_dir` and `params.checkpoint_every`, the full training state is saved there every that many
    steps, and a run finding a checkpoint there resumes from it, bit-identically to an uninterrupted run."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from lanskap.lora import add_unet_lora

    accelerator = Accelerator(mixed_precision=params.mixed_precision)
    set_seed(params.seed)
    parts = load_components(model_dir, WEIGHT_DTYPES[params.mixed_precision], accelerator.device)
    add_unet_lora(parts.unet, lora)
    if params.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()  # recompute activations in backward: less memory, ~30% slower
    lora_parameters = {name: p for name, p in parts.unet.named_parameters() if p.requires_grad}
    paths, caption_index, captions = load_split(train_table)
    caption_states = encode_captions(captions, parts, accelerator.device)  # [n_captions, 77, hidden]
    empty_caption_state = encode_captions([""], parts, accelerator.device)  # for caption dropout
    held_out = held_out_batch(test_table, parts, accelerator.device, resolution)
    optimizer, lr_scheduler = make_optimizer(list(lora_parameters.values()), params)
    parts.unet, optimizer, lr_scheduler = accelerator.prepare(parts.unet, optimizer, lr_scheduler)

    state = load_checkpoint(checkpoint_dir, lora_parameters, optimizer, lr_scheduler) if checkpoint_dir else None
    if state is None:
        state = TrainingState(validation_losses={0: validation_loss(parts, *held_out, seed=params.seed)})  # base model
    for row in state.logged:
        log_row(live, row)
    dataset = CaptionedImages(paths, caption_index, train_transform(augment, resolution))
    first_batch = state.step * params.gradient_accumulation_steps
    # The loader's own generator: creating its iterator would otherwise draw from the global RNG a resume restored.
    batches = iter(DataLoader(dataset, batch_sampler=batch_indices(len(paths), params.batch_size, params.seed,
                                                                   start=first_batch),
                              generator=torch.Generator().manual_seed(params.seed)))
    print(f"train_lora: global batch {global_batch_size(params, accelerator.num_processes)} = batch_size "
          f"{params.batch_size} x gradient_accumulation_steps {params.gradient_accumulation_steps} x processes "
          f"{accelerator.num_processes}")
    images_seen, start = 0, time.perf_counter()
    progress = tqdm(range(state.step + 1, params.steps + 1), desc="train_lora", unit="step",
                    initial=state.step, total=params.steps)
    for step in progress:
        loss, images = accumulate_gradients(parts, batches, caption_states, empty_caption_state, params, accelerator)
        check_finite(loss, step, params)
        optimizer_step(accelerator, list(lora_parameters.values()), optimizer, lr_scheduler, params.max_grad_norm)

        state.step = step
        state.losses.append(loss.item())
        images_seen += images
        images_per_second = images_seen / (time.perf_counter() - start)
        progress.set_postfix(loss=f"{state.losses[-1]:.4f}", img_s=f"{images_per_second:.1f}")
        if step % params.log_every == 0 or step == params.steps:
            state.validation_losses[step] = validation_loss(parts, *held_out, seed=params.seed)
            state.logged.append(metrics_row(step, state, params.log_every, lr_scheduler.get_last_lr()[0],
                                            images_per_second))
            log_row(live, state.logged[-1])
        if checkpoint_dir and params.checkpoint_every and step % params.checkpoint_every == 0:
            save_checkpoint(checkpoint_dir, state, lora_parameters, optimizer, lr_scheduler)
    seconds = time.perf_counter() - start
    return TrainResult(accelerator.unwrap_model(parts.unet), state.losses, state.validation_losses, seconds,
                       images_seen / seconds if images_seen else 0.0, parts.noise_scheduler.config.prediction_type)


def global_batch_size(params: TrainParams, num_processes: int) -> int:
    """Images per optimizer step: the batch the learning rate is tuned for."""
    return params.batch_size * params.gradient_accumulation_steps * num_processes


def accumulate_gradients(parts: Components, batches, caption_states, empty_caption_state, params: TrainParams,
                         accelerator) -> tuple[torch.Tensor, int]:
    """Backward over gradient_accumulation_steps batches; return their mean loss (detached) and image count."""
    losses, images = [], 0
    for _ in range(params.gradient_accumulation_steps):
        pixel_values, caption_ids = next(batches)
        pixel_values = pixel_values.to(accelerator.device)
        encoder_hidden_states = drop_captions(caption_states[caption_ids], empty_caption_state, params.caption_dropout)
        with accelerator.autocast():
            loss = diffusion_loss(parts, pixel_values, encoder_hidden_states, noise_offset=params.noise_offset,
                                  snr_gamma=params.snr_gamma)
        accelerator.backward(loss / params.gradient_accumulation_steps)
        losses.append(loss.detach())
        images += pixel_values.shape[0]
    return torch.stack(losses).mean(), images


def optimizer_step(accelerator, lora_parameters: list, optimizer, lr_scheduler, max_grad_norm: float) -> None:
    accelerator.clip_grad_norm_(lora_parameters, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def metrics_row(step: int, state: TrainingState, log_every: int, learning_rate: float,
                images_per_second: float) -> dict:
    """One DVCLive row; the training loss is averaged over the steps since the last log (a smoother curve)."""
    window = state.losses[-log_every:]
    return {"step": step, "train/loss": sum(window) / len(window), "validation/loss": state.validation_losses[step],
            "learning_rate": learning_rate, "images_per_second": images_per_second}


def log_row(live, row: dict) -> None:
    if live is None:
        return
    live.step = row["step"]
    for name, value in row.items():
        if name != "step":
            live.log_metric(name, value)
    live.next_step()


def summarise(result: TrainResult) -> dict:
    best_step = min(result.validation_losses, key=result.validation_losses.get)
    last_step = max(result.validation_losses)
    tail = result.losses[-max(1, len(result.losses) // 10):]
    return {
        "steps": len(result.losses),
        "loss_first": result.losses[0],
        "loss_final": sum(tail) / len(tail),
        "validation_loss_base": result.validation_losses[0],
        "validation_loss_final": result.validation_losses[last_step],
        "validation_loss_best": result.validation_losses[best_step],
        "validation_loss_best_step": best_step,
        "seconds": round(result.seconds, 2),
        "images_per_second": round(result.images_per_second, 3),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else 0.0,
    }
