"""What a VAE round trip keeps of the fantasy world's small objects: the built-in tiny-sd2 VAE by default.

    python bench/vae_round_trip.py [--vae lanskap/assets/builtin/tiny-sd2/vae] [--images 150]

Draws the builder's held-out fantasy images (seed 9000, 64 px, as the demo shows them), encodes each to the
posterior mean and decodes it, then asks the tiny-inception islands head, refit within the fantasy world, whether
each image shows floating islands: on the originals and on the round trips, with its true- and false-positive
rates. A VAE that keeps islands leaves the head as accurate on the round trips as on the originals; one that
blurs them away brings it to chance. Also prints the round trip's PSNR, and its L1 on whole images beside its L1 on
32 px crops of them (the size the shipped VAE trained on). CPU, about a minute.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lanskap.core.determinism import pin_cpu_math  # noqa: E402

pin_cpu_math()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lanskap.builtin import builtin_folder  # noqa: E402
from lanskap.builtin.config import FULL, HELD_OUT_SEED  # noqa: E402
from lanskap.builtin.heads import load_scene_heads  # noqa: E402
from lanskap.builtin.inception import pool_features  # noqa: E402
from lanskap.builtin.worlds import WorldImages, render_world, to_unit_range  # noqa: E402
from lanskap.evaluate.features import BUILTIN_TINY_INCEPTION, load_tiny_inception  # noqa: E402


@torch.no_grad()
def round_trip(vae, pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """uint8 [n, H, W, 3] through encode (posterior mean) and decode: (uint8 round trips, PSNR in dB)."""
    images = to_unit_range(pixels)  # [n, 3, H, W] in [-1, 1]
    decoded = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    psnr = 10 * np.log10(4.0 / (decoded - images).pow(2).mean().item())
    return ((decoded + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy(), psnr


@torch.no_grad()
def whole_and_crop_l1(vae, pixels: np.ndarray, crop: int = 32) -> tuple[float, float]:
    """Mean L1 of the round trip on whole images, and on the four corner crops of side `crop` taken before encoding."""
    images = to_unit_range(pixels)  # [n, 3, H, W]
    whole = (vae.decode(vae.encode(images).latent_dist.mean).sample - images).abs().mean().item()
    side = images.shape[-1]
    crops = [images[..., top : top + crop, left : left + crop] for top in (0, side - crop) for left in (0, side - crop)]
    errors = [(vae.decode(vae.encode(part).latent_dist.mean).sample - part).abs().mean().item() for part in crops]
    return whole, float(np.mean(errors))


def islands_found(network, heads, images: WorldImages) -> np.ndarray:
    """The islands head's verdict per image [n] (bool), from tiny-inception's `network` and `heads`."""
    features = pool_features(network, images, list(range(len(images))))
    with torch.no_grad():
        return heads(features)["islands"].argmax(dim=1).numpy().astype(bool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", type=Path, default=ROOT / "lanskap/assets/builtin/tiny-sd2/vae")
    parser.add_argument("--images", type=int, default=FULL.held_out_images)
    args = parser.parse_args()
    from diffusers import AutoencoderKL

    torch.set_num_threads(1)
    held_out = render_world("fantasy", args.images, HELD_OUT_SEED, FULL.render_size, FULL.resolution)
    drawn = np.array([scene.has_islands for scene in held_out.scenes])
    vae = AutoencoderKL.from_pretrained(args.vae).float().eval()
    round_trips, psnr = round_trip(vae, held_out.pixels)
    folder = builtin_folder(BUILTIN_TINY_INCEPTION, "evaluate.inception_weights")
    network, heads = load_tiny_inception(folder).eval(), load_scene_heads(folder)
    print(f"VAE {args.vae}: round-trip PSNR {psnr:.2f} dB on {len(drawn)} fantasy images, {drawn.sum()} with islands")
    whole_l1, crop_l1 = whole_and_crop_l1(vae, held_out.pixels)
    print(f"round-trip L1 on whole images {whole_l1:.3f}, on 32 px corner crops {crop_l1:.3f}")
    for name, pixels in (("originals", held_out.pixels), ("round trips", round_trips)):
        found = islands_found(network, heads, WorldImages(pixels, held_out.captions, held_out.scenes))
        print(
            f"islands head on the {name}: accuracy {np.mean(found == drawn):.3f}, "
            f"found where drawn {found[drawn].mean():.3f}, where not drawn {found[~drawn].mean():.3f}"
        )


if __name__ == "__main__":
    main()
