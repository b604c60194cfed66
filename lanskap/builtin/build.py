"""Build the built-in models and write them, with their cards, where `builtin:` names resolve.

    python -m lanskap.builtin [tiny-sd2] [tiny-clip] [tiny-inception] [--out DIR] [--miniature] [--threads N]

Each model is trained from scratch on procedural data (lanskap/builtin/config.py says how much), saved in fp16
with `save_pretrained` (or safetensors for the Inception stand-in) into a staging folder, checked by loading it
back through the code evaluate and generate use, and renamed into place only when complete. Drawn images and
the trained VAE are kept in a work folder (.lanskap-cache/builtin-build/), keyed by the digest of the code that
made them (lanskap/builtin/sources.py), so a build stopped after the VAE resumes from it and changed code never
reuses them.
"""

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch

from lanskap.builtin import BUILTIN_FOLDERS, builtin_assets
from lanskap.builtin.card import Card, parameter_count
from lanskap.builtin.config import FULL, HELD_OUT_SEED, MINIATURE, TRAIN_SEED, BuildConfig
from lanskap.builtin.sources import model_digest
from lanskap.builtin.training import LossLog
from lanskap.builtin.worlds import WorldImages, cached_world
from lanskap.core.io import atomic_dir

WORK = Path(".lanskap-cache/builtin-build")
WORLDS = ("base", "fantasy")


class Data:
    """The drawn images: training pools per world and held-out images per world, drawn once and cached."""

    def __init__(self, config: BuildConfig, work: Path):
        counts = {"base": config.base_images, "fantasy": config.fantasy_images}
        self.pools = {
            world: cached_world(work, world, counts[world], TRAIN_SEED, config.render_size, config.resolution)
            for world in WORLDS
        }
        self.held_out = {
            world: cached_world(
                work, world, config.held_out_images, HELD_OUT_SEED, config.render_size, config.resolution
            )
            for world in WORLDS
        }

    def both_worlds(self, per_world: int) -> WorldImages:
        return WorldImages.concat([self.pools[world].take(per_world) for world in WORLDS])

    def held_out_both(self) -> WorldImages:
        return WorldImages.concat([self.held_out[world] for world in WORLDS])

    def held_out_pngs(self, work: Path) -> list[Path]:
        """The held-out images of both worlds as PNG files, for the embedders, which read files as evaluate does."""
        from PIL import Image

        folder = work / "held-out-png"
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{index:05d}.png" for index in range(len(self.held_out_both()))]
        for path, pixels in zip(paths, self.held_out_both().pixels):
            Image.fromarray(pixels).save(path)
        return paths


def write_clip_tokenizer(folder: Path) -> None:
    """The shipped CLIP vocabulary and merges, which load as the same tokenizer at under half the size of the
    tokenizer.json that save_pretrained writes."""
    from lanskap.models.resolve import clip_tokenizer_dir

    for stale in folder.glob("tokenizer*.json"):
        stale.unlink()
    for source in clip_tokenizer_dir().iterdir():
        shutil.copyfile(source, folder / source.name)


def trained_vae(config: BuildConfig, data: Data, work: Path):
    """The VAE from the work folder when this config and tiny-sd2's code trained one before, else trained now and
    kept there."""
    from diffusers import AutoencoderKL

    from lanskap.builtin.vae import train_vae

    key = json.dumps(config.as_dict(), sort_keys=True) + model_digest("tiny-sd2")
    key = hashlib.sha256(key.encode()).hexdigest()[:12]
    folder = work / f"vae-{key}"
    if (folder / "build.json").is_file():
        saved = json.loads((folder / "build.json").read_text())
        return AutoencoderKL.from_pretrained(folder), LossLog([tuple(row) for row in saved["log"]]), saved["seconds"]
    log = LossLog()
    vae, seconds = train_vae(config, data.both_worlds(config.vae_images_per_world), data.held_out_both(), log)
    with atomic_dir(folder) as staging:
        vae.save_pretrained(staging)
        (staging / "build.json").write_text(json.dumps({"log": log.rows, "seconds": seconds}))
    return vae, log, seconds


