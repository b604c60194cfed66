"""The base model's sample grid for its card: held-out captions of both worlds, the drawn image beside the
generated one, through the pipeline loader generate uses."""

from pathlib import Path

from PIL import Image

from lanskap.core.figures import image_grid, save_png
from lanskap.core.params import GenerateParams

PROMPTS_PER_WORLD = 4
# The builder's own sampling settings, not the pipeline's (conf/): the card's grid must not change with the demo
SAMPLING = {
    "scheduler": "dpm++",
    "steps": 20,
    "guidance_scale": 7.5,
    "negative_prompt": "",
    "images_per_prompt": 1,
    "resolution": None,
    "batch_size": 4,
    "lora_scale": 1.0,
    "lora_weights": "raw",
    "dtype": "auto",
    "seed": 0,
}


def sample_grid(model_dir: Path, data, path: Path) -> None:
    import torch

    from lanskap.generate.sampling import load_pipeline, sample

    params = GenerateParams(**SAMPLING)
    pipeline = load_pipeline(model_dir, params, torch.device("cpu"))
    rows = []
    for world in ("base", "fantasy"):
        held_out = data.held_out[world].take(PROMPTS_PER_WORLD)
        generated = sample(
            pipeline,
            held_out.captions,
            list(range(len(held_out))),
            params,
            pipeline.unet.config.sample_size * pipeline.vae_scale_factor,
            params.steps,
        )
        rows += [[Image.fromarray(pixels), image] for pixels, image in zip(held_out.pixels, generated)]
    save_png(image_grid(rows, ["drawn (held out)", "generated"], cell=96), path)
