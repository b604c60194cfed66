"""Can the base model draw floating islands at all? The ceiling on what any LoRA on it can show.

    python bench/base_model_ceiling.py [--init shipped|scratch] [--steps 1500] [--channels 32,64] [--grid PATH]

Trains every parameter of a tiny-sd2 UNet and its text encoder on the builder's 2,000 fantasy-world images (seed
1000; the demo's LoRA sees 80), through the built-in VAE, with the builder's v-prediction loss, optimiser and
batch size: `--init shipped` starts from the shipped base model (a full fine-tune, which every LoRA of the demo is
a restriction of), `--init scratch` from random weights (`--channels` widens the UNet; the default is the shipped
width). Then it draws the 150 held-out fantasy captions (seed 9000) with the builder's sample-grid settings, through
the loader generate uses, and asks the tiny-inception islands head whether each image shows floating islands:
where the caption asks for them and where it does not, beside the same on the held-out originals and on their VAE
round trips (the most a perfect UNet could show through this VAE). `--steps 0` scores the shipped base itself.
CPU, one thread: about 11 min at 1500 steps at the shipped width, 30 min at 64,128.
"""

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lanskap.core.determinism import pin_cpu_math  # noqa: E402

pin_cpu_math()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from vae_round_trip import islands_found, round_trip  # noqa: E402

from lanskap.builtin import builtin_folder  # noqa: E402
from lanskap.builtin.config import FULL, HELD_OUT_SEED, TINY_SD2, TRAIN_SEED  # noqa: E402
from lanskap.builtin.diffusion import encode_latents, v_prediction_loss  # noqa: E402
from lanskap.builtin.heads import load_scene_heads  # noqa: E402
from lanskap.builtin.samples import SAMPLING  # noqa: E402
from lanskap.builtin.training import LossLog, batch_indices, optimizer_and_schedule, train_loop  # noqa: E402
from lanskap.builtin.worlds import WorldImages, render_world  # noqa: E402
from lanskap.core.figures import image_grid, save_png  # noqa: E402
from lanskap.core.params import GenerateParams  # noqa: E402
from lanskap.evaluate.features import BUILTIN_TINY_INCEPTION, load_tiny_inception  # noqa: E402
from lanskap.train.step import tokenize  # noqa: E402

SHIPPED = ROOT / "lanskap/assets/builtin/tiny-sd2"


