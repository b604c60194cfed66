"""Paired generation: every test caption with the base model and with base + LoRA, same seed per pair,
so every difference between the two images is the LoRA's."""

import io
from dataclasses import dataclass
from pathlib import Path

import torch

from lanskap.core.console import progress
from lanskap.core.params import GenerateParams
from lanskap.generate.resume import ImageCache

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


def generate_images(
    pipeline, jobs: list[Job], params: GenerateParams, out_dir: Path, label: str, cache: "ImageCache | None" = None
) -> list[Path]:
    """Run the jobs in batches of generate.batch_size and save one PNG per job. With a `cache` (lanskap.generate.
    resume), a batch whose images are all cached and verified is copied from it, and each drawn batch is cached."""
    resolution = params.resolution or native_resolution(pipeline)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, reused = [], 0
    for start in progress(range(0, len(jobs), params.batch_size), desc=f"generate {label}", unit="batch"):
        batch = jobs[start : start + params.batch_size]
        names = [f"{job.prompt_index:04d}_{job.sample:02d}.png" for job in batch]
        cached = [cache.get(name) for name in names] if cache else [None]
        if all(data is not None for data in cached):
            reused += len(batch)
        else:
            captions, seeds = [job.caption for job in batch], [job.seed for job in batch]
            cached = [png_bytes(image) for image in sample(pipeline, captions, seeds, params, resolution, params.steps)]
            for name, data in zip(names, cached) if cache else []:
                cache.put(name, data)
        for name, data in zip(names, cached):
            (out_dir / name).write_bytes(data)
            paths.append(out_dir / name)
    if reused:
        print(f"generate {label}: {reused} of {len(jobs)} images reused from the interrupted run's cache")
    return paths


def batch_probe(pipeline, caption: str, params: GenerateParams):
    """`run_batch` for the GPU preflight: a batch of n through everything a real batch runs (text encoder,
    a guided UNet step, VAE decode) at generate.resolution, with one step instead of generate.steps: the
    memory peak does not grow with the number of steps."""
    resolution = params.resolution or native_resolution(pipeline)

    def run_batch(batch: int) -> None:
        sample(pipeline, [caption] * batch, list(range(batch)), params, resolution, steps=1)

    return run_batch
