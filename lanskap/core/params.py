"""Typed, validated params: one pydantic model per `params.yaml` group.

Each stage declares the groups it reads in `dvc.yaml` and loads exactly those here, so no code reads a
key DVC does not track. Unknown keys, missing keys, wrong types and out-of-range values stop the stage with a
message naming the key, the value and what is allowed. The models only validate: every field is required and has
no default, so the values (and the comments that explain them) live in one place, conf/, which composes
`params.yaml` (see README). Tests and bench scripts build params from conf/ too (`conf_group`).
"""

import difflib
import json
import re
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lanskap.core.errors import UserError

PARAMS_FILE = "params.yaml"
# The demo preset's values: conf/preset/demo.yaml changes none of conf/config.yaml's.
CONF_FILE = Path(__file__).resolve().parents[2] / "conf" / "config.yaml"


class Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(Group):
    base: str
    revision: str | None


class IngestParams(Group):
    source: str
    num_images: int = Field(ge=2, le=100_000)
    image_size: int = Field(ge=64, le=4096)
    world: Literal["fantasy", "base"]
    min_size: int = Field(ge=1)
    max_aspect_ratio: float = Field(ge=1.0)
    near_duplicate_distance: int = Field(ge=0, le=64)
    download_timeout: float = Field(gt=0.0)
    max_download_mb: float = Field(gt=0.0)
    download_retries: int = Field(ge=0, le=10)
    seed: int


class CaptionParams(Group):
    method: Literal["keep", "template", "model"]
    template: str
    model: str
    model_revision: str | None
    batch_size: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1, le=77)
    prefix: str
    suffix: str
    overrides: str | None


class SplitParams(Group):
    test_fraction: float = Field(gt=0.0, lt=1.0)
    stratify: str | None
    seed: int


class PreprocessParams(Group):
    resolution: int = Field(ge=32, le=2048, multiple_of=8)
    center_crop: bool
    buckets: bool
    bucket_reso_steps: int = Field(ge=8, multiple_of=8)
    bucket_max_aspect_ratio: float = Field(ge=1.0, le=16.0)
    preview_samples: int = Field(ge=1, le=32)
    seed: int

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

    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip_p: float = Field(ge=0.0, le=1.0)
    brightness: float = Field(ge=0.0, le=1.0)
    contrast: float = Field(ge=0.0, le=1.0)
    saturation: float = Field(ge=0.0, le=1.0)

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
    type: Literal["lora", "loha", "lokr"]
    rank: int = Field(ge=1, le=1024)
    alpha: float = Field(gt=0.0)
    dropout: float = Field(ge=0.0, lt=1.0)
    target_modules: list[str] = Field(min_length=1)
    text_encoder_target_modules: list[str] = Field(min_length=1)
    use_dora: bool
    use_rslora: bool
    # Both start the adapter as a no-op (B = 0). PiSSA/OLoRA-style inits are not offered: they rewrite the base
    # weights, so the exported adapter would be wrong on the stock base model.
    init_lora_weights: Literal["gaussian", "kaiming"]
    decompose_factor: int = Field(ge=-1)
    decompose_both: bool

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
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0.0, le=1.0)
    text_encoder_learning_rate: float | None = Field(gt=0.0, le=1.0)
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adamw_schedulefree"]
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"]
    warmup_steps: int = Field(ge=0)
    adam_beta1: float = Field(ge=0.0, lt=1.0)
    adam_beta2: float = Field(ge=0.0, lt=1.0)
    adam_weight_decay: float = Field(ge=0.0)
    adam_epsilon: float = Field(gt=0.0)
    max_grad_norm: float = Field(gt=0.0)
    mixed_precision: Literal["no", "fp16", "bf16"]
    validation_every: int = Field(ge=1)
    checkpoint_every: int = Field(ge=0)
    gradient_accumulation_steps: int = Field(ge=1)
    gradient_checkpointing: bool
    dataloader_workers: int = Field(ge=0, le=64)
    cached_latents: int = Field(ge=0, le=1024)
    prediction_type: Literal["epsilon", "v_prediction"] | None
    snr_gamma: float | None = Field(gt=0.0)
    noise_offset: float = Field(ge=0.0, le=1.0)
    caption_dropout: float = Field(ge=0.0, lt=1.0)
    shuffle_captions: bool
    images_every: int = Field(ge=0)
    image_prompts: list[str]
    image_inference_steps: int = Field(ge=1, le=1000)
    image_guidance_scale: float = Field(ge=0.0)
    ema_decay: float | None = Field(gt=0.0, lt=1.0)
    ema_warmup: bool
    seed: int

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
    scheduler: Literal["dpm++", "ddim", "euler"]
    steps: int = Field(ge=1, le=1000)
    guidance_scale: float = Field(ge=0.0)
    negative_prompt: str
    images_per_prompt: int = Field(ge=1)
    resolution: int | None = Field(ge=32, multiple_of=8)
    batch_size: int = Field(ge=1)
    lora_scale: float
    lora_weights: Literal["raw", "ema"]
    dtype: Literal["auto", "fp32", "fp16", "bf16"]
    seed: int


