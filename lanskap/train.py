"""LoRA fine-tuning of a Stable Diffusion 2.x UNet with diffusers, peft and accelerate.

One training step, in diffusers vocabulary:
    pixel_values --vae--> latents; noise ~ N(0, 1); timesteps ~ U{0, T-1}
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise (epsilon) or noise_scheduler.get_velocity(...) (v_prediction), from the scheduler config
    loss = mse(unet(noisy_latents, timesteps, encoder_hidden_states), target)
Only the LoRA parameters train (in fp32, whatever the frozen weights' dtype). The frozen text encoder runs
once per distinct caption, not once per step; augmentation runs on the fly, so latents are not cached.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lanskap.augment import train_transform
from lanskap.errors import UserError
from lanskap.params import AugmentParams, LoraParams, TrainParams

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def diffusion_loss(parts: Components, pixel_values, encoder_hidden_states, generator=None) -> torch.Tensor:
    """The denoising loss of one batch: pixels [B, 3, H, W] in [-1, 1], states [B, 77, hidden]."""
    vae_dtype = next(parts.vae.parameters()).dtype
    latents = parts.vae.encode(pixel_values.to(vae_dtype)).latent_dist.sample(generator)
    latents = latents * parts.vae.config.scaling_factor  # [B, 4, H/f, W/f]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=latents.device)
    noisy_latents = parts.noise_scheduler.add_noise(latents, noise, timesteps)
    target = training_target(parts.noise_scheduler, latents, noise, timesteps)
    prediction = parts.unet(noisy_latents, timesteps, encoder_hidden_states.to(noisy_latents.dtype)).sample
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def check_finite(loss: torch.Tensor, step: int, params: TrainParams) -> None:
    if not torch.isfinite(loss):
        raise UserError(
            f"train_lora: loss is {loss.item()} at step {step}. Likely causes: train.mixed_precision=fp16 with "
            "SD 2.x (its attention overflows in fp16: use bf16 or no), or train.learning_rate="
            f"{params.learning_rate} too high. Nothing was saved."
        )


def validation_loss(parts: Components, pixel_values, encoder_hidden_states, seed: int) -> float:
    """Loss on held-out images with fixed noise and timesteps, so values are comparable across steps."""
    generator = torch.Generator(pixel_values.device).manual_seed(seed)
    with torch.no_grad():
        return diffusion_loss(parts, pixel_values, encoder_hidden_states, generator).item()


def load_split(table: pd.DataFrame) -> tuple[list[str], list[int], list[str]]:
    """Paths, each row's index into the distinct captions, and the distinct captions."""
    captions = sorted(set(table["caption"]))
    position = {caption: index for index, caption in enumerate(captions)}
    return table["path"].tolist(), [position[c] for c in table["caption"]], captions


def make_optimizer(lora_parameters, params: TrainParams):
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(
        lora_parameters, lr=params.learning_rate, betas=(params.adam_beta1, params.adam_beta2),
        weight_decay=params.adam_weight_decay, eps=params.adam_epsilon,
    )
    lr_scheduler = get_scheduler(params.lr_scheduler, optimizer, num_warmup_steps=params.warmup_steps,
                                 num_training_steps=params.steps)
    return optimizer, lr_scheduler


def held_out_batch(table: pd.DataFrame, parts: Components, device):
    """Test images (canonical, not augmented) and their caption states, for the validation loss."""
    from torchvision.transforms import v2

    to_tensor = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)])
    pixels = torch.stack([to_tensor(Image.open(path).convert("RGB")) for path in table["path"]])
    return pixels.to(device), encode_captions(table["caption"].tolist(), parts, device)


@dataclass
class TrainResult:
    unet: torch.nn.Module
    losses: list[float]
    validation_losses: dict[int, float]
    seconds: float
    images_per_second: float
    prediction_type: str


def train_lora(model_dir: Path, train_table: pd.DataFrame, test_table: pd.DataFrame, lora: LoraParams,
               params: TrainParams, augment: AugmentParams, resolution: int, live=None) -> TrainResult:
    """Train a LoRA on the UNet and return the trained UNet (adapter attached) and its loss history."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from lanskap.lora import add_unet_lora

    accelerator = Accelerator(mixed_precision=params.mixed_precision)
    set_seed(params.seed)
    parts = load_components(model_dir, WEIGHT_DTYPES[params.mixed_precision], accelerator.device)
    lora_parameters = add_unet_lora(parts.unet, lora)
    paths, caption_index, captions = load_split(train_table)
    caption_states = encode_captions(captions, parts, accelerator.device)  # [n_captions, 77, hidden]
    held_out = held_out_batch(test_table, parts, accelerator.device)
    loader = DataLoader(CaptionedImages(paths, caption_index, train_transform(augment, resolution)),
                        batch_size=params.batch_size, shuffle=True, drop_last=len(paths) >= params.batch_size,
                        generator=torch.Generator().manual_seed(params.seed))
    optimizer, lr_scheduler = make_optimizer(lora_parameters, params)
    unet, optimizer, lr_scheduler = accelerator.prepare(parts.unet, optimizer, lr_scheduler)
    parts.unet = unet

    losses, images_seen = [], 0
    validation_losses = {0: validation_loss(parts, *held_out, seed=params.seed)}  # the base model's
    start = time.perf_counter()
    batches = endless(loader)
    progress = tqdm(range(1, params.steps + 1), desc="train_lora", unit="step")
    for step in progress:
        pixel_values, caption_ids = next(batches)
        pixel_values = pixel_values.to(accelerator.device)
        with accelerator.autocast():
            loss = diffusion_loss(parts, pixel_values, caption_states[caption_ids])
        check_finite(loss, step, params)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(lora_parameters, params.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        losses.append(loss.item())
        images_seen += pixel_values.shape[0]
        images_per_second = images_seen / (time.perf_counter() - start)
        progress.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{images_per_second:.1f}")
        if step % params.log_every == 0 or step == params.steps:
            validation_losses[step] = validation_loss(parts, *held_out, seed=params.seed)
            log_step(live, step, losses[-params.log_every:], validation_losses[step], lr_scheduler.get_last_lr()[0], images_per_second)
    seconds = time.perf_counter() - start
    return TrainResult(accelerator.unwrap_model(unet), losses, validation_losses, seconds, images_seen / seconds,
                       parts.noise_scheduler.config.prediction_type)


def endless(loader):
    """Batches forever, reshuffling each epoch: training length is counted in steps."""
    while True:
        yield from loader


def log_step(live, step, window, validation, learning_rate, images_per_second) -> None:
    """Training loss averaged over the steps since the last log (a smoother curve), to DVCLive."""
    if live is None:
        return
    live.step = step
    live.log_metric("train/loss", sum(window) / len(window))
    live.log_metric("validation/loss", validation)
    live.log_metric("learning_rate", learning_rate)
    live.log_metric("images_per_second", images_per_second)
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
