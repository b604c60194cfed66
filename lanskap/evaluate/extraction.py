"""Every image set's CLIP and Inception features: each image file read and decoded once for both extractors, in
fixed batches shared out among any number of processes (`accelerate launch`), through the feature cache.

The batches are cut from each set's own order (test, base, LoRA), BATCH_SIZE images from its start, whatever the
number of processes: an image's features depend on the images beside it in its batch in their last bits, so fixed
batches give the same bits, and the same metrics' bytes, on 1 or N processes. Process r computes batches r, r + N,
r + 2N, ... (each set's batches spread over all processes), one round of N at a time, so that the main process's
single progress line counts every process's batches; it then sends them to the main process, which alone
assembles the sets; the cache (lanskap.evaluate.feature_cache) is written by whichever process computed a batch.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lanskap.core.console import progress
from lanskap.evaluate.feature_cache import FeatureCache
from lanskap.evaluate.features import l2_normalised, read_rgb

BATCH_SIZE = 32  # the extractors' own default batch: the demo's features keep the bits they had


@dataclass(frozen=True)
class Batch:
    name: str  # the image set it belongs to
    paths: tuple[Path, ...]


@dataclass
class Extractor:
    """An embedder (`embed_images(list of RGB images) -> [n, d] tensor`) and the cache of its revision."""

    embedder: object
    cache: FeatureCache


def plan(image_sets: dict[str, list[Path]], batch_size: int = BATCH_SIZE) -> list[Batch]:
    """The fixed batches: each set in turn, cut from its start."""
    return [
        Batch(name, tuple(paths[start : start + batch_size]))
        for name, paths in image_sets.items()
        for start in range(0, len(paths), batch_size)
    ]


def decoded(files: Sequence[bytes]) -> list[Image.Image]:
    """Each file's bytes decoded to 8-bit RGB, once for both extractors (features.read_rgb, the references' decode)."""
    return [read_rgb(io.BytesIO(data)) for data in files]


def batch_outputs(batch: Batch, extractors: dict[str, Extractor], counts: dict[str, int]) -> dict[str, np.ndarray]:
    """kind -> the batch's raw outputs [len(batch), d]: from the cache where a verified entry exists, else computed
    (the images decoded once for every extractor that missed) and stored. `counts` tallies hits and misses."""
    files = [path.read_bytes() for path in batch.paths]
    images = [hashlib.sha256(data).hexdigest() for data in files]
    outputs = {kind: extractor.cache.read(images) for kind, extractor in extractors.items()}
    missing = [kind for kind, found in outputs.items() if found is None]
    counts["hit"] += len(outputs) - len(missing)
    counts["miss"] += len(missing)
    if missing:
        pictures = decoded(files)
        with torch.inference_mode():
            for kind in missing:
                outputs[kind] = extractors[kind].embedder.embed_images(pictures).cpu().numpy()
                extractors[kind].cache.write(images, outputs[kind])
    return outputs


def extract_sets(
    image_sets: dict[str, list[Path]], extractors: dict[str, Extractor], processes
) -> tuple[dict[str, dict[str, np.ndarray]] | None, dict[str, int]]:
    """kind -> set name -> float64 features [n, d] (CLIP rows L2-normalised), on the main process; None on the
    others. `processes` is accelerate's PartialState. Also this process's cache hits and misses (in batch entries)."""
    batches, size = plan(image_sets), processes.num_processes
    counts, done = {"hit": 0, "miss": 0}, {}
    shown = progress(total=len(batches), desc="features", unit="batch", disable=len(batches) <= 1)
    for first in range(0, len(batches), size):  # round: batch first + r on process r
        if first + processes.process_index < len(batches):
            index = first + processes.process_index
            done[index] = batch_outputs(batches[index], extractors, counts)
        if size > 1:  # the round's batches are all done when the main process counts them
            torch.distributed.barrier()
        shown.update(min(size, len(batches) - first))
    shown.close()
    parts = gathered(done, processes)
    if parts is None:
        return None, counts
    for part in parts:
        done |= part
    return {kind: assembled(batches, done, kind) for kind in extractors}, counts


def gathered(done: dict, processes) -> list[dict] | None:
    """Every process's batches, on the main process (None on the others)."""
    if processes.num_processes == 1:
        return [done]
    parts = [None] * processes.num_processes if processes.is_main_process else None
    torch.distributed.gather_object(done, parts, dst=0)
    return parts


def assembled(batches: list[Batch], done: dict[int, dict[str, np.ndarray]], kind: str) -> dict[str, np.ndarray]:
    """set name -> `kind`'s float64 rows in the set's order; CLIP's L2-normalised, as the metrics take them."""
    sets: dict[str, list[np.ndarray]] = {}
    for index, batch in enumerate(batches):
        sets.setdefault(batch.name, []).append(done[index][kind])
    rows = {name: np.concatenate(chunks).astype(np.float64) for name, chunks in sets.items()}
    return {name: l2_normalised(value) if kind == "clip" else value for name, value in rows.items()}
