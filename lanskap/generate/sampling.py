"""Paired generation: every test caption with the base model and with base + LoRA, same seed per pair,
so every difference between the two images is the LoRA's."""

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lanskap.core.console import progress
from lanskap.core.params import GenerateParams
from lanskap.generate.resume import ImageCache

if TYPE_CHECKING:
    from lanskap.generate.shards import Processes

SCHEDULERS = {  # name -> (diffusers class name, extra config)
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
}


@dataclass(frozen=True)
class Job:
    prompt_index: int
    sample: int  # which of images_per_prompt
    caption: str
    seed: int


def plan_jobs(captions: list[str], params: GenerateParams) -> list[Job]:
    """One job per (caption, sample); the seed depends only on their position and generate.seed."""
    return [
        Job(i, k, caption, params.seed + i * params.images_per_prompt + k)
        for i, caption in enumerate(captions)
        for k in range(params.images_per_prompt)
    ]


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def check_dtype(model_dir: Path, params: GenerateParams, device: torch.device) -> None:
    """The rule train_lora follows (lanskap.models.precision): no fp16 for a model that overflows in it (SD
    2.1-768), no bf16 on a CPU that would emulate it."""
    from lanskap.models.precision import require_fast_bf16, require_fp16_safe

    dtype = inference_dtype(params.dtype, device)
    if dtype == torch.float16:
        require_fp16_safe(model_dir, "generate.dtype", "generate.dtype: bf16 (or fp32 on a GPU without bf16)")
    if dtype == torch.bfloat16:
        require_fast_bf16(device.type, "generate.dtype", "generate.dtype: fp32 (or auto)")


def out_of_memory_hint(model_dir: Path) -> str:
    """What to change when not even one image fits: fp16 is named only for a model that runs in it."""
    from lanskap.models.precision import fp16_overflows

    dtypes = "bf16" if fp16_overflows(model_dir) else "bf16 (or fp16)"
    return f"lower generate.resolution, or set generate.dtype: {dtypes}"


def load_pipeline(model_dir: Path, params: GenerateParams, device: torch.device):
    import diffusers

    check_dtype(model_dir, params, device)

    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(
        model_dir,
        dtype=inference_dtype(params.dtype, device),
        safety_checker=None,
        requires_safety_checker=False,
        use_safetensors=True,
    )
    scheduler_class, extra = SCHEDULERS[params.scheduler]
    pipeline.scheduler = getattr(diffusers, scheduler_class).from_config(pipeline.scheduler.config, **extra)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def native_resolution(pipeline) -> int:
    return pipeline.unet.config.sample_size * pipeline.vae_scale_factor


def sample(pipeline, captions: list[str], seeds: list[int], params: GenerateParams, resolution: int, steps: int):
    """One batch through the pipeline; each image gets its own seeded generator, so batching never changes it."""
    generators = [torch.Generator(pipeline.device).manual_seed(seed) for seed in seeds]
    return pipeline(
        captions,
        negative_prompt=[params.negative_prompt] * len(captions),
        num_inference_steps=steps,
        guidance_scale=params.guidance_scale,
        height=resolution,
        width=resolution,
        generator=generators,
    ).images


def png_bytes(image) -> bytes:
    stream = io.BytesIO()
    image.save(stream, format="PNG")  # what image.save(path.png) writes
    return stream.getvalue()


def image_name(job: Job) -> str:
    return f"{job.prompt_index:04d}_{job.sample:02d}.png"


def draw_batch(pipeline, batch: list[Job], params: GenerateParams, resolution: int, cache: "ImageCache | None"):
    """One batch's PNG bytes, drawn, and kept in `cache` (when given) for a resumed run."""
    captions, seeds = [job.caption for job in batch], [job.seed for job in batch]
    drawn = [png_bytes(image) for image in sample(pipeline, captions, seeds, params, resolution, params.steps)]
    for job, data in zip(batch, drawn) if cache else []:
        cache.put(image_name(job), data)
    return drawn


def cached_batch(batch: list[Job], cache: "ImageCache | None") -> list[bytes] | None:
    """The batch's cached PNG bytes when all are there and verified, else None (the batch is drawn whole again)."""
    cached = [cache.get(image_name(job)) for job in batch] if cache else [None]
    return None if any(data is None for data in cached) else cached


def image_bar(total: int, description: str, main: bool):
    """The stage's progress line: images done of `total`, their rate and the time left, drawn by the main process
    only. The rate is the run's average (smoothing=0): every batch costs the same, and it stays right after a jump
    of reused images (count_reused)."""
    return progress(total=total, desc=description, unit="image", smoothing=0, disable=not main)


def count_reused(bar, count: int) -> None:
    """Count `count` images taken from the resume cache as done, but not in the rate (tqdm's average rate counts
    from `initial`): else a resumed run would show the rate of copying files and an ETA far too short."""
    bar.initial += count
    bar.update(count)


def generate_images(
    pipeline,
    jobs: list[Job],
    params: GenerateParams,
    out_dir: Path,
    label: str,
    cache: "ImageCache | None" = None,
    processes: "Processes | None" = None,
    bar=None,
) -> list[Path]:
    """Run the jobs in batches of generate.batch_size and save one PNG per job into `out_dir`; returns the paths in
    job order. With a `cache` (lanskap.generate.resume), a batch whose images are all cached and verified is copied
    from it, and each drawn batch is cached. With `processes` (lanskap.generate.shards), the batches are shared
    among `accelerate launch`'s processes: only the main one writes `out_dir` and returns the paths (the others
    return []). `bar`: the stage's progress line, counting images (one is made here when not given)."""
    from lanskap.generate.shards import Processes, batches, run_batches

    processes = processes or Processes()
    resolution = params.resolution or native_resolution(pipeline)
    own_bar = bar is None
    if own_bar:
        bar = image_bar(len(jobs), f"generate {label}", processes.main)
    if processes.main:
        out_dir.mkdir(parents=True, exist_ok=True)

    def write(batch: list[Job], data: list[bytes]) -> None:
        for job, image in zip(batch, data):
            (out_dir / image_name(job)).write_bytes(image)
            if cache and not cache.has(image_name(job)):  # drawn on a machine whose disk this one does not see
                cache.put(image_name(job), image)

    reused = run_batches(
        batches(jobs, params.batch_size),
        lambda batch: draw_batch(pipeline, batch, params, resolution, cache),
        lambda batch: cached_batch(batch, cache),
        write,
        processes,
        bar.update,
        lambda count: count_reused(bar, count),
    )
    if own_bar:
        bar.close()
    if reused:
        print(f"generate {label}: {reused} of {len(jobs)} images reused from the interrupted run's cache")
    return [out_dir / image_name(job) for job in jobs] if processes.main else []


def batch_probe(pipeline, caption: str, params: GenerateParams):
    """`run_batch` for the GPU preflight: a batch of n through everything a real batch runs (text encoder,
    a guided UNet step, VAE decode) at generate.resolution, with one step instead of generate.steps: the
    memory peak does not grow with the number of steps."""
    resolution = params.resolution or native_resolution(pipeline)

    def run_batch(batch: int) -> None:
        sample(pipeline, [caption] * batch, list(range(batch)), params, resolution, steps=1)

    return run_batch
