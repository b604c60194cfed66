"""Preflight checks: stop a stage before its work starts when the disk or the GPU cannot hold it.

Disk: each stage estimates the bytes it is about to write (an upper bound where the encoder's output size
is unknown), and `require_free_space` compares that, plus a margin, with the free space where the output
goes. DVC's later copy of the outputs into its cache is not counted: it happens after the stage, and
its size depends on the cache's location and link type.

Everything the params name, at the first stage: `require_pipeline_inputs` checks, before ingest reads an image,
that every model and weights file the later stages load can be found (the base model, CLIP, clean-fid's
Inception, the captioner when captions come from a model) and that the source holds enough images for
split to leave evaluate its minimum of test prompts; one message lists every problem.

GPU: `require_batch_fits` runs one real step (a training step, a sampling call) at the configured batch
before the long loop; on an out-of-memory error it searches for the largest batch that fits and stops
with the settings to use. On CPU it does nothing: host memory is not probed. torch is imported there, not here:
ingest runs these checks without it.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from lanskap.core.errors import UserError
from lanskap.core.params import FID_STABLE_N
from lanskap.data.split import MIN_TEST_PROMPTS

if TYPE_CHECKING:
    import torch

MARGIN = 1.25  # file-system blocks, PNG headers and row filters, logs, temporary files
HEADROOM_BYTES = 256 * 2**20  # never fill the disk to the last byte: other programs share it
RGB_BYTES = 3  # an 8-bit RGB pixel; PNG compresses below this, so pixels x 3 bounds a PNG's size
NOMINAL_DOWNLOAD_BYTES = 4 * 2**20  # a URL's image before it is fetched: a large JPEG photo
FLOAT32_BYTES = 4  # LoRA weights stay float32 whatever the base model's dtype (see lanskap.lora.adapters)
# float32 tensors each train.optimizer keeps per parameter: AdamW exp_avg and exp_avg_sq (8-bit AdamW less);
# Prodigy those and s, p0; schedule-free AdamW z and exp_avg_sq
OPTIMIZER_STATES = {"adamw": 2, "adamw8bit": 2, "prodigy": 4, "adamw_schedulefree": 2}


# -------------------------------------------------------------------------------------------- disk


def format_bytes(count: float) -> str:
    """Bytes as GiB or MiB, the units `df -h` users read."""
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def nearest_existing(path: Path) -> Path:
    """The path itself or its closest existing parent: outputs do not exist yet on a first run."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def require_free_space(path: str | Path, needed_bytes: int, what: str, shrink: str) -> None:
    """Raise a UserError unless the disk holding `path` has `needed_bytes` plus the margin free.

    `what` names the writer ("ingest"), `shrink` the params that make the output smaller."""
    folder = nearest_existing(Path(path))
    required = math.ceil(needed_bytes * MARGIN) + HEADROOM_BYTES
    free = shutil.disk_usage(folder).free
    if free < required:
        raise UserError(
            f"{what}: not enough disk space in {folder}: the planned outputs need about {format_bytes(needed_bytes)} "
            f"({format_bytes(required)} with a safety margin) but only {format_bytes(free)} is free. Free space on "
            f"that disk, or shrink the run ({shrink})."
        )


def rgb_image_bytes(count: int, side: int) -> int:
    """Upper bound of `count` square 8-bit RGB PNGs of side x side pixels."""
    return count * side * side * RGB_BYTES


def procedural_ingest_bytes(num_images: int, image_size: int) -> int:
    """builtin:procedural writes num_images square PNGs of image_size."""
    return rgb_image_bytes(num_images, image_size)


def source_ingest_bytes(local_files: Iterable[Path], url_cache_files: Iterable[Path], max_download_bytes: int) -> int:
    """Bytes ingest writes for a folder or manifest: a copy of each local file (its size), a copy of each
    URL's cached download, and for a URL not cached yet two copies (cache, output) of a nominal photo,
    capped at the download size cap."""
    total = 0
    for path in local_files:
        total += path.stat().st_size if path.is_file() else 0
    for path in url_cache_files:
        total += path.stat().st_size if path.is_file() else 2 * min(NOMINAL_DOWNLOAD_BYTES, max_download_bytes)
    return total


def canonical_pixels(width: int, height: int, resolution: int, center_crop: bool) -> int:
    """Pixels of preprocess's canonical image: shorter side at `resolution`, square when centre-cropped."""
    if center_crop:
        return resolution * resolution
    return resolution * max(resolution, round(resolution * max(width, height) / min(width, height)))


