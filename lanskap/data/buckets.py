"""Aspect-ratio buckets (kohya's `enable_bucket`, OneTrainer's aspect ratio bucketing): training sizes of about
equal pixel area, so that a panorama trains at a wide size instead of losing its sides to a square crop.

preprocess gives each image the bucket nearest its aspect ratio and stores it at that size (the columns
bucket_width, bucket_height of its tables); train_lora draws each micro-batch from one bucket. With
preprocess.buckets off every image's bucket is the square preprocess.resolution.
"""

import math
from collections.abc import Iterable

import pandas as pd

from lanskap.core.errors import UserError

BUCKET_COLUMNS = ["bucket_width", "bucket_height"]
Size = tuple[int, int]  # (width, height) in pixels


def bucket_sizes(resolution: int, step: int, max_aspect_ratio: float) -> list[Size]:
    """Every (width, height) with both sides multiples of `step`, the largest area up to resolution^2 for its width
    (kohya's make_bucket_resolutions), and sides within max_aspect_ratio of each other; both orientations."""
    area = resolution * resolution
    sizes = set()
    for width in range(step, area // step + 1, step):
        height = area // width // step * step
        if height >= step and max(width, height) <= max_aspect_ratio * min(width, height):
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the image's on a log scale (2:1 is as far from 1:1 as 1:2);
    between equally near ones, the larger."""
    target = math.log(width / height)
    return min(sizes, key=lambda size: (abs(math.log(size[0] / size[1]) - target), -size[0] * size[1]))


def table_sizes(table: pd.DataFrame) -> list[Size]:
    """Each row's training size, from the bucket columns preprocess writes."""
    return list(zip(table["bucket_width"].astype(int), table["bucket_height"].astype(int)))


def nominal_resolution(sizes: Iterable[Size]) -> int:
    """The side of a square with the largest training size's area, rounded down to a multiple of 8: the
    resolution itself without buckets (and with them, whenever the square bucket holds an image)."""
    return math.isqrt(max(width * height for width, height in sizes)) // 8 * 8


def bucket_groups(sizes: Iterable[Size]) -> dict[Size, list[int]]:
    """Row positions of each bucket, buckets in (width, height) order, positions ascending."""
    groups: dict[Size, list[int]] = {}
    for position, size in enumerate(sizes):
        groups.setdefault(size, []).append(position)
    return dict(sorted(groups.items()))


def untrained_buckets(groups: dict[Size, list[int]], global_micro_batch: int) -> dict[Size, int]:
    """Buckets holding fewer images than one global micro-batch, with their image counts: never trained on."""
    return {size: len(rows) for size, rows in groups.items() if len(rows) < global_micro_batch}


def require_trainable_bucket(groups: dict[Size, list[int]], global_micro_batch: int, stage: str,
                             batch_key: str) -> None:
    """UserError when no bucket holds a whole global micro-batch: training would have no batch to draw."""
    if len(untrained_buckets(groups, global_micro_batch)) < len(groups):
        return
    if len(groups) == 1:
        raise UserError(f"{stage}: {batch_key} = {global_micro_batch} exceeds the {sum(map(len, groups.values()))} "
                        "training images; lower train.batch_size and raise train.gradient_accumulation_steps to keep "
                        "the global batch")
    largest = max(groups.items(), key=lambda item: len(item[1]))
    raise UserError(f"{stage}: no aspect-ratio bucket holds {batch_key} = {global_micro_batch} training images "
                    f"(the fullest, {size_name(largest[0])}, holds {len(largest[1])}): lower train.batch_size (raising "
                    "train.gradient_accumulation_steps keeps the global batch), or make fewer, fuller buckets with a "
                    "lower preprocess.bucket_max_aspect_ratio or a larger preprocess.bucket_reso_steps")


def size_name(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def untrained_message(groups: dict[Size, list[int]], global_micro_batch: int) -> str | None:
    """A line naming the buckets too small for one global micro-batch, or None when every bucket trains."""
    small = untrained_buckets(groups, global_micro_batch)
    if not small:
        return None
    listed = ", ".join(f"{size_name(size)} ({count})" for size, count in small.items())
    return (f"{sum(small.values())} training images are never trained on: their aspect-ratio buckets hold fewer than "
            f"a global micro-batch of {global_micro_batch}: {listed}")
