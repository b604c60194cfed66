"""What a run records: the held-out validation loss, validation images and the DVCLive log, and its summary."""

from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from lanskap.core.params import TrainParams
from lanskap.data.augment import eval_transform
from lanskap.data.buckets import bucket_groups, table_sizes
from lanskap.train.batches import BatchShare
from lanskap.train.checkpoints import TrainingState
from lanskap.train.ema import LoraEMA
from lanskap.train.latents import encode
from lanskap.train.setup import Components
from lanskap.train.step import CaptionEncoder, diffusion_loss


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
    """The test images (canonical, centre-cropped to their training size, not augmented), kept on the CPU one
    tensor per bucket, and their captions, for the validation loss. They go through the VAE and the UNet in chunks
    of train.batch_size: a few hundred test images in one batch would run a GPU out of memory, and a chunk, forward
    only, needs less than the training step the GPU preflight probes at that batch (VAE encode included)."""

    buckets: list[tuple[torch.Tensor, torch.Tensor]]  # per bucket: pixels [n_b, 3, H_b, W_b], caption ids [n_b]
    captions: CaptionEncoder
    device: torch.device
    batch_size: int

    @classmethod
    def load(cls, table: pd.DataFrame, parts: Components, device, text_encoder_trains: bool, batch_size: int):
        paths, buckets = table["path"].tolist(), []
        for size, rows in bucket_groups(table_sizes(table)).items():
            to_tensor = eval_transform(size)
            pixels = torch.stack([to_tensor(Image.open(paths[row]).convert("RGB")) for row in rows])
            buckets.append((pixels, torch.tensor(rows)))
        captions = CaptionEncoder(table["caption"].tolist(), parts, device, text_encoder_trains)
        return cls(buckets, captions, torch.device(device), batch_size)

    def loss(self, parts: Components, seed: int) -> float:
        """Mean loss over the images with fixed noise and timesteps, so values are comparable across steps. Each
        bucket's random draws are made for the whole bucket, from the generator's state at its start, and each chunk
        keeps its rows: the same numbers whatever train.batch_size."""
        generator = torch.Generator(self.device).manual_seed(seed)
        count, loss = sum(len(rows) for _, rows in self.buckets), 0.0
        with eval_mode(parts.unet, parts.text_encoder), torch.no_grad():
            for pixel_values, rows in self.buckets:
                bucket_start = generator.get_state()
                for start in range(0, len(rows), self.batch_size):
                    generator.set_state(bucket_start)
                    chunk = slice(start, start + self.batch_size)
                    share = BatchShare(len(rows), start, len(rows[chunk]))
                    states = self.captions(parts.text_encoder, rows[chunk].to(self.device))
                    posterior = encode(parts.vae, pixel_values[chunk].to(self.device))
                    chunk_loss = diffusion_loss(parts, posterior, states, generator, share).item()
                    loss += chunk_loss * (len(rows[chunk]) / count)  # weights n_chunk / n: 1.0 for one chunk
        return loss


def validation_images(parts: Components, prompts: list[str], params: TrainParams, resolution: int) -> Image.Image:
    """One square image per prompt, each from its own fixed seed (train.seed + position), one row per prompt with
    the prompt in full beside it: the same prompts and noise at every interval, so successive grids show what
    training changed. Drawn train.batch_size prompts at a time (each image has its own generator, so the chunks
    change no image's noise)."""
    import diffusers

    from lanskap.generate.sampling import SCHEDULERS

    scheduler_class, extra = SCHEDULERS["dpm++"]
    pipeline = diffusers.StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=getattr(diffusers, scheduler_class).from_config(parts.noise_scheduler.config, **extra),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    device = parts.unet.device
    generators = [torch.Generator(device).manual_seed(params.seed + index) for index in range(len(prompts))]
    mixed = parts.unet.dtype != torch.float32  # frozen weights in bf16/fp16, LoRA in fp32: autocast as in training
    images = []
    with eval_mode(parts.unet, parts.text_encoder), torch.autocast(device.type, parts.unet.dtype, enabled=mixed):
        for start in range(0, len(prompts), params.batch_size):
            chunk = slice(start, start + params.batch_size)
            images += pipeline(
                prompts[chunk],
                num_inference_steps=params.image_inference_steps,
                height=resolution,
                width=resolution,
                guidance_scale=params.image_guidance_scale,
                generator=generators[chunk],
            ).images
    return validation_grid(images, prompts, resolution)


def validation_grid(images: list[Image.Image], prompts: list[str], resolution: int) -> Image.Image:
    """One row per prompt: the prompt wrapped in full beside its image. As column labels over cells of the demo's
    64 px, prompts were cut to "a fantasy landsc…"."""
    from lanskap.core.figures import image_grid

    cell = min(max(resolution, 64), 256)
    return image_grid([[image] for image in images], ["image"], cell=cell, row_labels=prompts, row_header="prompt")


@dataclass
class Monitor:
    """What the main process records: DVCLive rows (loss, lr, images/s every step, of the training steps alone; the
    held-out loss every validation_every steps and at step 0, of the EMA weights too when on), validation images
    every images_every steps. Other processes record nothing; `image_dir` keeps copies of the images beside the
    checkpoints, for a resumed run to log again. Losses and images are of the weights `evaluated` puts in place
    (those exported)."""

    live: object
    held_out: HeldOut
    prompts: list[str]
    resolution: int
    params: TrainParams
    image_dir: Path | None
    main: bool
    evaluated: Callable[[], AbstractContextManager]  # the weights that are exported, in place for the block
    ema: LoraEMA | None = None

    def start(self, parts: Components, resumed: "TrainingState | None") -> "TrainingState":
        """The resumed state with its log replayed, or a fresh one with the base model's loss and images."""
        if resumed is not None:
            replay_log(self.live, resumed, self.image_dir)
            return resumed
        state = TrainingState()
        state.logged.append({"step": 0, **self.validate(parts, state)})
        log_row(self.live, state.logged[0])
        self.images(parts, 0)
        return state

    def record(self, parts: Components, state: "TrainingState", learning_rate: float, images_per_second: float):
        if not self.main:
            return
        step, last = state.step, state.step == self.params.steps
        row = {
            "step": step,
            "train/loss": state.losses[-1],
            "learning_rate": learning_rate,
            "images_per_second": images_per_second,
        }
        if step % self.params.validation_every == 0 or last:
            row |= self.validate(parts, state)
        state.logged.append(row)
        log_row(self.live, row)
        if self.params.images_every and (step % self.params.images_every == 0 or last):
            self.images(parts, step)

    def validate(self, parts: Components, state: "TrainingState") -> dict[str, float]:
        """The held-out loss at state.step, recorded in `state`, as DVCLive metrics."""
        with self.evaluated():
            state.validation_losses[state.step] = loss = self.held_out.loss(parts, self.params.seed)
        if self.ema is None:
            return {"validation/loss": loss}
        with self.ema.applied():
            state.ema_validation_losses[state.step] = ema_loss = self.held_out.loss(parts, self.params.seed)
        return {"validation/loss": loss, "validation/loss_ema": ema_loss}

    def images(self, parts: Components, step: int) -> None:
        if self.main and self.params.images_every:
            with self.evaluated():
                grid = validation_images(parts, self.prompts, self.params, self.resolution)
            log_image(self.live, self.image_dir, step, grid)


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
    from lanskap.core.figures import save_png

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
