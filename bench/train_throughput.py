"""Training throughput of lanskap's own LoRA step on a model folder (the full SD 2.1-768 architecture with random
weights: speed and memory depend on shapes, not values).

Each step is the one `train_lora` runs: augmented images from disk (the paper's transform), VAE encoding, the
diffusion loss against the scheduler's target, backward into fp32 LoRA parameters, clipping, AdamW; bf16
autocast. Prints images/s, peak GPU memory and achieved TFLOP/s (5.2 TFLOP per 768 px image forward + backward,
from reference/anchors.md, scaled by pixel count at other sizes), per batch size; with `--tight-loop`, runs
shared/bench/tight_loop.py (UNet only, cached inputs) with the same levers and prints the ratio.

    python bench/train_throughput.py /tmp/sd21-random --batch-sizes 1 4 16 --tight-loop ../shared/bench/tight_loop.py
    python bench/train_throughput.py --build ../shared/bench /tmp/sd21-random     # build the model folder first
    python bench/train_throughput.py --dry-run                                    # CPU, built-in tiny model
    python bench/train_throughput.py --cpu-demo --batch-sizes 4 --images 80 --cached-latents 4   # cached vs not, CPU
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from lanskap.core.params import conf_group
from lanskap.train.batches import BatchShare, pixel_batches, training_batches
from lanskap.train.loop import cached_batches
from lanskap.train.optimizers import make_optimizer
from lanskap.train.setup import Components, Trainer, attach_adapters, load_components
from lanskap.train.step import CaptionEncoder, accumulate_gradients, optimizer_step

TFLOP_PER_IMAGE_768 = 5.2  # UNet forward + backward of one 768 px image (anchors.md)
DATASET_IMAGES = 32


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, help="diffusers folder (e.g. from make_random_sd21.py)")
    parser.add_argument(
        "--build",
        type=Path,
        metavar="SHARED_BENCH_DIR",
        help="first build MODEL with SHARED_BENCH_DIR/make_random_sd21.py and its tokenizer/",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--resolution", type=int, default=768)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per batch size")
    parser.add_argument(
        "--weight-dtype",
        choices=["bf16", "fp32"],
        default="bf16",
        help="frozen weights' dtype under bf16 autocast (train_lora uses bf16)",
    )
    parser.add_argument("--regional-compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--channels-last", action="store_true", help="UNet and VAE in channels-last memory format")
    parser.add_argument("--fused-adamw", action="store_true", help="single-kernel AdamW")
    parser.add_argument("--workers", type=int, default=4, help="train.dataloader_workers (the paper preset's 4)")
    parser.add_argument("--tight-loop", type=Path, help="path to shared/bench/tight_loop.py, run for ratios")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="exercise the code path on CPU with the built-in tiny model at 64 px, 2 steps",
    )
    parser.add_argument(
        "--cpu-demo",
        action="store_true",
        help="the demo's training on CPU: built-in tiny model, 64 px, fp32, no workers, 1 thread",
    )
    parser.add_argument(
        "--cached-latents",
        type=int,
        default=0,
        metavar="K",
        help="also time train.cached_latents: K against on-the-fly encoding, in alternating rounds",
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of --steps steps (--cached-latents)")
    parser.add_argument("--images", type=int, default=DATASET_IMAGES, help="training images (the demo has 80)")
    return parser.parse_args(argv)


def write_images(folder: Path, resolution: int, count: int) -> list[str]:
    """Canonical training images as preprocess writes them (square RGB PNG at the training size)."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        paths.append(str(folder / f"{index:03d}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


def prepare_unet(parts: Components, args) -> tuple[dict, list[dict]]:
    """Attach the project's LoRA and apply the requested levers; return the named LoRA parameters and the
    optimizer's parameter groups."""
    lora_parameters, groups = attach_adapters(parts, conf_group("lora"), conf_group("train", mixed_precision="bf16"))
    if args.channels_last:
        parts.unet.to(memory_format=torch.channels_last)
        parts.vae.to(memory_format=torch.channels_last)
    if args.regional_compile:
        from diffusers.models.attention import BasicTransformerBlock

        for module in parts.unet.modules():
            if isinstance(module, BasicTransformerBlock):
                module.compile()
    return lora_parameters, groups


def step_function(
    parts, lora_parameters: dict, groups: list[dict], paths, batch_size: int, args, accelerator, cached_latents: int = 0
):
    """train_lora's step at `batch_size` as a function of no arguments, its data augmented and encoded on the fly or
    (cached_latents > 0) looked up in a latent cache built here as train_lora builds it."""
    params = conf_group(
        "train",
        batch_size=batch_size,
        steps=10_000,
        mixed_precision=args.mixed_precision,
        dataloader_workers=args.workers,
        cached_latents=cached_latents,
    )
    optimizer, lr_scheduler = make_optimizer(groups, params, fused=args.fused_adamw or None)
    trainer = Trainer(parts, parts, lora_parameters, BatchShare(batch_size), accelerator)
    table = pd.DataFrame(
        {
            "path": paths,
            "caption": "a fantasy landscape",
            "bucket_width": args.resolution,
            "bucket_height": args.resolution,
        }
    )
    dataset, keys, captions = training_batches(table, conf_group("augment"), params, trainer.share, 0)
    batches = cached_batches(dataset, keys, trainer, params) if cached_latents else pixel_batches(dataset, keys, params)
    caption_encoder = CaptionEncoder(captions, parts, accelerator.device, text_encoder_trains=False)
    steps_done = 0

    def step():
        nonlocal steps_done
        accumulate_gradients(trainer, batches, caption_encoder, params, first_micro_batch=steps_done)
        optimizer_step(accelerator, list(lora_parameters.values()), optimizer, lr_scheduler, params.max_grad_norm)
        steps_done += 1

    return step


