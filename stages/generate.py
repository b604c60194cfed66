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


def image_caches(model, lora_dir: Path, params, jobs, device) -> dict:
    """The base and LoRA images' resume caches (lanskap.generate.resume), keyed by what decides their bytes; the
    caches of other runs are removed."""
    import diffusers
    import torch

    from lanskap.core.code_closure import code_digest
    from lanskap.generate.resume import GENERATE_CACHE_ROOT, ImageCache, cache_key, keep_only

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
    keep_only(list(keys.values()))
    return {label: ImageCache(GENERATE_CACHE_ROOT / key) for label, key in keys.items()}


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

    import pandas as pd
    import torch

    from lanskap.core.figures import save_png
    from lanskap.core.io import atomic_dir, remove_dir, write_csv
    from lanskap.data.manifest import read_table
    from lanskap.generate.sampling import (
        batch_probe,
        generate_images,
        load_pipeline,
        native_resolution,
        out_of_memory_hint,
        plan_jobs,
    )
    from lanskap.lora.files import load_lora_into_pipeline, lora_weights_dir
    from lanskap.models.resolve import resolve_base_model
    from lanskap.preflight import generate_bytes, require_batch_fits, require_comparable_fid, require_free_space

    test = read_table(args.data / "test.csv", ["path", "caption"])
    require_comparable_fid(len(test), params.images_per_prompt)  # with LANSKAP_REQUIRE_COMPARABLE_FID=1
    lora_dir = lora_weights_dir(args.lora, params.lora_weights)
    model = resolve_base_model(loaded["model"].base, loaded["model"].revision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = load_pipeline(model.path, params, device)
    jobs = plan_jobs(test["caption"].tolist(), params)
    planned = generate_bytes(
        len(test), params.images_per_prompt, params.resolution or native_resolution(pipeline), min(len(test), GRID_ROWS)
    )
    require_free_space(args.out, planned, "generate", "generate.images_per_prompt, generate.resolution")
    require_batch_fits(
        batch_probe(pipeline, jobs[0].caption, params),
        min(params.batch_size, len(jobs)),
        "generate.batch_size",
        device,
        if_none_fits=out_of_memory_hint(model.path),
    )
    caches = image_caches(model, lora_dir, params, jobs, device)
    with atomic_dir(args.out) as staging:
        base_paths = generate_images(pipeline, jobs, params, staging / "base", "base", caches["base"])
        rows = index_rows(jobs, base_paths, "base", test, args.out, staging)
        load_lora_into_pipeline(pipeline, lora_dir, params.lora_scale)
        rows += index_rows(
            jobs,
            generate_images(pipeline, jobs, params, staging / "lora", "lora", caches["lora"]),
            "lora",
            test,
            args.out,
            staging,
            params.lora_weights,
        )
        index = pd.DataFrame(rows)
        write_csv(staging / "index.csv", index)
        with atomic_dir(args.reports) as reports:
            save_png(comparison_grid(index, staging, args.out), reports / "comparison.png")
    for cache in caches.values():  # the outputs are published: a forced rerun must draw again
        remove_dir(cache.folder)
    print(
        f"generate: {len(jobs)} base + {len(jobs)} LoRA images ({params.lora_weights} LoRA weights, "
        f"{params.scheduler}, {params.steps} steps, guidance {params.guidance_scale}, LoRA scale {params.lora_scale})"
        f" -> {args.out}; grid -> {args.reports}"
    )


if __name__ == "__main__":
    run_stage(main)