def preprocess_bytes(sizes: Iterable[tuple[int, int]], resolution: int, center_crop: bool, preview_samples: int) -> int:
    """Canonical PNGs of the train and test images (their source (width, height) in `sizes`), plus the
    preview: each sampled image beside three augmentations, at `resolution`."""
    pixels = sum(canonical_pixels(width, height, resolution, center_crop) for width, height in sizes)
    return pixels * RGB_BYTES + rgb_image_bytes(4 * preview_samples, resolution)


def generate_bytes(prompts: int, images_per_prompt: int, resolution: int, grid_rows: int) -> int:
    """Base and LoRA PNGs for every (prompt, sample), plus the comparison grid (reference | base | LoRA)."""
    return rgb_image_bytes(2 * prompts * images_per_prompt, resolution) + rgb_image_bytes(3 * grid_rows, resolution)


def train_lora_bytes(
    trainable_parameters: int, checkpoints_kept: int, optimizer: str = "adamw", ema: bool = False
) -> int:
    """The exported LoRA (diffusers and kohya files) and the resume checkpoints (LoRA weights and optimizer
    state); one more checkpoint than kept exists while the newest is written, before the oldest goes. An EMA
    (train.ema_decay) is exported too and saved in every checkpoint."""
    weights = trainable_parameters * FLOAT32_BYTES
    copies = 2 if ema else 1
    return 2 * weights * copies + (checkpoints_kept + 1) * weights * (copies + OPTIMIZER_STATES[optimizer])


COMPARABLE_FID_SWITCH = "LANSKAP_REQUIRE_COMPARABLE_FID"  # 1: generate stops unless FID will be comparable


def require_comparable_fid(prompts: int, images_per_prompt: int) -> None:
    """With LANSKAP_REQUIRE_COMPARABLE_FID=1, both FID sets, the test images (one per prompt) and the LoRA images
    (images_per_prompt per prompt), must reach the size evaluate calls comparable, before hours of sampling. An
    environment switch, not a param: it changes no output, it only stops a run that would not give what was asked."""
    switch = os.environ.get(COMPARABLE_FID_SWITCH, "0")
    if switch not in ("0", "1"):
        raise UserError(f"{COMPARABLE_FID_SWITCH}={switch!r}: use 1 (stop unless FID is comparable) or 0 (the default)")
    short = [
        f"{name} {count}"
        for name, count in (("test images", prompts), ("generated images per model", prompts * images_per_prompt))
        if count < FID_STABLE_N
    ]
    if switch == "1" and short:
        raise UserError(
            f"{COMPARABLE_FID_SWITCH}=1: FID is comparable across runs from {FID_STABLE_N} images per set, but "
            f"this run has {' and '.join(short)}: add test images (split.test_fraction, more source images), raise "
            f"generate.images_per_prompt, or unset {COMPARABLE_FID_SWITCH}"
        )


# ------------------------------------------------------------------------------- pipeline inputs


def images_needed(test_fraction: float) -> int:
    """Source images for split to leave MIN_TEST_PROMPTS test images and a training image, on average: the
    hash split's test share varies around the fraction, so split checks the real count again."""
    return max(MIN_TEST_PROMPTS + 1, math.ceil(MIN_TEST_PROMPTS / test_fraction - 1e-9))


def source_image_count(source: str, num_images: int) -> int:
    """Images ingest will try: builtin:procedural's num_images, a folder's image files, a manifest's rows."""
    from lanskap.data.sources import manifest_rows, scan_folder

    if source == "builtin:procedural":
        return num_images
    path = Path(source)
    if not path.exists():
        raise UserError(
            f"ingest.source: {path} does not exist; put images (with .txt captions) there, "
            "or use `builtin:procedural` for the demo data"
        )
    return len(scan_folder(path).images) if path.is_dir() else len(manifest_rows(path))


def check_image_count(ingest, split) -> None:
    count, needed = source_image_count(ingest.source, ingest.num_images), images_needed(split.test_fraction)
    if count < needed:
        raise UserError(
            f"ingest.source: {count} image(s) in {ingest.source}, but split.test_fraction="
            f"{split.test_fraction} needs at least {needed} for evaluate's test prompts: add images "
            "or raise split.test_fraction"
        )


def check_inception(spec: str) -> None:
    """evaluate.inception_weights resolves, as features.load_inception would, without loading the network."""
    from lanskap.builtin import builtin_folder
    from lanskap.evaluate.features import (
        BUILTIN_TINY_INCEPTION,
        INCEPTION_FILE,
        load_cleanfid_inception,
        require_torchscript,
    )

    if spec.startswith("builtin:"):
        if spec != BUILTIN_TINY_INCEPTION:
            raise UserError(
                f"evaluate.inception_weights: unknown built-in {spec!r}; "
                f"the built-in model is {BUILTIN_TINY_INCEPTION!r}"
            )
        builtin_folder(spec, "evaluate.inception_weights")
        return
    weights = Path(spec).expanduser()
    if not weights.is_file() or weights.name != INCEPTION_FILE:
        load_cleanfid_inception(spec)  # raises its UserError (missing or misnamed file) before loading anything
    require_torchscript(weights)


