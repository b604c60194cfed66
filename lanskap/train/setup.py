"""Setting up a run: the base model's parts loaded frozen, LoRA adapters attached, accelerate's wrappers."""

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lanskap.core.errors import UserError
from lanskap.core.params import LoraParams, TrainParams
from lanskap.train.batches import BatchShare
from lanskap.train.optimizers import make_optimizer

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

    weights = {"use_safetensors": True, "dtype": weight_dtype}  # never unpickle; load in the dtype they train in
    parts = Components(
        tokenizer=CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", **weights),
        vae=AutoencoderKL.from_pretrained(model_dir, subfolder="vae", **weights),
        unet=UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", **weights),
        noise_scheduler=DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler"),
    )
    for module in (parts.text_encoder, parts.vae, parts.unet):
        module.requires_grad_(False)
        module.to(device)
    return parts


@dataclass
class Trainer:
    """What the training loop works with: the frozen parts, their distributed wrappers, the LoRA parameters."""

    parts: Components  # the modules themselves: validation, sampling, export
    wrapped: Components  # the same modules as accelerate prepared them (DDP across processes): training
    lora_parameters: dict[str, torch.nn.Parameter]  # "unet.<name>" / "text_encoder.<name>"
    share: BatchShare  # this process's rows of each global micro-batch
    accelerator: object


def attach_adapters(parts: Components, lora: LoraParams, params: TrainParams) -> tuple[dict, list[dict]]:
    """LoRA on the UNet, and on the text encoder when it trains; return the named LoRA parameters and the
    optimizer's parameter groups (the text encoder's with its own learning rate)."""
    from lanskap.lora.adapters import add_lora

    unet_parameters = add_lora(parts.unet, lora, lora.target_modules)
    named = {f"unet.{name}": p for name, p in parts.unet.named_parameters() if p.requires_grad}
    groups = [{"params": unet_parameters, "lr": params.learning_rate}]
    if params.text_encoder_learning_rate is not None:
        text_parameters = add_lora(parts.text_encoder, lora, lora.text_encoder_target_modules)
        named |= {f"text_encoder.{name}": p for name, p in parts.text_encoder.named_parameters() if p.requires_grad}
        groups.append({"params": text_parameters, "lr": params.text_encoder_learning_rate})
    if params.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()  # recompute activations in backward: less memory, ~30% slower
    return named, groups


def make_accelerator(params: TrainParams):
    """One process, or one of `accelerate launch`'s; on a machine without CUDA the processes train on CPU (gloo)."""
    import os

    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=params.mixed_precision, cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # each process would train alone and write the same outputs
        raise UserError(
            f"train_lora: launched as {launched} processes but accelerate set up "
            f"{accelerator.num_processes}; launch with `accelerate launch --multi_gpu --num_processes N`"
        )
    return accelerator


def check_mixed_precision(model_dir: Path, params: TrainParams) -> None:
    """Refuse fp16 for a UNet whose attention overflows in it (SD 2.1-768), and bf16 on a CPU that would emulate
    it (lanskap.models.precision)."""
    from lanskap.models.precision import require_fast_bf16, require_fp16_safe

    if params.mixed_precision == "fp16":
        instead = "train.mixed_precision: bf16 (or 'no' on a GPU without bf16)"
        require_fp16_safe(model_dir, "train.mixed_precision", instead)
    if params.mixed_precision == "bf16":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        require_fast_bf16(device_type, "train.mixed_precision", "train.mixed_precision: 'no'")


def pixel_multiple(parts: Components) -> int:
    """What an image side must be a multiple of for the latent to pass the UNet's downsampling evenly: the VAE's
    factor (2 per block after the first: 8 for SD 2.x, 4 for the built-in) times the UNet's (8 for SD 2.x, 2 for the
    built-in)."""
    return 2 ** (len(parts.vae.config.block_out_channels) - 1) * 2 ** (len(parts.unet.config.down_block_types) - 1)


def check_training_sizes(parts: Components, sizes: list[tuple[int, int]]) -> None:
    """Refuse aspect-ratio buckets whose sides this model cannot take evenly. Square sizes are preprocess.resolution,
    accepted at any multiple of 8 as before buckets existed."""
    multiple = pixel_multiple(parts)
    uneven = sorted(
        {(width, height) for width, height in sizes if width != height and (width % multiple or height % multiple)}
    )
    if uneven:
        raise UserError(
            f"train_lora: aspect-ratio buckets {', '.join(f'{w}x{h}' for w, h in uneven)} have sides "
            f"that are not multiples of {multiple}, which this base model needs (its VAE and UNet "
            f"downsample by {multiple} in all); set preprocess.bucket_reso_steps to a multiple of "
            f"{multiple}"
        )


def prepare_trainer(model_dir: Path, lora: LoraParams, params: TrainParams) -> tuple[Trainer, object, object]:
    """Load the base model, attach the adapters, and let accelerate wrap the trained modules and the optimizer."""
    check_mixed_precision(model_dir, params)
    accelerator = make_accelerator(params)
    parts = load_components(model_dir, WEIGHT_DTYPES[params.mixed_precision], accelerator.device)
    if params.prediction_type is not None:  # asked for explicitly: train on another target than the model's
        parts.noise_scheduler.register_to_config(prediction_type=params.prediction_type)
    lora_parameters, groups = attach_adapters(parts, lora, params)
    optimizer, lr_scheduler = make_optimizer(groups, params)
    unet, optimizer, lr_scheduler = accelerator.prepare(parts.unet, optimizer, lr_scheduler)
    text_encoder = parts.text_encoder
    if params.text_encoder_learning_rate is not None:
        text_encoder = accelerator.prepare(text_encoder)
    share = BatchShare(
        params.batch_size * accelerator.num_processes, accelerator.process_index * params.batch_size, params.batch_size
    )
    trainer = Trainer(parts, replace(parts, unet=unet, text_encoder=text_encoder), lora_parameters, share, accelerator)
    return trainer, optimizer, lr_scheduler
