"""generate: images for every test caption from the base model and from base + LoRA, paired by seed.

Inputs:  PROCESSED/test.csv (captions and reference images), LORA/pytorch_lora_weights.safetensors (LoRA) or
         LORA/peft_adapter_weights.safetensors (LoHa, LoKr), or the same under LORA/ema/ with
         generate.lora_weights: ema; refused unless every module it records as trained is restored on loading
Outputs: OUT/base/*.png, OUT/lora/*.png  one image per (caption, sample), same seed per pair; a killed run resumes
                                         from .lanskap-cache/generate/ (lanskap/generate/resume.py)
         OUT/index.csv                   prompt_index, sample, caption, seed, model, path, reference_path,
                                         lora_weights (raw or ema on LoRA rows, none on base rows)
         REPORTS/comparison.png          reference | base | LoRA per test caption (the paper's Figures 6-7)
Params:  model, generate

Several GPUs or machines: `accelerate launch --multi_gpu --num_processes N -m stages.generate ...` (same arguments).
The batches of the global job order are shared out among the processes, so the outputs are byte-identical for any
N (lanskap/generate/shards.py); the main process writes them, the others only their batches into the resume cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from lanskap.core.errors import run_stage

if TYPE_CHECKING:  # the libraries load where the work starts, so that --help is instant
    import pandas as pd
    from PIL import Image

GRID_ROWS = 10  # captions shown in the git-tracked comparison grid


def index_rows(
    jobs, paths, model: str, test: pd.DataFrame, out: Path, staging: Path, lora_weights: str = "none"
) -> list[dict]:
    return [
        {
            "prompt_index": job.prompt_index,
            "sample": job.sample,
            "caption": job.caption,
            "seed": job.seed,
            "model": model,
            "path": (out / path.relative_to(staging)).as_posix(),
            "reference_path": test["path"][job.prompt_index],
            "lora_weights": lora_weights,
        }
        for job, path in zip(jobs, paths)
    ]


def comparison_grid(index: pd.DataFrame, staging: Path, out: Path) -> Image.Image:
    """The first GRID_ROWS test captions, each in full beside its reference image and the first base and LoRA
    samples (same seed)."""
    from PIL import Image

    from lanskap.core.figures import image_grid

    first = index[(index["sample"] == 0) & (index["prompt_index"] < GRID_ROWS)]
    rows, prompts = [], []
    for _prompt_index, pair in first.groupby("prompt_index"):
        by_model = pair.set_index("model")["path"]
        local = {m: staging / Path(p).relative_to(out) for m, p in by_model.items()}
        rows.append([Image.open(pair["reference_path"].iloc[0]), Image.open(local["base"]), Image.open(local["lora"])])
        prompts.append(pair["caption"].iloc[0])
    return image_grid(rows, ["reference", "base", "LoRA"], row_labels=prompts, row_header="prompt (test caption)")


def image_caches(model, lora_dir: Path, params, jobs, device, processes) -> dict:
    """The base and LoRA images' resume caches (lanskap.generate.resume), keyed by what decides their bytes, the same
    on every process (refused otherwise); the main process removes the caches of other runs first."""
    import diffusers
    import torch

    from lanskap.core.code_closure import code_digest
    from lanskap.generate.resume import GENERATE_CACHE_ROOT, ImageCache, cache_key, keep_only
    from lanskap.generate.shards import agree

    common = [
        model.spec,
        model.revision,
        code_digest("stages.generate"),
        params.model_dump(mode="json", exclude={"lora_scale", "lora_weights"}),
        [[job.caption, job.seed] for job in jobs],
        device.type,
        torch.__version__,
        diffusers.__version__,
    ]
    keys = {
        "base": cache_key(["base", *common], None),
        "lora": cache_key(["lora", *common, params.lora_scale, params.lora_weights], lora_dir),
    }
    keys = agree(keys, processes, "what decides the images (code, data, params, LoRA files, torch or diffusers)")
    if processes.main:
        keep_only(list(keys.values()))
    processes.broadcast(None)  # a barrier: no process creates its cache folder before the old ones are gone
    return {label: ImageCache(GENERATE_CACHE_ROOT / key) for label, key in keys.items()}


def check_resources(args, pipeline, jobs, test, params, model, device, processes) -> None:
    """Fail early: the disk holds the outputs (checked by the main process, which writes them), and a batch fits
    this process's device."""
    from lanskap.generate.sampling import batch_probe, native_resolution, out_of_memory_hint
    from lanskap.preflight import generate_bytes, require_batch_fits, require_free_space

    if processes.main:
        resolution = params.resolution or native_resolution(pipeline)
        planned = generate_bytes(len(test), params.images_per_prompt, resolution, min(len(test), GRID_ROWS))
        require_free_space(args.out, planned, "generate", "generate.images_per_prompt, generate.resolution")
    require_batch_fits(
        batch_probe(pipeline, jobs[0].caption, params),
        min(params.batch_size, len(jobs)),
        "generate.batch_size",
        device,
        if_none_fits=out_of_memory_hint(model.path),
    )


