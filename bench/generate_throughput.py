"""Generation throughput: the project's generate path against plain diffusers, side by side in one run.

    python bench/generate_throughput.py MODEL_DIR [--batch 10] [--steps 25] [--resolution 768]
        [--images 20] [--levers bf16 channels_last compile eager_attention fuse_qkv bf16+channels_last]
    python bench/generate_throughput.py --dry-run   # CPU smoke test on builtin:tiny-sd2, tiny sizes

MODEL_DIR is a diffusers folder; when it has no model_index.json a randomly initialised model with SD
2.1-768's exact architecture is built there first (about 5 GB; speed and memory depend on shapes, not on
weights). Variants, each loaded fresh and measured on the same prompts, batch, steps and resolution:

- `diffusers`: StableDiffusionPipeline, fp16, DPMSolverMultistepScheduler: the anchor (0.42 s/image on
  an H100 at batch 10, 25 steps, 768 px);
- `lanskap`: `lanskap.generate.sampling.load_pipeline` + `generate_images` (per-image seeded generators, negative
  prompt, PNG writes), fp16 like the anchor;
- `lanskap+LEVER`: the same with one lever (or `+`-joined levers) applied: `bf16` (the project's GPU
  default), `channels_last` (UNet and VAE memory layout), `compile` (torch.compile of the UNet),
  `eager_attention` (diffusers' pre-SDPA attention: what SDPA, the default, saves), `fuse_qkv` (fused
  attention projections).

Prints seconds per image, images/s, peak GPU memory and each variant's time relative to `diffusers`.
Needs CUDA; `--dry-run` runs every code path on CPU at tiny sizes and its figures mean nothing.
"""

import argparse
import gc
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
import transformers

from lanskap.core.io import atomic_dir
from lanskap.core.params import GenerateParams, conf_group
from lanskap.generate.sampling import generate_images, inference_dtype, load_pipeline, plan_jobs
from lanskap.models.resolve import clip_tokenizer_dir, resolve_base_model

LEVERS = ("bf16", "channels_last", "compile", "eager_attention", "fuse_qkv")
PROMPT = "a fantasy landscape with floating islands, waterfalls and a castle at dusk"
WARMUP_STEPS = 2  # one short batch first: CUDA context, cuDNN autotuning and compilation are not timed
SD21_768 = {  # shared/bench/make_random_sd21.py's architecture: UNet 865.9 M, text encoder 340.4 M, VAE 83.7 M
    "unet": dict(
        sample_size=96,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
    ),
    "vae": dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=768,
        layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    ),
    "text_encoder": dict(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=512,
    ),
    "scheduler": dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        steps_offset=1,
    ),
}


def build_random_sd21(model_dir: Path) -> None:
    """Save a seeded random pipeline with SD 2.1-768's architecture and the real CLIP tokenizer."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD21_768["vae"]),
        unet=UNet2DConditionModel(**SD21_768["unet"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD21_768["text_encoder"])),
        tokenizer=CLIPTokenizer.from_pretrained(clip_tokenizer_dir(), model_max_length=77),
        scheduler=DDPMScheduler(**SD21_768["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with atomic_dir(model_dir) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)


def load_plain_diffusers(model_dir: Path, dtype: torch.dtype, device: torch.device):
    """The anchor exactly as shared/bench/gen_bench.py loads it."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def apply_levers(pipeline, levers: list[str], dry_run: bool) -> None:
    """Apply speed levers in place (`bf16` is a load-time dtype, handled by the caller)."""
    from diffusers.models.attention_processor import AttnProcessor

    if "channels_last" in levers:
        pipeline.unet.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)
    if "eager_attention" in levers:
        pipeline.unet.set_attn_processor(AttnProcessor())
    if "fuse_qkv" in levers:
        pipeline.fuse_qkv_projections()
    if "compile" in levers:
        # On CPU the dry run checks the wiring only; inductor would need a C++ toolchain and minutes.
        pipeline.unet = torch.compile(pipeline.unet, backend="eager" if dry_run else "inductor")


def plain_runner(pipeline, images: int, batch: int, resolution: int) -> Callable[[int], None]:
    def run(steps: int, count: int = images) -> None:
        for start in range(0, count, batch):
            prompts = [PROMPT] * min(batch, count - start)
            pipeline(prompts, num_inference_steps=steps, height=resolution, width=resolution, output_type="pil")

    return run


def lanskap_runner(pipeline, params: GenerateParams, images: int, out_dir: Path) -> Callable[[int], None]:
    def run(steps: int, count: int = images) -> None:
        jobs = plan_jobs([PROMPT] * count, params)
        generate_images(pipeline, jobs, params.model_copy(update={"steps": steps}), out_dir, "bench")

    return run


