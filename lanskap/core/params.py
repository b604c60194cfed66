"""Typed, validated params: one pydantic model per `params.yaml` group.

Each stage declares the groups it reads in `dvc.yaml` and loads exactly those here, so no code reads a
key DVC does not track. Unknown keys, wrong types and out-of-range values stop the stage with a message
naming the key, the value and what is allowed. The defaults below are the demo preset; `conf/` holds the
presets that compose `params.yaml` (see README).
"""

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lanskap.core.errors import UserError

PARAMS_FILE = "params.yaml"


class Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(Group):
    base: str = "builtin:tiny-sd2"  # hub id, local diffusers folder, or builtin:tiny-sd2
    revision: str | None = None  # pinned hub revision (commit hash); required for hub ids


class IngestParams(Group):
    source: str = "builtin:procedural"  # builtin:procedural, a folder, or a .csv/.jsonl manifest
    num_images: int = Field(60, ge=2, le=100_000)  # builtin:procedural only
    image_size: int = Field(128, ge=64, le=4096)  # builtin:procedural only
    world: Literal["fantasy", "base"] = "fantasy"  # builtin:procedural only; see lanskap/data/procedural.py
    min_size: int = Field(64, ge=1)  # shorter side below this is rejected
    max_aspect_ratio: float = Field(4.0, ge=1.0)  # longer side / shorter side above this is rejected
    near_duplicate_distance: int = Field(4, ge=0, le=64)  # perceptual-hash bits; pairs within it are reported
    download_timeout: float = Field(30.0, gt=0.0)  # seconds, per connection and per read
    max_download_mb: float = Field(50.0, gt=0.0)
    download_retries: int = Field(3, ge=0, le=10)
    seed: int = 0


class CaptionParams(Group):
    method: Literal["keep", "template", "model"] = "keep"
    template: str = "a fantasy landscape"  # used by method=template
    model: str = "Salesforce/blip-image-captioning-large"  # method=model: hub id or local folder (image-to-text)
    model_revision: str | None = None  # pinned commit for hub ids
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(40, ge=1, le=77)
    prefix: str = ""  # e.g. a trigger word: "lnskp style, "
    suffix: str = ""
    overrides: str | None = None  # CSV (sha256 or file name, caption) whose captions win over the method's


class SplitParams(Group):
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    stratify: str | None = None  # a caption-table column (e.g. group) whose values keep their share on both sides
    seed: int = 0


class PreprocessParams(Group):
    resolution: int = Field(64, ge=32, le=2048, multiple_of=8)
    center_crop: bool = True  # False: shorter side resized, aspect ratio kept (the random crop squares it)
    # Aspect-ratio buckets (lanskap/data/buckets.py): each image at the size of about resolution^2 pixels nearest its
    # aspect ratio, sides multiples of bucket_reso_steps, at most bucket_max_aspect_ratio:1; center_crop then unused
    buckets: bool = False
    bucket_reso_steps: int = Field(64, ge=8, multiple_of=8)
    bucket_max_aspect_ratio: float = Field(4.0, ge=1.0, le=16.0)
    preview_samples: int = Field(6, ge=1, le=32)
    seed: int = 0

    @model_validator(mode="after")
    def _square_bucket_exists(self):
        if self.buckets and self.resolution % self.bucket_reso_steps:
            raise ValueError(
                f"with buckets: true, resolution={self.resolution} must be a multiple of "
                f"bucket_reso_steps={self.bucket_reso_steps} (so the square bucket has resolution^2 "
                "pixels)"
            )
        return self


