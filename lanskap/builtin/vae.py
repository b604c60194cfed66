"""The built-in VAE: an `AutoencoderKL` trained on both worlds, as SD's VAE was trained on far more than the
UNet's data. Loss: L1 reconstruction plus a small KL term (SD's VAE used a KL weight of 1e-6 too). It trains on
whole images at the demo's resolution, flipped at random: trained on 32 px crops, it reconstructed whole 64 px
images at twice the crop error (L1 0.111 against 0.043-0.055), because its mid-block attention and group norms
had only seen the smaller size, and floating islands came back unrecognisable (bench/vae_round_trip.py). Its
`scaling_factor` is set afterwards so that scaled latents have unit standard deviation, as SD's 0.18215 was chosen."""

import torch

from lanskap.builtin.config import TINY_SD2, BuildConfig
from lanskap.builtin.training import LossLog, batch_indices, optimizer_and_schedule, train_loop
from lanskap.builtin.worlds import WorldImages, to_unit_range


def random_flips(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image [n, 3, H, W] horizontally flipped with probability 1/2."""
    flips = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(flips[:, None, None, None], images.flip(-1), images)


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
        batch = random_flips(pixels[next(batches)], generator)  # [B, 3, H, W]
        return reconstruction_loss(vae, batch, config.vae_kl_weight, generator)

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