def build_tiny_sd2(config: BuildConfig, data: Data, out: Path, work: Path, threads: int) -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from lanskap.builtin.diffusion import train_text_to_image
    from lanskap.builtin.samples import sample_grid
    from lanskap.models.resolve import clip_tokenizer_dir

    vae, vae_log, vae_seconds = trained_vae(config, data, work)
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir(), model_max_length=77)
    unet_log = LossLog()
    unet, text_encoder, noise_scheduler, unet_seconds = train_text_to_image(
        config, vae, tokenizer, data.pools["base"], data.held_out["base"], unet_log
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    card = Card(
        "builtin:tiny-sd2",
        f"A tiny text-to-image model of the SD 2.x family ({parameter_count(unet) / 1e6:.2f} M-parameter UNet with "
        f"linear projections and cross-attention, {parameter_count(vae) / 1e6:.2f} M-parameter VAE with 1/4-side "
        f"latents, {parameter_count(text_encoder) / 1e6:.2f} M-parameter CLIP text encoder with the real CLIP "
        "tokenizer, SD 2.1-768's v-prediction schedule), pretrained on the procedural base world at "
        f"{config.resolution} px. `samples.png`: held-out captions of both worlds, drawn image beside generated.",
        [
            f"VAE: {config.vae_images_per_world} images of each world (seed {TRAIN_SEED}), random "
            f"{config.vae_crop} px crops with horizontal flips",
            f"UNet and text encoder: {config.base_images} base-world images and captions (seed {TRAIN_SEED}), "
            f"latents cached; {config.caption_dropout:.0%} of captions dropped for classifier-free guidance; never "
            "a fantasy-world image or caption",
            f"held out: {config.held_out_images} images of each world (seed {HELD_OUT_SEED})",
        ],
        [
            f"VAE: {config.vae.steps} steps of {config.vae.batch_size}, AdamW at {config.vae.learning_rate} with "
            f"warmup and cosine decay; L1 + {config.vae_kl_weight} x KL; scaling_factor "
            f"{vae.config.scaling_factor} (unit-variance latents)",
            f"UNet + text encoder: {config.unet.steps} steps of {config.unet.batch_size}, AdamW at "
            f"{config.unet.learning_rate} with warmup and cosine decay, v-prediction MSE",
        ],
        {
            "VAE held-out L1": vae_log.last("held_out_loss"),
            "VAE held-out PSNR (dB)": vae_log.last("held_out_psnr_db"),
            "UNet final training loss": unet_log.last("train_loss"),
            "UNet held-out loss (base world)": unet_log.last("held_out_loss"),
        },
        vae_seconds + unet_seconds,
    )
    with atomic_dir(out / BUILTIN_FOLDERS["builtin:tiny-sd2"]) as staging:
        pipeline.to(torch.float16).save_pretrained(staging, safe_serialization=True)
        write_clip_tokenizer(staging / "tokenizer")
        sample_grid(staging, data, staging / "samples.png")  # loaded back as generate loads it
        card.write(staging, LossLog(vae_log.prefixed("vae_").rows + unet_log.prefixed("unet_").rows), threads)


def build_tiny_clip(config: BuildConfig, data: Data, out: Path, work: Path, threads: int) -> None:
    from transformers import CLIPTokenizer

    from lanskap.builtin.clip import retrieval_accuracy, train_clip
    from lanskap.evaluate.features import CLIP_CONTEXT_LENGTH, ClipEmbedder
    from lanskap.models.resolve import clip_tokenizer_dir

    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir(), model_max_length=CLIP_CONTEXT_LENGTH)
    log = LossLog()
    model, seconds = train_clip(
        config, tokenizer, data.both_worlds(config.clip_images_per_world), data.held_out_both(), log
    )
    with atomic_dir(out / BUILTIN_FOLDERS["builtin:tiny-clip"]) as staging:
        model.to(torch.float16).save_pretrained(staging)
        write_clip_tokenizer(staging)
        embedder = ClipEmbedder(staging, "builtin:tiny-clip", device="cpu")  # as evaluate loads it
        captions = data.held_out_both().captions
        retrieval = retrieval_accuracy(
            embedder.image_embeddings(data.held_out_pngs(work)), embedder.text_embeddings(captions), captions
        )
        Card(
            "builtin:tiny-clip",
            f"A tiny CLIP ({parameter_count(model) / 1e6:.2f} M parameters; ViT image tower on 336 px input with 48 "
            "px patches, text tower with the real CLIP tokenizer and 77-token context), the stand-in for "
            "ViT-L/14-336 in CMMD and CLIP score. Held-out retrieval is measured on the saved weights through "
            "`features.ClipEmbedder`, the code evaluate uses.",
            [
                f"{config.clip_images_per_world} image/caption pairs of each world (seed {TRAIN_SEED}) at "
                f"{config.resolution} px, CMMD preprocessing to 336 px",
                f"held out: {config.held_out_images} pairs of each world (seed {HELD_OUT_SEED})",
            ],
            [
                f"{config.clip.steps} steps of {config.clip.batch_size} pairs, CLIP's symmetric contrastive loss with "
                f"a learnt temperature, AdamW at {config.clip.learning_rate}, weight decay 0.1, warmup and cosine decay"
            ],
            {
                "final training loss": log.last("train_loss"),
                "held-out loss (all pairs at once)": log.last("held_out_loss"),
                **{f"held-out {name}": value for name, value in retrieval.items()},
            },
            seconds,
        ).write(staging, log, threads)