class AugmentParams(Group):
    """The paper's augmentation, applied on the fly by train_lora (previewed by preprocess)."""

    crop_scale: tuple[float, float] = (0.8, 1.0)  # RandomResizedCrop area fraction
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)  # RandomResizedCrop aspect ratio
    hflip_p: float = Field(0.5, ge=0.0, le=1.0)
    brightness: float = Field(0.1, ge=0.0, le=1.0)
    contrast: float = Field(0.1, ge=0.0, le=1.0)
    saturation: float = Field(0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered_ranges(self):
        for key in ("crop_scale", "crop_ratio"):
            low, high = getattr(self, key)
            if not 0 < low <= high:
                raise ValueError(f"{key} must be [low, high] with 0 < low <= high, got {[low, high]}")
        if self.crop_scale[1] > 1.0:
            raise ValueError(f"crop_scale high must be <= 1.0, got {self.crop_scale[1]}")
        return self


# Keys that configure one adapter type only, with the value that leaves them off: a value set for another type is
# an error, not a silent no-op.
LORA_ONLY = {"dropout": 0.0, "use_dora": False, "use_rslora": False, "init_lora_weights": "gaussian"}
LOKR_ONLY = {"decompose_factor": -1, "decompose_both": False}


class LoraParams(Group):
    # lora: low-rank B A; loha: Hadamard product of two low-rank products (LyCORIS LoHa); lokr: Kronecker product of
    # two factors, the larger one low-rank (LyCORIS LoKr). All three train through peft.
    type: Literal["lora", "loha", "lokr"] = "lora"
    rank: int = Field(4, ge=1, le=1024)
    alpha: float = Field(4.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # UNet modules; "wide" adds the transformer blocks' proj_in/proj_out and feed-forward: ["to_q", "to_k", "to_v",
    # "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    # text-encoder modules, used when train.text_encoder_learning_rate is set (kohya also takes "fc1", "fc2")
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"], min_length=1
    )
    use_dora: bool = False  # weight-decomposed LoRA; the kohya file is then not written (kohya has no DoRA)
    use_rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    # Both start the adapter as a no-op (B = 0). PiSSA/OLoRA-style inits are not offered: they rewrite the base
    # weights, so the exported adapter would be wrong on the stock base model.
    init_lora_weights: Literal["gaussian", "kaiming"] = "gaussian"
    # lokr: the first Kronecker factor's size for each layer dimension it divides (else the largest divisor below it);
    # -1: the divisor nearest the square root
    decompose_factor: int = Field(-1, ge=-1)
    decompose_both: bool = False  # lokr: the first factor low-rank too (else a full small matrix)

    @model_validator(mode="after")
    def _keys_of_the_adapter_type(self):
        if self.decompose_factor == 0:
            raise ValueError("lora.decompose_factor must be -1 (near the square root) or a size >= 1, got 0")
        for applies_to, keys in (("lora", LORA_ONLY), ("lokr", LOKR_ONLY)):
            for key, off in keys.items():
                if self.type != applies_to and getattr(self, key) != off:
                    value = json.dumps(getattr(self, key))
                    raise ValueError(
                        f"lora.{key}={value} applies to lora.type={applies_to} only, not lora.type="
                        f"{self.type}: set lora.{key}: {json.dumps(off)} (off) or lora.type: {applies_to}"
                    )
        return self


PRODIGY_MIN_LEARNING_RATE = 0.1  # below this, an Adam-sized learning rate was most likely carried over


class TrainParams(Group):
    steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(1.0e-4, gt=0.0, le=1.0)
    # None: the text encoder stays frozen; a value also trains a text-encoder LoRA, at this learning rate
    text_encoder_learning_rate: float | None = Field(None, gt=0.0, le=1.0)
    # adamw8bit needs bitsandbytes (and a GPU); prodigy (prodigyopt) estimates its own step size, which
    # learning_rate multiplies (1.0 is usual); adamw_schedulefree (schedulefree) needs no lr schedule
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adamw_schedulefree"] = "adamw"
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_weight_decay: float = Field(1.0e-2, ge=0.0)
    adam_epsilon: float = Field(1.0e-8, gt=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    validation_every: int = Field(10, ge=1)  # held-out validation loss every this many steps
    checkpoint_every: int = Field(0, ge=0)  # steps between resumable checkpoints (outside DVC outputs); 0: off
    gradient_accumulation_steps: int = Field(1, ge=1)  # global batch = batch_size x this x processes
    gradient_checkpointing: bool = False
    dataloader_workers: int = Field(0, ge=0, le=64)  # processes decoding and augmenting ahead; results unchanged
    # K augmented variants of each training image VAE-encoded once before training, a step using variant
    # (augmentation seed % K); 0: off (every step augments and encodes its images)
    cached_latents: int = Field(0, ge=0, le=1024)
    # None: the base model's own target (its scheduler config). Setting the other one trains on a target the
    # model was not pretrained for, which does worse: a negative control, as diffusers' --prediction_type
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    snr_gamma: float | None = Field(None, gt=0.0)  # min-SNR loss weighting (5.0 is usual); None: off
    noise_offset: float = Field(0.0, ge=0.0, le=1.0)  # 0.05-0.1 is usual; 0: off
    caption_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # probability of training on the empty caption
    # validation images: fixed prompts (empty: the first 4 test captions) and seeds, every this many steps; 0: off
    images_every: int = Field(0, ge=0)
    image_prompts: list[str] = Field(default_factory=list)
    image_inference_steps: int = Field(20, ge=1, le=1000)
    image_guidance_scale: float = Field(7.5, ge=0.0)
    # EMA of the LoRA weights, exported beside the raw ones (models/lora/ema/); None: off. The decay of update t
    # is min(ema_decay, (1 + t) / (10 + t)) with ema_warmup (diffusers' EMAModel), ema_decay from the first
    # update without it
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    ema_warmup: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _optimizer_settings_take_effect(self):
        if self.optimizer == "prodigy" and self.learning_rate < PRODIGY_MIN_LEARNING_RATE:
            raise ValueError(
                f"optimizer=prodigy estimates its own step size and learning_rate multiplies it: "
                f"learning_rate={self.learning_rate} looks like an Adam learning rate; set "
                f"learning_rate: 1.0 (values from {PRODIGY_MIN_LEARNING_RATE} to 1.0 are accepted)"
            )
        if (
            self.optimizer == "prodigy"
            and self.text_encoder_learning_rate is not None
            and self.text_encoder_learning_rate != self.learning_rate
        ):
            raise ValueError(
                "optimizer=prodigy takes one learning rate for all parameters: set "
                f"text_encoder_learning_rate to learning_rate ({self.learning_rate}) or to null"
            )
        if self.optimizer == "adamw_schedulefree" and self.lr_scheduler != "constant":
            raise ValueError(
                "optimizer=adamw_schedulefree replaces the lr schedule: "
                f"lr_scheduler={self.lr_scheduler!r} must be constant (warmup_steps is its own warm-up)"
            )
        if self.optimizer == "adamw_schedulefree" and self.ema_decay is not None:
            raise ValueError(
                "ema_decay with optimizer=adamw_schedulefree: schedule-free already averages its "
                "iterates (its evaluation weights are the ones exported); set ema_decay: null"
            )
        return self

    @model_validator(mode="after")
    def _warmup_takes_effect(self):
        # diffusers' "constant" ignores the warmup; schedule-free warms up itself, under a constant schedule
        if self.warmup_steps and self.lr_scheduler == "constant" and self.optimizer != "adamw_schedulefree":
            raise ValueError(
                f"warmup_steps={self.warmup_steps} has no effect with lr_scheduler=constant: use "
                "constant_with_warmup, linear or cosine, or set warmup_steps: 0"
            )
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be below steps={self.steps}")
        return self


FID_STABLE_N = 2048  # below this FID's covariance is rank-deficient: values are not comparable across n


class GenerateParams(Group):
    scheduler: Literal["dpm++", "ddim", "euler"] = "dpm++"
    steps: int = Field(25, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0)
    negative_prompt: str = ""
    images_per_prompt: int = Field(1, ge=1)
    resolution: int | None = Field(None, ge=32, multiple_of=8)  # None: the model's native size
    batch_size: int = Field(4, ge=1)
    lora_scale: float = 1.0
    lora_weights: Literal["raw", "ema"] = "raw"  # ema: the EMA weights train.ema_decay trained (models/lora/ema/)
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    seed: int = 0
    require_comparable_fid: bool = False  # stop at the start unless the sets reach FID's 2048 images


class EvaluateParams(Group):
    clip_model: str = "builtin:tiny-clip"  # or openai/clip-vit-large-patch14-336 / a local folder
    clip_revision: str | None = None
    inception_weights: str = "builtin:tiny-inception"  # or a path to inception-2015-12-05.pt
    kid_subsets: int = Field(100, ge=1)
    permutations: int = Field(200, ge=10)
    seed: int = 0


GROUPS: dict[str, type[Group]] = {
    "model": ModelParams,
    "ingest": IngestParams,
    "caption": CaptionParams,
    "split": SplitParams,
    "preprocess": PreprocessParams,
    "augment": AugmentParams,
    "lora": LoraParams,
    "train": TrainParams,
    "generate": GenerateParams,
    "evaluate": EvaluateParams,
}


def validate_group(name: str, values: dict, source: str = PARAMS_FILE) -> Group:
    """Validate one group; a bad value raises UserError naming `group.key`, the value and the rule."""
    try:
        return GROUPS[name].model_validate(values)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            key = ".".join([name, *map(str, item["loc"])])
            message = item["msg"].removeprefix("Value error, ")
            got = f" (got {item.get('input')!r})" if item["loc"] else ""  # a whole-group rule names its keys itself
            problems.append(f"  {key}: {message}{got}")
        raise UserError(f"invalid params in {source}:\n" + "\n".join(problems)) from None


def load_params(*groups: str, path: str | Path = PARAMS_FILE) -> dict[str, Group]:
    """Read `path` and return the named groups, validated. Missing groups and keys take the defaults."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path} not found: run from the project root, where params.yaml lives (`make params` "
            "composes it from conf/)"
        )
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {error}") from None
    loaded = {}
    for name in groups:
        values = document.get(name) or {}
        if not isinstance(values, dict):
            raise UserError(f"invalid params in {path}: '{name}' must be a mapping, got {values!r}")
        loaded[name] = validate_group(name, values, str(path))
    return loaded
