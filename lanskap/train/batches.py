"""Training batches as a function of the position in the run only: which images, with which augmentation seed,
and which rows of each global micro-batch this process trains on."""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lanskap.augment import train_transform
from lanskap.errors import UserError
from lanskap.params import AugmentParams, TrainParams

AUGMENTATION_STREAM, NOISE_STREAM, LATENT_VARIANT_STREAM = 0, 1, 2  # derived_seed streams: never reuse a number


def derived_seed(seed: int, *position: int) -> int:
    """A seed that depends only on (seed, *position), so per-sample randomness is the same whatever the number of
    processes, data-loader workers or a resume."""
    return int(np.random.SeedSequence([seed % 2**63, *position]).generate_state(1, np.uint64)[0] >> 1)


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


def load_split(table: pd.DataFrame) -> tuple[list[str], list[int], list[str]]:
    """Paths, each row's index into the distinct captions, and the distinct captions."""
    captions = sorted(set(table["caption"]))
    position = {caption: index for index, caption in enumerate(captions)}
    return table["path"].tolist(), [position[c] for c in table["caption"]], captions


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


def training_batches(train_table: pd.DataFrame, augment: AugmentParams, resolution: int, params: TrainParams,
                     share: BatchShare, first_batch: int) -> tuple[CaptionedImages, Iterator[list], list[str]]:
    """The augmented training images, this process's keys of each micro-batch from micro-batch `first_batch` on,
    and the distinct captions the images' caption ids index."""
    paths, caption_index, captions = load_split(train_table)
    check_batch_within_data(len(paths), share.total)
    dataset = CaptionedImages(paths, caption_index, train_transform(augment, resolution))
    keys = process_batches(global_batches(len(paths), share.total, params.seed, first_batch), share)
    return dataset, keys, captions


def pixel_batches(dataset: CaptionedImages, keys: Iterator[list], params: TrainParams) -> Iterator:
    """(pixels [B, 3, H, W], caption ids [B]) micro-batches of the keys, decoded and augmented on the fly."""
    # Workers decode and augment the next batches while the GPU trains; each image's augmentation is seeded by its
    # place in the run, so their number changes no result. The loader's own generator: creating its iterator would
    # otherwise draw from the global RNG that a resume restored.
    workers = params.dataloader_workers
    loader = DataLoader(dataset, batch_sampler=keys, generator=torch.Generator().manual_seed(params.seed),
                        num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
    return iter(loader)


def check_batch_within_data(num_images: int, global_micro_batch: int) -> None:
    if global_micro_batch > num_images:
        raise UserError(f"train_lora: train.batch_size x processes = {global_micro_batch} exceeds the {num_images} "
                        "training images; lower train.batch_size and raise train.gradient_accumulation_steps to keep "
                        "the global batch")


def global_batch_size(params: TrainParams, num_processes: int) -> int:
    """Images per optimizer step: the batch the learning rate is tuned for."""
    return params.batch_size * params.gradient_accumulation_steps * num_processes
