"""LoRA fine-tuning of a Stable Diffusion 2.x UNet with diffusers, peft and accelerate.

One training step, in diffusers vocabulary:
    pixel_values --vae--> latents; noise ~ N(0, 1); timesteps ~ U{0, T-1}
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise (epsilon) or noise_scheduler.get_velocity(...) (v_prediction), from the scheduler config
    loss = mse(unet(noisy_latents, timesteps, encoder_hidden_states), target)
Only the LoRA parameters train (in fp32, whatever the frozen weights' dtype): the UNet's, and the text encoder's
when train.text_encoder_learning_rate is set. A frozen text encoder runs once per distinct caption, not once per
step; augmentation runs on the fly, so latents are not cached.

Randomness is a function of the seed and the position in the run only: each image's augmentation is seeded by
its place in the data sequence, and each micro-batch's noise, timesteps and caption dropout are drawn for the
global batch from a generator seeded by the micro-batch number. A resumed run, and a run split over N processes
by `accelerate launch`, therefore train on exactly what one uninterrupted process trains on.
"""

import json
import random
import resource
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lanskap.augment import eval_transform, train_transform
from lanskap.console import progress
from lanskap.errors import UserError
from lanskap.io import atomic_dir, remove_dir
from lanskap.params import AugmentParams, LoraParams, TrainParams

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHECKPOINTS_KEPT = 2  # the newest is complete (atomic rename); the one before is a spare
DEFAULT_IMAGE_PROMPTS = 4  # validation images of the first test captions when train.image_prompts is empty


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


def tokenize(captions: list[str], tokenizer) -> torch.Tensor:
    """CLIP token ids [n, 77], padded and truncated as SD 2.x's pipeline does."""
    return tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


