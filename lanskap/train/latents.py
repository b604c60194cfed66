"""Training images as VAE posteriors: encoded on the fly each step, or once before training (train.cached_latents).

The cache keeps augmentation, as OneTrainer's does: each training image is augmented K times, with seeds fixed by
its index and variant number, and each variant is encoded once. A micro-batch key (image index, augmentation seed)
then picks variant `seed % K`, so the data a run sees stays a function of its position (resume, process split).
The cache stores the posterior's mean and std, not a sample: the latent is still drawn every step from the step's
generator, as on the fly. It lives in the CPU's memory, per image and variant (so images of different sizes can
share it): 2 x 4 x (H/f) x (W/f) values each, f the VAE's downsampling, in its output dtype (fp32 SD 2.x: 288 KiB
at 768 px; the built-in tiny model, f = 4: 8 KiB at 64 px). Every process of a split run builds the whole cache.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from lanskap.train.batches import LATENT_VARIANT_STREAM, CaptionedImages, derived_seed, loader_workers


@dataclass(frozen=True)
class Posterior:
    """The VAE's diagonal Gaussian over unscaled latents: mean and std [B, 4, H/f, W/f]."""

    mean: torch.Tensor
    std: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "Posterior":
        return Posterior(*(tensor.to(device, non_blocking=non_blocking) for tensor in (self.mean, self.std)))


def encode(vae, pixel_values: torch.Tensor) -> Posterior:
    """Pixels [B, 3, H, W] in [-1, 1] -> the VAE posterior, in the VAE's dtype."""
    vae_dtype = next(vae.parameters()).dtype
    posterior = vae.encode(pixel_values.to(vae_dtype)).latent_dist
    return Posterior(posterior.mean, posterior.std)


def posterior_of(vae, inputs: "torch.Tensor | Posterior") -> Posterior:
    """A micro-batch's posterior: passed through when cached, encoded now from pixels [B, 3, H, W] otherwise."""
    return inputs if isinstance(inputs, Posterior) else encode(vae, inputs)


def variant_seed(seed: int, index: int, variant: int) -> int:
    """The augmentation seed of image `index`'s cached variant `variant`."""
    return derived_seed(seed, LATENT_VARIANT_STREAM, index, variant)


class LatentCache:
    """Posteriors of K augmented variants of each training image; `batch(keys)` looks a micro-batch up."""

    def __init__(self, posteriors: list[list[Posterior]], caption_index: list[int]):
        self.posteriors, self.caption_index = posteriors, caption_index  # posteriors[image][variant]: [4, h, w]
        self.variants = len(posteriors[0])

    @classmethod
    @torch.no_grad()
    def build(
        cls, dataset: CaptionedImages, vae, accelerator, variants: int, seed: int, workers: int = 0
    ) -> "LatentCache":
        """Augment each image `variants` times through `dataset` (so its transform, whatever it is, applies) and
        encode each variant alone, under the training autocast: len(dataset) x variants VAE calls, independent of
        any batch size. Kept on the CPU; the workers decode and augment ahead of the encoder."""
        keys = [
            (index, variant_seed(seed, index, variant)) for index in range(len(dataset)) for variant in range(variants)
        ]
        # the loader's own generator: creating its iterator would otherwise draw from the global RNG
        loader = DataLoader(
            dataset,
            sampler=keys,
            batch_size=None,
            num_workers=loader_workers(workers),
            generator=torch.Generator().manual_seed(seed),
        )
        posteriors = [[] for _ in range(len(dataset))]
        for (index, _), (pixels, _) in zip(keys, loader):
            with accelerator.autocast():
                posterior = encode(vae, pixels[None].to(accelerator.device))  # [1, 4, h, w]
            posteriors[index].append(Posterior(posterior.mean[0].cpu(), posterior.std[0].cpu()))
        return cls(posteriors, list(dataset.caption_index))

    def nbytes(self) -> int:
        return sum(p.mean.nbytes + p.std.nbytes for variants in self.posteriors for p in variants)

    def batch(self, keys: list[tuple[int, int]]) -> tuple[Posterior, torch.Tensor]:
        """(Posterior [B, 4, h, w], caption ids [B]) of keys (image index, augmentation seed): variant seed % K."""
        chosen = [self.posteriors[index][seed % self.variants] for index, seed in keys]
        posterior = Posterior(torch.stack([p.mean for p in chosen]), torch.stack([p.std for p in chosen]))
        return posterior, torch.tensor([self.caption_index[index] for index, _ in keys])

    def batches(self, keys: Iterator[list[tuple[int, int]]]) -> Iterator[tuple[Posterior, torch.Tensor]]:
        for batch_keys in keys:
            yield self.batch(batch_keys)
