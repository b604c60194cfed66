"""Text-to-image pretraining of the built-in base model: UNet and CLIP text encoder trained together (as the
first latent diffusion models trained their text transformer) on base-world images only, v-prediction with SD
2.1-768's noise schedule. Latents are encoded once by the frozen VAE and cached: pretraining needs no
augmentation. Words only the fantasy world uses ("violet", "aurora", "floating islands", "spires") never
occur in these captions, so the base model has never drawn them: that is what the demo's LoRA learns."""

import torch
import torch.nn.functional as F

from lanskap.builtin.config import TINY_SD2, BuildConfig
from lanskap.builtin.training import LossLog, batch_indices, optimizer_and_schedule, train_loop
from lanskap.builtin.worlds import WorldImages, to_unit_range
from lanskap.train.step import tokenize

HELD_OUT_DRAWS = 4  # noise and timestep draws per held-out image, fixed, so the held-out loss is comparable


@torch.no_grad()
def encode_latents(vae, images: WorldImages, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of each image, unscaled: [n, 4, H/4, W/4] each."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(to_unit_range(images.pixels[start : start + batch_size])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def v_prediction_loss(unet, text_encoder, noise_scheduler, latents, token_ids, generator) -> torch.Tensor:
    """The denoising loss of one batch: latents [B, 4, h, w] (scaled), token_ids [B, 77]."""
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise_scheduler.get_velocity(latents, noise, timesteps)
    encoder_hidden_states = text_encoder(token_ids)[0]  # [B, 77, hidden]
    prediction = unet(noisy_latents, timesteps, encoder_hidden_states).sample
    return F.mse_loss(prediction, target)


def train_text_to_image(config: BuildConfig, vae, tokenizer, images: WorldImages, held_out: WorldImages, log: LossLog):
    """Train UNet and text encoder from scratch; returns (unet, text_encoder, noise_scheduler, seconds)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(config.seed)
    unet = UNet2DConditionModel(**TINY_SD2["unet"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_SD2["text_encoder"]))
    noise_scheduler = DDPMScheduler(**TINY_SD2["scheduler"])
    scaling = vae.config.scaling_factor
    means, stds = encode_latents(vae, images)
    held_out_latents = encode_latents(vae, held_out)[0].repeat(HELD_OUT_DRAWS, 1, 1, 1) * scaling
    token_ids = tokenize([*images.captions, ""], tokenizer)  # the last row: the empty caption
    held_out_ids = tokenize(held_out.captions, tokenizer).repeat(HELD_OUT_DRAWS, 1)
    both = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    optimizer, schedule = optimizer_and_schedule(both.parameters(), config.unet, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(config.seed)
    batches = batch_indices(len(images), config.unet.batch_size, generator)

    def step_loss(step: int) -> torch.Tensor:
        rows = next(batches)
        latents = (means[rows] + stds[rows] * torch.randn(means[rows].shape, generator=generator)) * scaling
        dropped = torch.rand(len(rows), generator=generator) < config.caption_dropout
        ids = token_ids[torch.where(dropped, len(images), rows)]
        return v_prediction_loss(unet, text_encoder, noise_scheduler, latents, ids, generator)

    def held_out_loss() -> float:
        fixed = torch.Generator().manual_seed(config.seed + 1)
        return v_prediction_loss(unet, text_encoder, noise_scheduler, held_out_latents, held_out_ids, fixed).item()

    seconds = train_loop(config.unet, both, optimizer, schedule, step_loss, held_out_loss, log, "train UNet")
    return unet.eval(), text_encoder.eval(), noise_scheduler, seconds