class CaptionEncoder:
    """Caption ids -> encoder_hidden_states [B, 77, hidden]. The last id is the empty caption (caption dropout).

    With a frozen text encoder the states of each distinct caption are computed once, not once per step; with a
    trained one (text-encoder LoRA) the encoder runs on every batch's tokens."""

    def __init__(self, captions: list[str], parts: Components, device, text_encoder_trains: bool):
        self.empty_id = len(captions)
        self.token_ids = tokenize([*captions, ""], parts.tokenizer).to(device)  # [n + 1, 77]
        self.table = None if text_encoder_trains else self.frozen_states(parts.text_encoder)

    @torch.inference_mode()
    def frozen_states(self, text_encoder) -> torch.Tensor:
        states = [text_encoder(ids[None])[0] for ids in self.token_ids]  # one at a time: batch-size independent
        return torch.cat(states).clone()  # clone: leave inference mode so autograd can use it as an input

    def __call__(self, text_encoder, caption_ids: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            return self.table[caption_ids]
        return text_encoder(self.token_ids[caption_ids])[0]


@dataclass(frozen=True)
class BatchShare:
    """This process's rows [start, start + size) of a global micro-batch of `total` images.

    Every random tensor of a step (posterior sample, noise, timesteps, caption dropout) is drawn for the whole
    global batch from one generator seeded by the micro-batch number, and each process keeps its rows: N processes
    then compute exactly what one process computes on the global batch."""

    total: int
    start: int = 0
    size: int | None = None

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[self.start:self.start + (self.size or self.total)]

    def randn(self, sample_shape, generator, dtype) -> torch.Tensor:
        return self.rows(torch.randn((self.total, *sample_shape), generator=generator, device=generator.device,
                                     dtype=dtype))

    def rand(self, generator) -> torch.Tensor:
        return self.rows(torch.rand(self.total, generator=generator, device=generator.device))

    def randint(self, high: int, generator) -> torch.Tensor:
        return self.rows(torch.randint(0, high, (self.total,), generator=generator, device=generator.device))


AUGMENTATION_STREAM, NOISE_STREAM = 0, 1


def derived_seed(seed: int, *position: int) -> int:
    """A seed that depends only on (seed, *position), so per-sample randomness is the same whatever the number of
    processes, data-loader workers or a resume."""
    return int(np.random.SeedSequence([seed % 2**63, *position]).generate_state(1, np.uint64)[0] >> 1)


class CaptionedImages(Dataset):
    """Canonical training images, transformed on access. A key is (image index, augmentation seed); an item is
    (pixels [3, H, W], caption id)."""

    def __init__(self, paths: list[str], caption_index: list[int], transform):
        self.paths, self.caption_index, self.transform = paths, caption_index, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        index, seed = key
        with Image.open(self.paths[index]) as image, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # torchvision's random transforms draw from the global generator
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


def diffusion_loss(parts: Components, pixel_values, encoder_hidden_states, generator: torch.Generator,
                   share: BatchShare | None = None, noise_offset: float = 0.0,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """The denoising loss of one batch: pixels [B, 3, H, W] in [-1, 1], states [B, 77, hidden].

    Random draws come from `generator` for the global batch `share` belongs to (None: this batch is the whole).
    noise_offset adds per-channel constant noise (lets the model shift mean brightness); snr_gamma weights each
    sample by min-SNR. Both default off, as the validation loss uses it."""
    share = share or BatchShare(pixel_values.shape[0])
    vae_dtype = next(parts.vae.parameters()).dtype
    posterior = parts.vae.encode(pixel_values.to(vae_dtype)).latent_dist
    latents = posterior.mean + posterior.std * share.randn(posterior.mean.shape[1:], generator, posterior.mean.dtype)
    latents = latents * parts.vae.config.scaling_factor  # [B, 4, H/f, W/f]
    noise = share.randn(latents.shape[1:], generator, latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * share.randn((latents.shape[1], 1, 1), generator, latents.dtype)
    timesteps = share.randint(parts.noise_scheduler.config.num_train_timesteps, generator)
    noisy_latents = parts.noise_scheduler.add_noise(latents, noise, timesteps)
    target = training_target(parts.noise_scheduler, latents, noise, timesteps)
    prediction = parts.unet(noisy_latents, timesteps, encoder_hidden_states.to(noisy_latents.dtype)).sample
    if snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(parts.noise_scheduler, timesteps, snr_gamma)).mean()


def drop_captions(caption_ids: torch.Tensor, empty_id: int, probability: float, generator,
                  share: BatchShare) -> torch.Tensor:
    """Replace each sample's caption by the empty caption with `probability` (teaches the unconditional prediction
    classifier-free guidance uses). Draws no random numbers when off, so default runs are unchanged."""
    if not probability:
        return caption_ids
    dropped = share.rand(generator) < probability
    return torch.where(dropped, torch.full_like(caption_ids, empty_id), caption_ids)


def check_finite(loss: torch.Tensor, step: int, params: TrainParams) -> None:
    if not torch.isfinite(loss):
        raise UserError(
            f"train_lora: loss is {loss.item()} at step {step}. Likely causes: train.mixed_precision=fp16 with "
            "SD 2.x (its attention overflows in fp16: use bf16 or no), or train.learning_rate="
            f"{params.learning_rate} too high. Nothing was saved."
        )


@contextmanager
def eval_mode(*modules: torch.nn.Module):
    """Modules in eval mode (no LoRA dropout) for a validation pass, then back to their previous mode."""
    was_training = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, training in zip(modules, was_training):
            module.train(training)


@dataclass
class HeldOut:
    """The test images (canonical, centre-cropped, not augmented) and their captions, for the validation loss."""

    pixel_values: torch.Tensor  # [n_test, 3, H, W]
    captions: CaptionEncoder

    @classmethod
    def load(cls, table: pd.DataFrame, parts: Components, device, resolution: int, text_encoder_trains: bool):
        to_tensor = eval_transform(resolution)
        pixels = torch.stack([to_tensor(Image.open(path).convert("RGB")) for path in table["path"]])
        return cls(pixels.to(device), CaptionEncoder(table["caption"].tolist(), parts, device, text_encoder_trains))

    def loss(self, parts: Components, seed: int) -> float:
        """Loss with fixed noise and timesteps, so values are comparable across steps."""
        generator = torch.Generator(self.pixel_values.device).manual_seed(seed)
        with eval_mode(parts.unet, parts.text_encoder), torch.no_grad():
            states = self.captions(parts.text_encoder, torch.arange(len(self.pixel_values), device=self.pixel_values.device))
            return diffusion_loss(parts, self.pixel_values, states, generator).item()


def validation_images(parts: Components, prompts: list[str], params: TrainParams, resolution: int) -> Image.Image:
    """One image per prompt, each from its own fixed seed (train.seed + position), as a labelled row: the same
    prompts and noise at every interval, so successive rows show what training changed."""
    import diffusers

    from lanskap.report import image_grid
    from lanskap.sampling import SCHEDULERS

    scheduler_class, extra = SCHEDULERS["dpm++"]
    pipeline = diffusers.StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=getattr(diffusers, scheduler_class).from_config(parts.noise_scheduler.config, **extra),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    device = parts.unet.device
    generators = [torch.Generator(device).manual_seed(params.seed + index) for index in range(len(prompts))]
    mixed = parts.unet.dtype != torch.float32  # frozen weights in bf16/fp16, LoRA in fp32: autocast as in training
    with eval_mode(parts.unet, parts.text_encoder), torch.autocast(device.type, parts.unet.dtype, enabled=mixed):
        images = pipeline(prompts, num_inference_steps=params.image_inference_steps, height=resolution,
                          width=resolution, guidance_scale=params.image_guidance_scale, generator=generators).images
    return image_grid([images], column_labels=prompts, cell=min(max(resolution, 64), 256))


def load_split(table: pd.DataFrame) -> tuple[list[str], list[int], list[str]]:
    """Paths, each row's index into the distinct captions, and the distinct captions."""
    captions = sorted(set(table["caption"]))
    position = {caption: index for index, caption in enumerate(captions)}
    return table["path"].tolist(), [position[c] for c in table["caption"]], captions


def make_optimizer(parameter_groups: list[dict], params: TrainParams, fused: bool | None = None):
    """AdamW (torch's, or bitsandbytes' 8-bit one) over parameter groups that may carry their own "lr", and its lr
    scheduler; `fused` picks torch's single-kernel AdamW (None: torch's default)."""
    from diffusers.optimization import get_scheduler

    settings = {"lr": params.learning_rate, "betas": (params.adam_beta1, params.adam_beta2),
                "weight_decay": params.adam_weight_decay, "eps": params.adam_epsilon}
    if params.optimizer == "adamw8bit":
        optimizer = bitsandbytes_module().optim.AdamW8bit(parameter_groups, **settings)
    else:
        optimizer = torch.optim.AdamW(parameter_groups, fused=fused, **settings)
    lr_scheduler = get_scheduler(params.lr_scheduler, optimizer, num_warmup_steps=params.warmup_steps,
                                 num_training_steps=params.steps)
    return optimizer, lr_scheduler


def bitsandbytes_module():
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("train.optimizer=adamw8bit needs bitsandbytes, which is not installed: `uv pip install "
                        "bitsandbytes` (CUDA machines), or set train.optimizer: adamw") from None
    return bitsandbytes


def global_batches(num_images: int, global_batch: int, seed: int, start: int) -> Iterator[list[tuple[int, int]]]:
    """Global micro-batches of (image index, augmentation seed) forever, from micro-batch number `start` on.

    Each epoch is a fresh permutation from one seeded generator and each image's augmentation seed depends on its
    place in the sequence only, so the data a run sees is a function of the micro-batch count: a resumed run, or
    a run split over N processes, sees the same. The last partial batch of an epoch is dropped."""
    batches_per_epoch = num_images // global_batch
    epoch, position = divmod(start, batches_per_epoch)
    order_generator = torch.Generator().manual_seed(seed)
    for _ in range(epoch):  # replay the permutations of the epochs already done
        torch.randperm(num_images, generator=order_generator)
    number = start
    while True:
        order = torch.randperm(num_images, generator=order_generator).tolist()
        for batch in range(position, batches_per_epoch):
            indices = order[batch * global_batch:(batch + 1) * global_batch]
            yield [(index, derived_seed(seed, AUGMENTATION_STREAM, number, k)) for k, index in enumerate(indices)]
            number += 1
        position = 0


def process_batches(batches: Iterator[list], share: BatchShare) -> Iterator[list]:
    """This process's rows of each global micro-batch."""
    for batch in batches:
        yield share.rows(batch)


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
        remove_dir(old)  # never half-deleted under its own name, where a resume would pick it
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
    text_encoder: torch.nn.Module | None  # None: the text encoder was frozen
    losses: list[float]
    validation_losses: dict[int, float]
    seconds: float  # this run's, not counting steps restored from a checkpoint
    images_per_second: float
    prediction_type: str


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
    from lanskap.lora import add_lora

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
        raise UserError(f"train_lora: launched as {launched} processes but accelerate set up "
                        f"{accelerator.num_processes}; launch with `accelerate launch --multi_gpu --num_processes N`")
    return accelerator


def check_mixed_precision(model_dir: Path, params: TrainParams) -> None:
    """Refuse fp16 for a UNet whose config asks for fp32 attention scores (SD 2.1-768's `upcast_attention`): its
    attention overflows in fp16, and the SDPA attention diffusers uses does not honour the upcast, so training
    ends in NaN losses hours in."""
    if params.mixed_precision != "fp16":
        return
    config = json.loads((Path(model_dir) / "unet" / "config.json").read_text())
    if config.get("upcast_attention"):
        raise UserError(f"train.mixed_precision=fp16 with {model_dir}: its UNet sets upcast_attention (as SD 2.1-768 "
                        "does) because its attention overflows in fp16. Set train.mixed_precision: bf16 (or 'no' on "
                        "a GPU without bf16)")


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
    share = BatchShare(params.batch_size * accelerator.num_processes, accelerator.process_index * params.batch_size,
                       params.batch_size)
    trainer = Trainer(parts, replace(parts, unet=unet, text_encoder=text_encoder), lora_parameters, share, accelerator)
    return trainer, optimizer, lr_scheduler


@dataclass
class Monitor:
    """What the main process records: DVCLive rows (loss, lr, images/s every step; the held-out loss every
    validation_every steps and at step 0), validation images every images_every steps. Other processes record
    nothing; `image_dir` keeps copies of the images beside the checkpoints, for a resumed run to log again."""

    live: object
    held_out: HeldOut
    prompts: list[str]
    resolution: int
    params: TrainParams
    image_dir: Path | None
    main: bool

    def start(self, parts: Components, resumed: "TrainingState | None") -> "TrainingState":
        """The resumed state with its log replayed, or a fresh one with the base model's loss and images."""
        if resumed is not None:
            replay_log(self.live, resumed, self.image_dir)
            return resumed
        base_loss = self.held_out.loss(parts, self.params.seed)
        state = TrainingState(validation_losses={0: base_loss}, logged=[{"step": 0, "validation/loss": base_loss}])
        log_row(self.live, state.logged[0])
        self.images(parts, 0)
        return state

    def record(self, parts: Components, state: "TrainingState", learning_rate: float, images_per_second: float):
        if not self.main:
            return
        step, last = state.step, state.step == self.params.steps
        row = {"step": step, "train/loss": state.losses[-1], "learning_rate": learning_rate,
               "images_per_second": images_per_second}
        if step % self.params.validation_every == 0 or last:
            state.validation_losses[step] = row["validation/loss"] = self.held_out.loss(parts, self.params.seed)
        state.logged.append(row)
        log_row(self.live, row)
        if self.params.images_every and (step % self.params.images_every == 0 or last):
            self.images(parts, step)

    def images(self, parts: Components, step: int) -> None:
        if self.main and self.params.images_every:
            grid = validation_images(parts, self.prompts, self.params, self.resolution)
            log_image(self.live, self.image_dir, step, grid)


def training_batches(train_table: pd.DataFrame, augment: AugmentParams, resolution: int, params: TrainParams,
                     share: BatchShare, first_batch: int) -> tuple[Iterator, list[str]]:
    """This process's (pixels [B, 3, H, W], caption ids [B]) micro-batches from micro-batch `first_batch` on, and
    the distinct captions the ids index."""
    paths, caption_index, captions = load_split(train_table)
    check_batch_within_data(len(paths), share.total)
    dataset = CaptionedImages(paths, caption_index, train_transform(augment, resolution))
    sampler = process_batches(global_batches(len(paths), share.total, params.seed, first_batch), share)
    # Workers decode and augment the next batches while the GPU trains; each image's augmentation is seeded by its
    # place in the run, so their number changes no result. The loader's own generator: creating its iterator would
    # otherwise draw from the global RNG that a resume restored.
    workers = params.dataloader_workers
    loader = DataLoader(dataset, batch_sampler=sampler, generator=torch.Generator().manual_seed(params.seed),
                        num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
    return iter(loader), captions


def train_lora(model_dir: Path, train_table: pd.DataFrame, test_table: pd.DataFrame, lora: LoraParams,
               params: TrainParams, augment: AugmentParams, resolution: int, live=None,
               checkpoint_dir: Path | None = None) -> TrainResult:
    """Train a LoRA on the UNet (and the text encoder if train.text_encoder_learning_rate is set); return the
    trained modules (adapters attached) and the loss history. Run by each of `accelerate launch`'s processes;
    only the main one logs, samples and writes checkpoints (pass `live` there only).

    With `checkpoint_dir` and `params.checkpoint_every`, the full training state is saved there every that many
    steps, and a run finding a checkpoint there resumes from it, bit-identically to an uninterrupted run."""
    from accelerate.utils import set_seed

    set_seed(params.seed)
    trainer, optimizer, lr_scheduler = prepare_trainer(model_dir, lora, params)
    parts, accelerator = trainer.parts, trainer.accelerator
    text_encoder_trains = params.text_encoder_learning_rate is not None
    resumed = load_checkpoint(checkpoint_dir, trainer.lora_parameters, optimizer, lr_scheduler) if checkpoint_dir else None
    first_step = resumed.step if resumed else 0
    check_same_start(accelerator, first_step, checkpoint_dir)
    batches, captions = training_batches(train_table, augment, resolution, params, trainer.share,
                                         first_batch=first_step * params.gradient_accumulation_steps)
    caption_encoder = CaptionEncoder(captions, parts, accelerator.device, text_encoder_trains)
    preflight(trainer, caption_encoder, params, resolution, checkpoint_dir)
    monitor = Monitor(live, HeldOut.load(test_table, parts, accelerator.device, resolution, text_encoder_trains),
                      params.image_prompts or test_table["caption"].tolist()[:DEFAULT_IMAGE_PROMPTS], resolution,
                      params, checkpoint_dir / "images" if checkpoint_dir and params.checkpoint_every else None,
                      accelerator.is_main_process)
    state = monitor.start(parts, resumed)
    if monitor.main:
        print(f"train_lora: global batch {global_batch_size(params, accelerator.num_processes)} = batch_size "
              f"{params.batch_size} x gradient_accumulation_steps {params.gradient_accumulation_steps} x processes "
              f"{accelerator.num_processes}")
    images_seen, start = 0, time.perf_counter()
    bar = progress(range(first_step + 1, params.steps + 1), desc="train_lora", unit="step", initial=first_step,
                    total=params.steps, disable=not monitor.main)
    for step in bar:
        loss, images = accumulate_gradients(trainer, batches, caption_encoder, params,
                                            first_micro_batch=(step - 1) * params.gradient_accumulation_steps)
        check_finite(loss, step, params)
        optimizer_step(accelerator, list(trainer.lora_parameters.values()), optimizer, lr_scheduler,
                       params.max_grad_norm)
        state.step = step
        state.losses.append(loss.item())
        images_seen += images * accelerator.num_processes
        images_per_second = images_seen / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{state.losses[-1]:.4f}", img_s=f"{images_per_second:.1f}")
        monitor.record(parts, state, lr_scheduler.get_last_lr()[0], images_per_second)
        if monitor.main and checkpoint_dir and params.checkpoint_every and step % params.checkpoint_every == 0:
            save_checkpoint(checkpoint_dir, state, trainer.lora_parameters, optimizer, lr_scheduler)
    seconds = time.perf_counter() - start
    return TrainResult(parts.unet, parts.text_encoder if text_encoder_trains else None, state.losses,
                       state.validation_losses, seconds, images_seen / seconds if images_seen else 0.0,
                       parts.noise_scheduler.config.prediction_type)


def preflight(trainer: Trainer, captions: CaptionEncoder, params: TrainParams, resolution: int,
              checkpoint_dir: Path | None) -> None:
    """Stop before training, not hours in, when the disk cannot hold the checkpoints and outputs or the GPU cannot
    hold a step at train.batch_size (the error names the batch that fits)."""
    from lanskap.preflight import require_batch_fits, require_free_space, train_lora_bytes

    trainable = sum(parameter.numel() for parameter in trainer.lora_parameters.values())
    require_free_space(checkpoint_dir or Path("."), train_lora_bytes(trainable, CHECKPOINTS_KEPT), "train_lora",
                       "lora.rank, or train.checkpoint_every: 0")
    require_batch_fits(lambda batch: probe_step(trainer, captions, params, resolution, batch), params.batch_size,
                       "train.batch_size", trainer.accelerator.device,
                       if_none_fits="set train.mixed_precision: bf16 and train.gradient_checkpointing: true, or lower "
                                    "preprocess.resolution",
                       accumulation_key="train.gradient_accumulation_steps",
                       accumulation_steps=params.gradient_accumulation_steps)


def probe_step(trainer: Trainer, captions: CaptionEncoder, params: TrainParams, resolution: int, batch: int) -> None:
    """One forward and backward at `batch` on blank images, on the unwrapped modules (no cross-process sync),
    leaving no gradient and no random draw behind."""
    parts, device = trainer.parts, trainer.accelerator.device
    pixel_values = torch.zeros(batch, 3, resolution, resolution, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with trainer.accelerator.autocast():
            states = captions(parts.text_encoder, torch.zeros(batch, dtype=torch.long, device=device))
            loss = diffusion_loss(parts, pixel_values, states, torch.Generator(device).manual_seed(0),
                                  noise_offset=params.noise_offset, snr_gamma=params.snr_gamma)
        loss.backward()
    for parameter in trainer.lora_parameters.values():
        parameter.grad = None


def check_same_start(accelerator, first_step: int, checkpoint_dir: Path | None) -> None:
    """Every process must resume from the same step: on several machines the checkpoint folder has to be on a
    filesystem they all see, or they would train on different steps and the run would be garbage."""
    starts = accelerator.gather(torch.tensor([first_step], device=accelerator.device)).tolist()
    if len(set(starts)) > 1:
        raise UserError(f"train_lora: processes would start at different steps {starts}: {checkpoint_dir} must be on "
                        "a filesystem every machine shares (or delete it to start over)")


def check_batch_within_data(num_images: int, global_micro_batch: int) -> None:
    if global_micro_batch > num_images:
        raise UserError(f"train_lora: train.batch_size x processes = {global_micro_batch} exceeds the {num_images} "
                        "training images; lower train.batch_size and raise train.gradient_accumulation_steps to keep "
                        "the global batch")


def global_batch_size(params: TrainParams, num_processes: int) -> int:
    """Images per optimizer step: the batch the learning rate is tuned for."""
    return params.batch_size * params.gradient_accumulation_steps * num_processes


def accumulate_gradients(trainer: Trainer, batches, captions: CaptionEncoder, params: TrainParams,
                         first_micro_batch: int) -> tuple[torch.Tensor, int]:
    """Backward over gradient_accumulation_steps micro-batches, numbered from `first_micro_batch` (which seeds
    their noise); return their mean loss (detached) and this process's image count. Gradients are averaged across
    processes once, on the last micro-batch."""
    accelerator, parts = trainer.accelerator, trainer.wrapped
    losses, images = [], 0
    for micro in range(params.gradient_accumulation_steps):
        pixel_values, caption_ids = next(batches)
        pixel_values = pixel_values.to(accelerator.device, non_blocking=True)
        caption_ids = caption_ids.to(accelerator.device, non_blocking=True)
        generator = torch.Generator(accelerator.device).manual_seed(
            derived_seed(params.seed, NOISE_STREAM, first_micro_batch + micro))
        caption_ids = drop_captions(caption_ids, captions.empty_id, params.caption_dropout, generator, trainer.share)
        with ExitStack() as stack:
            if micro < params.gradient_accumulation_steps - 1:
                for module in {parts.unet, parts.text_encoder}:
                    stack.enter_context(accelerator.no_sync(module))
            with accelerator.autocast():
                encoder_hidden_states = captions(parts.text_encoder, caption_ids)
                loss = diffusion_loss(parts, pixel_values, encoder_hidden_states, generator, trainer.share,
                                      params.noise_offset, params.snr_gamma)
            accelerator.backward(loss / params.gradient_accumulation_steps)
        losses.append(loss.detach())
        images += pixel_values.shape[0]
    return accelerator.reduce(torch.stack(losses).mean(), "mean"), images


def optimizer_step(accelerator, lora_parameters: list, optimizer, lr_scheduler, max_grad_norm: float) -> None:
    accelerator.clip_grad_norm_(lora_parameters, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def log_row(live, row: dict) -> None:
    if live is None:
        return
    live.step = row["step"]
    for name, value in row.items():
        if name != "step":
            live.log_metric(name, value)
    live.next_step()


def log_image(live, image_dir: Path | None, step: int, grid: Image.Image) -> None:
    """Log a validation grid with DVCLive as `plots/images/validation/step-<step>.jpg` (JPEG: the log lives in git),
    and keep a lossless copy in `image_dir` when checkpointing."""
    from lanskap.report import save_png

    name = f"step-{step:06d}"
    if image_dir is not None:
        save_png(grid, image_dir / f"{name}.png")
    if live is not None:
        live.log_image(f"validation/{name}.jpg", grid)


def replay_log(live, state: TrainingState, image_dir: Path | None) -> None:
    """Log again what the interrupted run had logged up to its checkpoint: DVC deletes the log before a run."""
    if live is None:
        return
    for row in state.logged:
        log_row(live, row)
    for path in sorted(image_dir.glob("step-*.png")) if image_dir else []:
        if int(path.stem.removeprefix("step-")) <= state.step:
            with Image.open(path) as grid:
                live.log_image(f"validation/{path.stem}.jpg", grid.convert("RGB"))


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
        "peak_process_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),  # KiB on Linux
    }