def seconds_per_step(step, count: int) -> float:
    synchronize()
    start = time.perf_counter()
    for _ in range(count):
        step()
    synchronize()
    return (time.perf_counter() - start) / count


def measure(parts, lora_parameters: dict, groups: list[dict], paths, batch_size: int, args, accelerator) -> dict:
    """Seconds per step of train_lora's step at `batch_size`, after warm-up steps (more when compiling)."""
    step = step_function(parts, lora_parameters, groups, paths, batch_size, args, accelerator)
    for _ in range(5 if args.regional_compile else 2):
        step()
    seconds = seconds_per_step(step, args.steps)
    images_per_second = batch_size / seconds
    tflop_per_image = TFLOP_PER_IMAGE_768 * (args.resolution / 768) ** 2
    return {
        "batch": batch_size,
        "s_per_step": seconds,
        "images_per_second": images_per_second,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
        "tflop_per_s": images_per_second * tflop_per_image,
    }


def compare_cached(parts, lora_parameters: dict, groups: list[dict], paths, batch_size: int, args, accelerator) -> str:
    """Step time with train.cached_latents against on the fly, in alternating rounds of args.steps steps each
    (so both share the machine's load); the cache's one-off build counted in on-the-fly steps."""
    on_the_fly = step_function(parts, lora_parameters, groups, paths, batch_size, args, accelerator)
    start = time.perf_counter()
    cached = step_function(parts, lora_parameters, groups, paths, batch_size, args, accelerator, args.cached_latents)
    build_seconds = time.perf_counter() - start
    for step in (on_the_fly, cached):
        step()  # warm-up
    rounds = [
        (seconds_per_step(on_the_fly, args.steps), seconds_per_step(cached, args.steps)) for _ in range(args.rounds)
    ]
    ratios = [cached_seconds / fly_seconds for fly_seconds, cached_seconds in rounds]
    fly_median = float(np.median([fly_seconds for fly_seconds, _ in rounds]))
    return (
        f"CACHED bs={batch_size} K={args.cached_latents} images={len(paths)} step_time_ratio(cached/on_the_fly)="
        f"{np.median(ratios):.3f} per_round={[round(ratio, 3) for ratio in ratios]} "
        f"cache_build=on_the_fly_steps x {build_seconds / fly_median:.1f}"
    )


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tight_loop_images_per_second(script: Path, model: Path, batch_size: int, args) -> float:
    """The UNet-only reference with the same levers, from tight_loop.py's printed line."""
    flags = [
        flag
        for flag, on in [
            ("bf16w", args.weight_dtype == "bf16"),
            ("regional", args.regional_compile),
            ("channels_last", args.channels_last),
        ]
        if on
    ]
    output = subprocess.run(
        [sys.executable, str(script), str(model), str(batch_size), str(args.resolution), *flags],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(re.search(r"img/s=([\d.]+)", output).group(1))


def resolve_model(args) -> Path:
    if args.dry_run or args.cpu_demo:
        from lanskap.models.resolve import BUILTIN_TINY_SD2, resolve_base_model

        return resolve_base_model(BUILTIN_TINY_SD2, None).path
    if args.model is None:
        sys.exit("train_throughput: give a model folder (or --dry-run)")
    if args.build:
        subprocess.run(
            [sys.executable, str(args.build / "make_random_sd21.py"), str(args.model), str(args.build / "tokenizer")],
            check=True,
        )
    return args.model


def main(argv=None):
    args = parse_args(argv)
    args.mixed_precision = "bf16"
    if args.dry_run:
        if args.tight_loop:
            sys.exit("train_throughput: --tight-loop needs a CUDA GPU; leave it out of --dry-run")
        args.resolution, args.steps, args.batch_sizes, args.rounds = 64, 2, [1, 2], 1
    elif args.cpu_demo:  # ratios only: absolute CPU times depend on the machine and its load
        args.resolution, args.weight_dtype, args.mixed_precision, args.workers = 64, "fp32", "no", 0
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        sys.exit(
            "train_throughput: needs a CUDA GPU (figures on CPU mean nothing); --dry-run checks the code on CPU, "
            "--cpu-demo times the demo's step on CPU"
        )
    from accelerate import Accelerator

    model = resolve_model(args)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu_demo)
    weight_dtype = torch.bfloat16 if args.weight_dtype == "bf16" else torch.float32
    parts = load_components(model, weight_dtype, accelerator.device)
    lora_parameters, groups = prepare_unet(parts, args)
    print(
        f"train_throughput: {model} at {args.resolution} px, weights {args.weight_dtype}, regional_compile="
        f"{args.regional_compile}, channels_last={args.channels_last}, fused_adamw={args.fused_adamw}, "
        f"workers={args.workers}, {accelerator.device}"
    )
    with tempfile.TemporaryDirectory() as folder:
        paths = write_images(Path(folder), args.resolution, max(args.images, 2 * max(args.batch_sizes)))
        for batch_size in args.batch_sizes:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            row = measure(parts, lora_parameters, groups, paths, batch_size, args, accelerator)
            line = (
                f"TRAIN bs={row['batch']} s/step={row['s_per_step']:.4f} img/s={row['images_per_second']:.2f} "
                f"peak_GiB={row['peak_gib']:.2f} TFLOP/s={row['tflop_per_s']:.1f}"
            )
            if args.tight_loop:
                tight = tight_loop_images_per_second(args.tight_loop, model, batch_size, args)
                line += f" tight_loop_img/s={tight:.2f} ratio={row['images_per_second'] / tight:.2f}"
            print(line, flush=True)
            if args.cached_latents:
                print(compare_cached(parts, lora_parameters, groups, paths, batch_size, args, accelerator), flush=True)


if __name__ == "__main__":
    main()