def require_pipeline_inputs(params: dict) -> None:
    """Raise one UserError listing everything missing that a stage of this run would need, from the loaded
    `model`, `ingest`, `caption`, `split` and `evaluate` params groups."""
    from lanskap.data.captions import resolve_captioner
    from lanskap.evaluate.features import resolve_clip_folder
    from lanskap.models.resolve import resolve_base_model

    model, evaluate = params["model"], params["evaluate"]
    checks = [
        lambda: resolve_base_model(model.base, model.revision),
        lambda: resolve_clip_folder(evaluate.clip_model, evaluate.clip_revision),
        lambda: check_inception(evaluate.inception_weights),
        lambda: check_image_count(params["ingest"], params["split"]),
    ]
    if params["caption"].method == "model":
        checks.append(lambda: resolve_captioner(params["caption"]))
    problems = []
    for check in checks:
        try:
            check()
        except UserError as problem:
            problems.append(str(problem))
    if problems:
        raise UserError(
            f"{len(problems)} thing(s) this run needs are missing; nothing was run:\n"
            + "\n".join(f"  - {problem}" for problem in problems)
        )


# --------------------------------------------------------------------------------------------- GPU


def is_cuda(device: torch.device | str) -> bool:
    import torch

    return torch.device(device).type == "cuda"


def gpu_memory(device: torch.device | str) -> tuple[int, int]:
    """(total, free) bytes of the GPU."""
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    return total, free


def fits(run_batch: Callable[[int], None], batch: int) -> bool:
    """Whether `run_batch(batch)` completes without running out of GPU memory; the memory it used is given
    back to the driver either way, so the next probe and the real run start from the same state."""
    import torch

    try:
        run_batch(batch)
        ok = True
    except torch.cuda.OutOfMemoryError:
        ok = False  # cleaned up below: inside this block the traceback still holds the step's tensors
    if not ok:
        gc.collect()  # a failed step's tensors can sit in reference cycles with its frames
    torch.cuda.empty_cache()
    return ok


def largest_batch_that_fits(run_batch: Callable[[int], None], batch_size: int) -> int:
    """The largest batch <= batch_size that runs without running out of GPU memory, 0 if not even 1 does:
    batch_size itself if it fits, else halve until one fits and bisect between it and the smallest failure."""
    if fits(run_batch, batch_size):
        return batch_size
    failed, good = batch_size, batch_size // 2
    while good > 0 and not fits(run_batch, good):
        failed, good = good, good // 2
    while 0 < good < failed - 1:
        middle = (good + failed) // 2
        good, failed = (middle, failed) if fits(run_batch, middle) else (good, middle)
    return good


def largest_divisor_at_most(number: int, limit: int) -> int:
    """A batch that divides the global batch, so accumulation keeps it exactly."""
    return max(divisor for divisor in range(1, limit + 1) if number % divisor == 0)


def require_batch_fits(
    run_batch: Callable[[int], None],
    batch_size: int,
    key: str,
    device: torch.device | str,
    if_none_fits: str,
    accumulation_key: str | None = None,
    accumulation_steps: int = 1,
) -> None:
    """On CUDA, run one step at `batch_size` and raise a UserError naming a batch that fits if it runs out of
    memory; on any other device do nothing.

    `run_batch(n)` runs one real step at batch n (forward and backward, or one sampling call); it is called
    once when the batch fits, about log2(batch_size) times when it does not. `key` is the param holding the
    batch size; with `accumulation_key` the suggestion keeps the global batch (batch x accumulation steps).
    `if_none_fits` says what to change when not even a batch of 1 fits."""
    if not is_cuda(device):
        return
    fitting = largest_batch_that_fits(run_batch, batch_size)
    if fitting == batch_size:
        return
    total, free = gpu_memory(device)
    memory = f"the GPU's {format_bytes(total)} ({format_bytes(free)} free beside the loaded model)"
    if fitting == 0:
        raise UserError(f"{key}={batch_size} does not fit in {memory}; not even a batch of 1 fits: {if_none_fits}")
    if accumulation_key is None:
        raise UserError(f"{key}={batch_size} does not fit in {memory}; batch {fitting} fits: set {key}: {fitting}")
    global_batch = batch_size * accumulation_steps
    suggested = largest_divisor_at_most(global_batch, fitting)
    raise UserError(
        f"{key}={batch_size} does not fit in {memory}; batch {fitting} fits: set {key}: {suggested} and "
        f"{accumulation_key}: {global_batch // suggested} to keep the global batch of {global_batch}"
    )
