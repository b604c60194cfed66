"""Training batches as a function of the position in the run only: which images, with which augmentation seed,
and which rows of each global micro-batch this process trains on. Every global micro-batch comes from one
aspect-ratio bucket (a single one, the square resolution, unless preprocess.buckets is set)."""

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lanskap.core.params import AugmentParams, TrainParams
from lanskap.data.augment import train_transform
from lanskap.data.buckets import bucket_groups, require_trainable_bucket, table_sizes

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
        return tensor[self.start : self.start + (self.size or self.total)]

    def randn(self, sample_shape, generator, dtype) -> torch.Tensor:
        return self.rows(
            torch.randn((self.total, *sample_shape), generator=generator, device=generator.device, dtype=dtype)
        )

    def rand(self, generator) -> torch.Tensor:
        return self.rows(torch.rand(self.total, generator=generator, device=generator.device))

    def randint(self, high: int, generator) -> torch.Tensor:
        return self.rows(torch.randint(0, high, (self.total,), generator=generator, device=generator.device))


class CaptionedImages(Dataset):
    """Canonical training images, transformed on access by each image's own transform (its bucket's size). A key
    is (image index, augmentation seed); an item is (pixels [3, H, W], caption id)."""

    def __init__(self, paths: list[str], caption_index: list[int], transforms: list):
        self.paths, self.caption_index, self.transforms = paths, caption_index, transforms

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        index, seed = key
        with Image.open(self.paths[index]) as image, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # torchvision's random transforms draw from the global generator
            return self.transforms[index](image.convert("RGB")), self.caption_index[index]


def load_split(table: pd.DataFrame) -> tuple[list[str], list[int], list[str]]:
    """Paths, each row's index into the distinct captions, and the distinct captions."""
    captions = sorted(set(table["caption"]))
    position = {caption: index for index, caption in enumerate(captions)}
    return table["path"].tolist(), [position[c] for c in table["caption"]], captions


def scrambled(caption_index: list[int], seed: int) -> list[int]:
    """The captions moved one place along a random cycle of the images (seeded): every image gets another image's
    caption, and the set of captions trained on stays the same (`train.shuffle_captions`, a negative control)."""
    order = torch.randperm(len(caption_index), generator=torch.Generator().manual_seed(seed)).tolist()
    moved = list(caption_index)
    for position, image in enumerate(order):
        moved[image] = caption_index[order[(position + 1) % len(order)]]
    return moved


def epoch_batches(groups: list[list[int]], global_batch: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch's global micro-batches of image indices: each bucket's images in a fresh random order cut into
    whole batches (the partial rest dropped), then the buckets' batches shuffled together."""
    batches = []
    for group in groups:
        order = torch.randperm(len(group), generator=generator).tolist()
        batches += [
            [group[i] for i in order[start : start + global_batch]]
            for start in range(0, len(group) - global_batch + 1, global_batch)
        ]
    if len(groups) > 1:  # a single bucket's batches are in random order already (and unbucketed runs unchanged)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def global_batches(
    groups: list[list[int]], global_batch: int, seed: int, start: int
) -> Iterator[list[tuple[int, int]]]:
    """Global micro-batches of (image index, augmentation seed) forever, from micro-batch number `start` on; each
    from one group (bucket) of image indices.

    Each epoch is drawn from one seeded generator and each image's augmentation seed depends on its place in the
    sequence only, so the data a run sees is a function of the micro-batch count: a resumed run, or a run split
    over N processes, sees the same."""
    batches_per_epoch = sum(len(group) // global_batch for group in groups)
    epoch, position = divmod(start, batches_per_epoch)
    order_generator = torch.Generator().manual_seed(seed)
    for _ in range(epoch):  # replay the draws of the epochs already done
        epoch_batches(groups, global_batch, order_generator)
    number = start
    while True:
        for indices in epoch_batches(groups, global_batch, order_generator)[position:]:
            yield [(index, derived_seed(seed, AUGMENTATION_STREAM, number, k)) for k, index in enumerate(indices)]
            number += 1
        position = 0


def process_batches(batches: Iterator[list], share: BatchShare) -> Iterator[list]:
    """This process's rows of each global micro-batch."""
    for batch in batches:
        yield share.rows(batch)


def training_batches(
    train_table: pd.DataFrame, augment: AugmentParams, params: TrainParams, share: BatchShare, first_batch: int
) -> tuple[CaptionedImages, Iterator[list], list[str]]:
    """The augmented training images (each at its bucket's size: the table's bucket columns), this process's keys
    of each micro-batch from micro-batch `first_batch` on, and the distinct captions the images' caption ids
    index."""
    paths, caption_index, captions = load_split(train_table)
    if params.shuffle_captions:
        caption_index = scrambled(caption_index, params.seed)
    sizes = table_sizes(train_table)
    groups = bucket_groups(sizes)
    require_trainable_bucket(groups, share.total, "train_lora", "train.batch_size x processes")
    transforms = {size: train_transform(augment, size) for size in groups}
    dataset = CaptionedImages(paths, caption_index, [transforms[size] for size in sizes])
    keys = process_batches(global_batches(list(groups.values()), share.total, params.seed, first_batch), share)
    return dataset, keys, captions


def loader_workers(setting: int) -> int:
    """train.dataloader_workers, at most this process's CPU cores: more workers than cores only compete for them
    (torch warns), and the preset's 4 must also run on a 2-core machine. Their number changes no result."""
    return min(setting, len(os.sched_getaffinity(0)))


def pixel_batches(dataset: CaptionedImages, keys: Iterator[list], params: TrainParams) -> Iterator:
    """(pixels [B, 3, H, W], caption ids [B]) micro-batches of the keys, decoded and augmented on the fly; H, W:
    the micro-batch's bucket."""
    # Workers decode and augment the next batches while the GPU trains; each image's augmentation is seeded by its
    # place in the run, so their number changes no result. The loader's own generator: creating its iterator would
    # otherwise draw from the global RNG that a resume restored.
    workers = loader_workers(params.dataloader_workers)
    loader = DataLoader(
        dataset,
        batch_sampler=keys,
        generator=torch.Generator().manual_seed(params.seed),
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    return iter(loader)


def global_batch_size(params: TrainParams, num_processes: int) -> int:
    """Images per optimizer step: the batch the learning rate is tuned for."""
    return params.batch_size * params.gradient_accumulation_steps * num_processes