def draw_both(pipeline, jobs, params, lora_dir: Path, caches: dict, staging: Path | None, processes) -> dict:
    """The base images, then the LoRA's, on every process; their paths in job order on the main process (which
    writes them under `staging`), [] elsewhere. One progress line for both, counting every process's images."""
    from lanskap.generate.sampling import generate_images, image_bar
    from lanskap.lora.files import load_lora_into_pipeline

    paths = {}
    with image_bar(2 * len(jobs), "generate", processes.main) as bar:
        for label in ("base", "lora"):
            if label == "lora":
                load_lora_into_pipeline(pipeline, lora_dir, params.lora_scale)
            bar.set_postfix(model=label)
            out = staging / label if staging else None
            paths[label] = generate_images(pipeline, jobs, params, out, label, caches[label], processes, bar)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--lora", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reports", type=Path, required=True)
    args = parser.parse_args(argv)
    from lanskap.core.console import quiet_libraries  # here, not above: --help needs none of them
    from lanskap.core.params import load_params

    loaded = load_params("model", "generate")
    params = loaded["generate"]
    quiet_libraries()

    import torch

    from lanskap.core.determinism import use_threads_for_device
    from lanskap.data.manifest import read_table
    from lanskap.generate.sampling import load_pipeline, plan_jobs
    from lanskap.generate.shards import batches, process_state, require_splittable
    from lanskap.lora.files import lora_weights_dir
    from lanskap.preflight import require_comparable_fid

    processes = process_state()
    test = read_table(args.data / "test.csv", ["path", "caption"])
    require_comparable_fid(len(test), params.images_per_prompt)  # with LANSKAP_REQUIRE_COMPARABLE_FID=1
    jobs = plan_jobs(test["caption"].tolist(), params)
    require_splittable(len(batches(jobs, params.batch_size)), processes)
    lora_dir = lora_weights_dir(args.lora, params.lora_weights)
    model = resolve_model(loaded["model"], processes)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    use_threads_for_device(device.type)  # CPU: the pinned thread; CUDA: the cores, for encoding and loading
    pipeline = load_pipeline(model.path, params, device)
    check_resources(args, pipeline, jobs, test, params, model, device, processes)
    caches = image_caches(model, lora_dir, params, jobs, device, processes)
    if not processes.main:  # another of `accelerate launch`'s processes: draws its batches, writes only the cache
        draw_both(pipeline, jobs, params, lora_dir, caches, None, processes)
    else:
        publish(
            args,
            test,
            jobs,
            params,
            lambda staging: draw_both(pipeline, jobs, params, lora_dir, caches, staging, processes),
        )
    processes.broadcast(None)  # a barrier: the caches go only once the outputs are published
    remove_caches(caches)
    if not processes.main:
        return
    print(
        f"generate: {len(jobs)} base + {len(jobs)} LoRA images ({params.lora_weights} LoRA weights, "
        f"{params.scheduler}, {params.steps} steps, guidance {params.guidance_scale}, LoRA scale {params.lora_scale}"
        f"; {processes.count} process{'es' if processes.count > 1 else ''}) -> {args.out}; grid -> {args.reports}"
    )


def remove_caches(caches: dict) -> None:
    """The outputs are published: a forced rerun must draw again. Every process removes the caches, as a machine
    without a shared filesystem has its own (ImageCache.discard: where they share one, the first removal wins)."""
    for cache in caches.values():
        cache.discard()


def resolve_model(model_params, processes):
    """The base model's folder: the main process downloads or builds it first, the others then read it."""
    from lanskap.models.resolve import resolve_base_model

    model = resolve_base_model(model_params.base, model_params.revision) if processes.main else None
    processes.broadcast(None)  # a barrier
    return model or resolve_base_model(model_params.base, model_params.revision)


def publish(args, test, jobs, params, draw) -> None:
    """The main process's part: the images drawn by `draw(staging)`, the index and the comparison grid, each
    output folder swapped in only when complete."""
    import pandas as pd

    from lanskap.core.figures import save_png
    from lanskap.core.io import atomic_dir, write_csv

    with atomic_dir(args.out) as staging:
        paths = draw(staging)
        rows = index_rows(jobs, paths["base"], "base", test, args.out, staging)
        rows += index_rows(jobs, paths["lora"], "lora", test, args.out, staging, params.lora_weights)
        index = pd.DataFrame(rows)
        write_csv(staging / "index.csv", index)
        with atomic_dir(args.reports) as reports:
            save_png(comparison_grid(index, staging, args.out), reports / "comparison.png")


if __name__ == "__main__":
    run_stage(main)