def measure(run: Callable, steps: int, batch: int, device: torch.device) -> tuple[float, float | None]:
    """Seconds for run's images after one untimed warm-up batch, and peak GPU memory in GiB (None on CPU)."""
    cuda = device.type == "cuda"
    run(WARMUP_STEPS, batch)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run(steps)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30 if cuda else None


def run_variant(name: str, args, device: torch.device, out_dir: Path) -> tuple[float, float | None]:
    """Load a fresh pipeline for one variant (levers change it in place) and time it."""
    levers = name.split("+")[1:]
    dtype = "bf16" if "bf16" in levers else args.dtype
    if name == "diffusers":
        pipeline = load_plain_diffusers(args.model_dir, inference_dtype(dtype, device), device)
        run = plain_runner(pipeline, args.images, args.batch, args.resolution)
    else:
        params = conf_group(
            "generate",
            scheduler="dpm++",
            steps=args.steps,
            resolution=args.resolution,
            batch_size=args.batch,
            dtype=dtype,
        )
        pipeline = load_pipeline(args.model_dir, params, device)
        apply_levers(pipeline, levers, args.dry_run)
        run = lanskap_runner(pipeline, params, args.images, out_dir / name)
    seconds, peak = measure(run, args.steps, args.batch, device)
    del pipeline, run  # the next variant's peak memory must not include this one's weights or cache
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds, peak


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, nargs="?", help="diffusers folder; built (random SD 2.1-768) if empty")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--resolution", type=int, default=768)
    parser.add_argument("--images", type=int, default=20, help="timed images per variant (after one warm-up batch)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="the anchor's is fp16")
    parser.add_argument(
        "--levers",
        nargs="*",
        default=list(LEVERS),
        help=f"each measured as lanskap+LEVER; join with + to combine. Choices: {', '.join(LEVERS)}",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, builtin:tiny-sd2, 64 px, 2 steps, batch 2, fp32: checks the code paths only",
    )
    args = parser.parse_args(argv)
    for combination in args.levers:
        unknown = set(combination.split("+")) - set(LEVERS)
        if unknown:
            parser.error(
                f"unknown lever(s) {', '.join(sorted(unknown))} in {combination!r}; choose from {', '.join(LEVERS)}"
            )
    if args.dry_run:
        args.model_dir = resolve_base_model("builtin:tiny-sd2", None).path
        args.batch, args.steps, args.resolution, args.images, args.dtype = 2, 2, 64, 2, "fp32"
    elif args.model_dir is None:
        parser.error("MODEL_DIR is required (or --dry-run)")
    elif not torch.cuda.is_available():
        parser.exit(
            2,
            "generate_throughput: no CUDA device visible (torch.cuda.is_available() is False). This "
            "benchmark measures GPU generation: run it on a machine with an NVIDIA GPU and a CUDA "
            "build of torch (bench/README.md), or use --dry-run for a CPU check of the code paths.\n",
        )
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    diffusers.utils.logging.disable_progress_bar()  # the table goes to stdout, progress bars to stderr
    transformers.utils.logging.disable_progress_bar()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not (args.model_dir / "model_index.json").is_file():
        print(f"building a random SD 2.1-768 model in {args.model_dir} ...", flush=True)
        build_random_sd21(args.model_dir)
    variants = ["diffusers", "lanskap", *(f"lanskap+{levers}" for levers in args.levers)]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"{args.images} images per variant, batch {args.batch}, {args.steps} steps, {args.resolution} px, "
        f"{args.dtype} unless a lever says otherwise, {device_name}"
    )
    print(f"{'variant':34s} {'s/image':>8s} {'images/s':>9s} {'peak GiB':>9s} {'vs diffusers':>13s}")
    anchor = None
    with tempfile.TemporaryDirectory(prefix="lanskap-gen-bench-") as out_dir:
        for name in variants:
            seconds, peak = run_variant(name, args, device, Path(out_dir))
            per_image = seconds / args.images
            anchor = anchor or per_image
            peak_text = f"{peak:9.2f}" if peak is not None else f"{'n/a':>9s}"
            print(
                f"{name:34s} {per_image:8.3f} {1 / per_image:9.2f} {peak_text} {per_image / anchor:12.2f}x", flush=True
            )
    if args.dry_run:
        print("dry run: every code path ran on CPU at tiny sizes; the figures mean nothing")


if __name__ == "__main__":
    main()
