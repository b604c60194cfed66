"""What a run records: the held-out validation loss, validation images and the DVCLive log, and its summary."""

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from lanskap.augment import eval_transform
from lanskap.params import TrainParams
from lanskap.train.checkpoints import TrainingState
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
            return diffusion_loss(parts, encode(parts.vae, self.pixel_values), states, generator).item()


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
