"""The built-in VAE: an `AutoencoderKL` trained on both worlds, as SD's VAE was trained on far more than the
UNet's data. Loss: L1 reconstruction plus a small KL term (SD's VAE used a KL weight of 1e-6 too); trained on
random 32 px crops, a quarter of a whole image's cost. Its `scaling_factor` is set afterwards so that scaled latents
have unit standard deviation, as SD's 0.18215 was chosen.

Known limit of the shipped VAE: it does not generalise from crops to the whole 64 px images the pipeline feeds
it. On 150 held-out fantasy images it reconstructs 32 px corner crops at L1 0.051 but whole images at 0.112
(bench/vae_round_trip.py), because its mid-block attention and group norms only saw the smaller size. Trained on
whole images (branch islands-vae), it reaches 29.5 dB against 22.8; its 1500 steps took 22 min on one core."""

import torch

from lanskap.builtin.config import TINY_SD2, BuildConfig
from lanskap.builtin.training import LossLog, batch_indices, optimizer_and_schedule, train_loop
from lanskap.builtin.worlds import WorldImages, to_unit_range


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random `size` x `size` crop per image, horizontally flipped with probability 1/2."""
    count, _, height, width = images.shape
    tops = torch.randint(0, height - size + 1, (count,), generator=generator)
    lefts = torch.randint(0, width - size + 1, (count,), generator=generator)
    flips = torch.rand(count, generator=generator) < 0.5
    crops = [image[:, top : top + size, left : left + size] for image, top, left in zip(images, tops, lefts)]
    return torch.stack([crop.flip(-1) if flip else crop for crop, flip in zip(crops, flips)])


def reconstruction_loss(vae, pixels: torch.Tensor, kl_weight: float, generator: torch.Generator) -> torch.Tensor:
    posterior = vae.encode(pixels).latent_dist
    latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    reconstruction = vae.decode(latents).sample
    return (reconstruction - pixels).abs().mean() + kl_weight * posterior.kl().mean()


def train_vae(config: BuildConfig, images: WorldImages, held_out: WorldImages, log: LossLog):
    """Train the VAE; returns (vae with scaling_factor set, seconds)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(config.seed)
    vae = AutoencoderKL(**TINY_SD2["vae"])
    pixels, held_out_pixels = to_unit_range(images.pixels), to_unit_range(held_out.pixels)
    generator = torch.Generator().manual_seed(config.seed)
    batches = batch_indices(len(images), config.vae.batch_size, generator)
    optimizer, schedule = optimizer_and_schedule(vae.parameters(), config.vae)

    def step_loss(step: int) -> torch.Tensor:
        crops = random_crops(pixels[next(batches)], config.vae_crop, generator)  # [B, 3, crop, crop]
        return reconstruction_loss(vae, crops, config.vae_kl_weight, generator)

    def held_out_loss() -> float:  # whole images, the posterior mean: what generate's decoder sees
        return (vae.decode(vae.encode(held_out_pixels).latent_dist.mean).sample - held_out_pixels).abs().mean().item()

    seconds = train_loop(config.vae, vae, optimizer, schedule, step_loss, held_out_loss, log, "train VAE")
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(held_out_pixels).latent_dist.mean  # [n, 4, H/4, W/4]
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    log.add(config.vae.steps, "held_out_psnr_db", psnr(vae, held_out_pixels))
    return vae, seconds


@torch.no_grad()
def psnr(vae, pixels: torch.Tensor) -> float:
    """Reconstruction PSNR in dB over images in [-1, 1] (peak-to-peak 2)."""
    reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    mse = (reconstruction - pixels).pow(2).mean().item()
    return 10 * torch.log10(torch.tensor(4.0 / mse)).item()
