"""Base models: resolve `model.base` to a local diffusers folder, build the built-in tiny SD 2.x model.

`model.base` is one of
- `builtin:tiny-sd2`: a randomly initialised model of the SD 2.x family (UNet with linear projection
  and cross-attention, VAE, CLIP text encoder with the real CLIP BPE tokenizer, v-prediction scheduler)
  at tiny widths. It is built deterministically, saved with `save_pretrained` into a cache folder, and
  loaded through the same `from_pretrained` path as a hub model.
- a local diffusers folder (with `model_index.json`);
- a Hugging Face hub id with `model.revision`: taken from the local HF cache, downloaded only if the
  machine can reach the hub, otherwise a clear error says what is missing and how to get it.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lanskap.errors import UserError
from lanskap.io import atomic_dir

BUILTIN_TINY_SD2 = "builtin:tiny-sd2"
# Files a diffusers StableDiffusionPipeline folder needs; other weight formats in a hub repo are skipped.
PIPELINE_FILES = ["model_index.json", "*/config.json", "*/*.safetensors", "scheduler/*", "tokenizer/*"]
PIPELINE_WEIGHT_FOLDERS = ("unet", "vae", "text_encoder")  # the parts generate and train_lora load weights for
# Weight files that are Python pickles: opening one can run any code its author put in it.
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

TINY_SD2_CONFIG = {
    "unet": dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True, norm_num_groups=16,
    ),
    # Three down blocks: latents are 1/4 of the image side (SD's VAE uses 1/8 with four).
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
        block_out_channels=(16, 32, 32), norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    ),
    "text_encoder": dict(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=32,
    ),
    # SD 2.1-768's noise schedule and prediction type.
    "scheduler": dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", clip_sample=False, steps_offset=1,
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("LANSKAP_CACHE", Path.home() / ".cache" / "lanskap"))


def clip_tokenizer_dir() -> Path:
    """The CLIP BPE vocabulary shipped with the package: tokenises exactly as SD 2.1's tokenizer."""
    return Path(str(resources.files("lanskap") / "assets" / "clip_tokenizer"))


def build_tiny_sd2(out_dir: Path) -> None:
    """Build the tiny SD 2.x pipeline with seeded random weights and `save_pretrained` it to out_dir."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = TINY_SD2_CONFIG
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir(), model_max_length=77)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDPMScheduler(**cfg["scheduler"]), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)


def builtin_dir(name: str, config: dict, build) -> Path:
    """Folder of a built-in model, built once; the folder name carries a hash of its config."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = cache_root() / "builtin" / f"{name}-{digest}"
    if not (folder / "model_index.json").is_file() and not (folder / "config.json").is_file():
        with atomic_dir(folder) as staging:
            build(staging)
    return folder


def require_safetensors(folder: Path, key: str) -> None:
    """Refuse a model folder without .safetensors weights, before a loader falls back to unpickling a
    .bin (transformers and diffusers do, unless given `use_safetensors=True`)."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(path.name for path in folder.glob("*") if path.suffix in PICKLE_WEIGHT_SUFFIXES)
    found = f"only pickle weights ({', '.join(pickles)}), which are never loaded" if pickles else "no weights"
    raise UserError(
        f"{key}: {folder} has {found}; only .safetensors weights are read, because a pickle can run code when "
        "it is opened. Pin a revision that has .safetensors files, or convert once on a machine you trust: "
        "load the model with from_pretrained and save it with save_pretrained(folder, safe_serialization=True)."
    )


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a local folder that from_pretrained reads
    spec: str  # what the user asked for (model.base)
    revision: str | None  # the commit actually used, for hub models


def resolve_base_model(base: str, revision: str | None) -> ResolvedModel:
    """Turn `model.base` into a local diffusers folder with safetensors weights, or fail saying what is
    missing and how to get it."""
    if base == BUILTIN_TINY_SD2:
        return ResolvedModel(builtin_dir("tiny-sd2", TINY_SD2_CONFIG, build_tiny_sd2), base, None)
    if base.startswith("builtin:"):
        raise UserError(f"model.base: unknown built-in {base!r}; the built-in model is {BUILTIN_TINY_SD2!r}")
    local = Path(base).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise UserError(f"model.base: {local} is not a diffusers pipeline folder (no model_index.json)")
        resolved = ResolvedModel(local, base, None)
    else:
        resolved = ResolvedModel(*fetch_hub_snapshot(base, revision, PIPELINE_FILES, "model.base", "model.revision"))
    for part in PIPELINE_WEIGHT_FOLDERS:
        require_safetensors(resolved.path / part, "model.base")
    return resolved


def fetch_hub_snapshot(repo_id: str, revision: str | None, patterns: list[str], key: str, revision_key: str):
    """Local snapshot of a hub repo at `revision`: from the HF cache, else downloaded, else a UserError."""
    from huggingface_hub import snapshot_download

    if revision is None:
        raise UserError(f"{key}: hub model {repo_id!r} needs a pinned revision (a commit hash); set "
                        f"{revision_key} in params.yaml")
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True)
    except Exception:
        try:
            path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
        except Exception as error:
            raise UserError(
                f"{key}: {repo_id!r} at revision {revision!r} is not in the Hugging Face cache "
                f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and could not be downloaded "
                f"({type(error).__name__}). On a machine with network run: "
                f"`hf download {repo_id} --revision {revision}` (then copy the cache here), or set "
                f"{key} to a local folder saved with save_pretrained."
            ) from None
    return Path(path), repo_id, Path(path).name