def starting_models(init: str, channels: tuple[int, ...]):
    """(unet, text_encoder) in float32: the shipped base model's, or new ones of the builder's architecture."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if init == "shipped":
        unet = UNet2DConditionModel.from_pretrained(SHIPPED / "unet", torch_dtype=torch.float32)
        return unet, CLIPTextModel.from_pretrained(SHIPPED / "text_encoder", torch_dtype=torch.float32)
    torch.manual_seed(FULL.seed)
    # attention_head_dim is diffusers' legacy name for the number of heads: 16 channels per head, as shipped
    heads = tuple(width // 16 for width in channels)
    unet = UNet2DConditionModel(**(TINY_SD2["unet"] | {"block_out_channels": channels, "attention_head_dim": heads}))
    return unet, CLIPTextModel(CLIPTextConfig(**TINY_SD2["text_encoder"]))


def train_all_parameters(unet, text_encoder, vae, tokenizer, images: WorldImages, steps: int) -> float:
    """The builder's text-to-image objective on `images`, every parameter trained; returns the seconds taken."""
    from diffusers import DDPMScheduler

    training = replace(FULL.unet, steps=steps)
    noise_scheduler = DDPMScheduler(**TINY_SD2["scheduler"])
    means, stds = encode_latents(vae, images)  # [n, 4, 16, 16] each, unscaled
    token_ids = tokenize([*images.captions, ""], tokenizer)  # the last row: the empty caption
    both = torch.nn.ModuleDict({"unet": unet.train(), "text_encoder": text_encoder.train()})
    optimizer, schedule = optimizer_and_schedule(both.parameters(), training, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(FULL.seed)
    batches = batch_indices(len(images), training.batch_size, generator)

    def step_loss(step: int) -> torch.Tensor:
        rows = next(batches)
        sampled = means[rows] + stds[rows] * torch.randn(means[rows].shape, generator=generator)
        latents = sampled * vae.config.scaling_factor
        dropped = torch.rand(len(rows), generator=generator) < FULL.caption_dropout
        ids = token_ids[torch.where(dropped, len(images), rows)]
        return v_prediction_loss(unet, text_encoder, noise_scheduler, latents, ids, generator)

    seconds = train_loop(training, both, optimizer, schedule, step_loss, lambda: float("nan"), LossLog(), "train")
    unet.eval(), text_encoder.eval()
    return seconds


def generated_images(unet, text_encoder, vae, tokenizer, captions: list[str]) -> np.ndarray:
    """The captions drawn as the builder's sample grid draws them (uint8 [n, 64, 64, 3]), seed i for caption i."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from lanskap.generate.sampling import load_pipeline, native_resolution, sample

    params = GenerateParams(**(SAMPLING | {"batch_size": 25}))
    with tempfile.TemporaryDirectory() as folder:
        StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=DDPMScheduler(**TINY_SD2["scheduler"]),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ).save_pretrained(folder)
        pipeline = load_pipeline(Path(folder), params, torch.device("cpu"))
        images = []
        for start in range(0, len(captions), params.batch_size):
            batch = captions[start : start + params.batch_size]
            seeds = list(range(start, start + len(batch)))
            images += sample(pipeline, batch, seeds, params, native_resolution(pipeline), params.steps)
    return np.stack([np.asarray(image) for image in images])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", choices=("shipped", "scratch"), default="shipped")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--channels", default="32,64", help="UNet block widths for --init scratch")
    parser.add_argument("--grid", type=Path, help="write the first 8 captions' original | generated grid here")
    args = parser.parse_args()
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    torch.set_num_threads(1)
    channels = tuple(int(width) for width in args.channels.split(","))
    if args.init == "shipped" and channels != tuple(TINY_SD2["unet"]["block_out_channels"]):
        parser.error("--channels applies to --init scratch only: the shipped UNet has its own width")
    vae = AutoencoderKL.from_pretrained(SHIPPED / "vae", torch_dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(SHIPPED / "tokenizer")
    unet, text_encoder = starting_models(args.init, channels)
    held_out = render_world("fantasy", FULL.held_out_images, HELD_OUT_SEED, FULL.render_size, FULL.resolution)
    seconds = 0.0
    if args.steps:  # the training pool is drawn only when there is training to do
        fantasy = render_world("fantasy", FULL.fantasy_images, TRAIN_SEED, FULL.render_size, FULL.resolution)
        seconds = train_all_parameters(unet, text_encoder, vae, tokenizer, fantasy, args.steps)
    generated = generated_images(unet, text_encoder, vae, tokenizer, held_out.captions)

    asked = np.array([scene.has_islands for scene in held_out.scenes])
    folder = builtin_folder(BUILTIN_TINY_INCEPTION, "evaluate.inception_weights")
    network, heads = load_tiny_inception(folder).eval(), load_scene_heads(folder)
    unet_parameters = sum(parameter.numel() for parameter in unet.parameters()) / 1e6
    print(
        f"{args.init} UNet ({unet_parameters:.2f} M parameters, channels {channels}), {args.steps} steps of "
        f"{FULL.unet.batch_size} on {FULL.fantasy_images} fantasy images: {seconds / 60:.1f} min"
    )
    print(f"islands head, {asked.sum()} of {len(asked)} held-out captions asking for islands:")
    for name, pixels in (
        ("originals", held_out.pixels),
        ("VAE round trips", round_trip(vae, held_out.pixels)[0]),
        ("generated", generated),
    ):
        found = islands_found(network, heads, WorldImages(pixels, held_out.captions, held_out.scenes))
        print(f"  {name:16s} found where asked {found[asked].mean():.3f}, where not asked {found[~asked].mean():.3f}")
    if args.grid:
        from PIL import Image

        rows = [[Image.fromarray(a), Image.fromarray(b)] for a, b in zip(held_out.pixels[:8], generated[:8])]
        save_png(image_grid(rows, ["drawn (held out)", "generated"], cell=96), args.grid)


if __name__ == "__main__":
    main()