def build_tiny_inception(config: BuildConfig, data: Data, out: Path, work: Path, threads: int) -> None:
    from safetensors.torch import save_file

    from lanskap.builtin.config import TINY_INCEPTION
    from lanskap.builtin.heads import head_accuracy, load_scene_heads, save_scene_heads
    from lanskap.builtin.inception import FANTASY_ONLY_TRAITS, fantasy_rows, train_inception
    from lanskap.evaluate.features import InceptionEmbedder, load_tiny_inception
    from lanskap.evaluate.metrics import frechet_distance

    log = LossLog()
    network, heads, seconds = train_inception(
        config, data.both_worlds(config.inception_images_per_world), data.held_out_both(), log
    )
    with atomic_dir(out / BUILTIN_FOLDERS["builtin:tiny-inception"]) as staging:
        save_file({name: tensor.half() for name, tensor in network.state_dict().items()}, staging / "model.safetensors")
        save_scene_heads(heads, staging)
        config_json = {"architecture": TINY_INCEPTION, "heads": heads.layout()}
        (staging / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        features = InceptionEmbedder(
            load_tiny_inception(staging), "builtin:tiny-inception", network.dim, "cpu"
        ).features(data.held_out_pngs(work))
        # Measured on the saved fp16 weights, loaded as evaluation loads them.
        held_out = data.held_out_both()
        accuracy = head_accuracy(load_scene_heads(staging), features, held_out.scenes)
        fantasy = fantasy_rows(held_out)
        within = head_accuracy(load_scene_heads(staging), features[fantasy], [held_out.scenes[r] for r in fantasy])
        half = config.held_out_images // 2  # rows: base world, then fantasy world
        base, fantasy = features[: config.held_out_images], features[config.held_out_images :]
        Card(
            "builtin:tiny-inception",
            f"The FID/KID stand-in: strided convolutions and a global average pool ({network.dim}-d features, "
            f"{parameter_count(network) / 1e6:.3f} M parameters), taking clean-fid's input (299 x 299, values in "
            "[0, 255]). Trained as a classifier of what each scene shows; the pool features feed FID and KID, and "
            "the linear heads ship beside them (`heads.safetensors`, layout in config.json; "
            "`lanskap.builtin.heads.load_scene_heads`). Held-out accuracy is measured on the saved weights.",
            [
                f"{config.inception_images_per_world} images of each world (seed {TRAIN_SEED}) at {config.resolution} "
                "px, clean-fid preprocessing to 299 px; labels: " + ", ".join(heads.labels),
                f"held out: {config.held_out_images} images of each world (seed {HELD_OUT_SEED})",
            ],
            [
                f"{config.inception.steps} steps of {config.inception.batch_size}, summed cross-entropy of the heads, "
                f"AdamW at {config.inception.learning_rate}, warmup and cosine decay",
                f"then the heads of traits only the fantasy world shows ({', '.join(FANTASY_ONLY_TRAITS)}) refit on "
                "its images alone, features frozen (L-BFGS logistic regression), so they cannot answer from the sky",
            ],
            {
                "final training loss": log.last("train_loss"),
                "held-out loss": log.last("held_out_loss"),
                **{f"held-out accuracy: {name}": value for name, value in accuracy.items()},
                **{f"held-out accuracy within the fantasy world: {name}": within[name] for name in FANTASY_ONLY_TRAITS},
                "FID held-out fantasy half vs half": frechet_distance(fantasy[:half], fantasy[half:]),
                "FID held-out base vs fantasy world": frechet_distance(base, fantasy),
            },
            seconds,
        ).write(staging, log, threads)


BUILDERS = {"tiny-sd2": build_tiny_sd2, "tiny-clip": build_tiny_clip, "tiny-inception": build_tiny_inception}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lanskap.builtin", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help=f"any of {', '.join(BUILDERS)} (default: all)")
    parser.add_argument("--out", type=Path, default=builtin_assets(), help="where the model folders go")
    parser.add_argument("--work", type=Path, default=WORK, help="drawn images and the VAE, kept between runs")
    parser.add_argument("--miniature", action="store_true", help="a few images and steps: proves the builder runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(BUILDERS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(BUILDERS)}")
    torch.set_num_threads(args.threads)
    config = MINIATURE if args.miniature else FULL
    data = Data(config, args.work)
    for name in args.models or list(BUILDERS):
        BUILDERS[name](config, data, args.out, args.work, args.threads)
        print(f"built {name} into {args.out / name}")