class EvaluateParams(Group):
    clip_model: str
    clip_revision: str | None
    inception_weights: str
    kid_subsets: int = Field(ge=1)
    permutations: int = Field(ge=10)
    seed: int


class RateParams(Group):
    criteria: dict[str, str] = Field(min_length=1)  # criterion name (a metric key prefix) -> the page's question
    seed: int

    @model_validator(mode="after")
    def _criteria_are_keys(self):
        for name, question in self.criteria.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name) or not question.strip():
                raise ValueError(
                    f"criterion {name!r}: names are lower-case letters, digits and _ (up to 32, a letter first; "
                    "they prefix the metric keys) and each needs a question"
                )
        return self


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
    "rate": RateParams,
}


def known_keys() -> list[str]:
    """Every key params.yaml may hold, dotted as `-S` and `make params OVERRIDES=...` write them."""
    return ["preset", *(f"{name}.{key}" for name, model in GROUPS.items() for key in model.model_fields)]


def nearest_key(key: str) -> str | None:
    """The valid key a misspelt one most likely meant (`lora.rnk` -> `lora.rank`, `lroa.rank` -> `lora.rank`), None
    when none is close. A known group's own keys come first: `train.lr` should not become `train.seed`."""
    group, _, field = key.partition(".")
    if group in GROUPS and field:
        close = difflib.get_close_matches(field, list(GROUPS[group].model_fields), n=1)
        return f"{group}.{close[0]}" if close else None
    close = difflib.get_close_matches(key, known_keys(), n=1)
    return close[0] if close else None


def unknown_key_message(key: str) -> str:
    meant = nearest_key(key)
    return f"{key} is not a key" + (f": did you mean {meant}?" if meant else " (the keys are in conf/config.yaml)")


def validate_group(name: str, values: dict, source: str = PARAMS_FILE) -> Group:
    """Validate one group; a bad value raises UserError naming `group.key`, the value and the rule."""
    try:
        return GROUPS[name].model_validate(values)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            key = ".".join([name, *map(str, item["loc"])])
            if item["type"] == "missing":
                problems.append(f"  {key}: missing (conf/config.yaml has every key: `make params` recomposes {source})")
                continue
            if item["type"] == "extra_forbidden":
                problems.append(f"  {unknown_key_message(key)}")
                continue
            message = item["msg"].removeprefix("Value error, ")
            got = f" (got {item.get('input')!r})" if item["loc"] else ""  # a whole-group rule names its keys itself
            problems.append(f"  {key}: {message}{got}")
        raise UserError(f"invalid params in {source}:\n" + "\n".join(problems)) from None


def load_params(*groups: str, path: str | Path = PARAMS_FILE) -> dict[str, Group]:
    """Read `path` and return the named groups, validated: each group and key must be there."""
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
        values = document.get(name)
        if not isinstance(values, dict):
            got = "no such group" if values is None else f"got {values!r}"
            raise UserError(
                f"invalid params in {path}: '{name}' must be a mapping of keys ({got}); `make params` composes "
                f"{path} from conf/"
            )
        loaded[name] = validate_group(name, values, str(path))
    return loaded


@cache
def conf_values() -> dict:
    """conf/config.yaml's groups: the demo preset's values."""
    document = yaml.safe_load(CONF_FILE.read_text())
    return {name: values for name, values in document.items() if name in GROUPS}


def conf_group(name: str, **overrides) -> Group:
    """Group `name` as conf/config.yaml sets it, with `overrides`: how tests and bench scripts build params."""
    return validate_group(name, {**conf_values()[name], **overrides}, f"{CONF_FILE.name} with {overrides}")
