"""LoRA on the UNet (and optionally the text encoder): attach PEFT adapters for training, export them in the two
formats users load.

Both files are written from the same PEFT adapters (`get_peft_model_state_dict`, keys
`<module path>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]; applied scale = alpha / r):

- `pytorch_lora_weights.safetensors`, diffusers format, for `pipe.load_lora_weights(dir)`: the PEFT keys as they
  are (what diffusers' own `save_lora_adapter` writes), prefixed `unet.` / `text_encoder.`. The file holds no alpha
  tensor; alpha lives only in the adapter metadata (the LoRA config as JSON under `lora_adapter_metadata`), so it is
  always written with it, beside the number of modules trained per component (`lanskap_lora_modules`), which every
  load is checked against.
- `lora_kohya.safetensors`, kohya format, for AUTOMATIC1111 / ComfyUI / Forge: keys
  `lora_unet_<module path with "." -> "_">.lora_down.weight` / `.lora_up.weight` / `.alpha`, diffusers block names
  (`down_blocks_0_attentions_0_...`, as kohya uses for SD 1.x/2.x), and `lora_te_text_model_encoder_layers_<i>_...`
  for the text encoder (transformers 5 dropped `text_model.` from the module path; kohya's loaders expect it),
  plus `ss_*` and `modelspec.*` metadata.

Traps avoided:
- `diffusers.utils.convert_state_dict_to_diffusers` renames only attention projections (`to_q`... to `lora.down`,
  `q_proj`... to `lora_linear_layer`) and leaves every other target (`proj_in`, `ff.net.2`, `fc1`) as `lora_A`; the
  UNet loader picks the naming from the file's first key and then drops every module named the other way, silently
  (16 of 48 on the tiny UNet with the wider target set);
- without the adapter metadata, diffusers assumes alpha = r and a model trained with alpha != r reloads at the
  wrong strength;
- `diffusers.utils.convert_state_dict_to_kohya` writes `.alpha = rank` whatever alpha was trained, stores it as
  int64 and names the text encoder `lora_te1_` (SDXL to AUTOMATIC1111), so the kohya dict is built here directly
  from the PEFT state dict with the configured alpha as a 0-d float32 tensor;
- LoRA weights stay float32 on a bf16/fp16 base: fp16 trainable params make the AMP grad scaler fail with
  "Attempting to unscale FP16 gradients", and bf16 ones lose small updates.
"""

import json
from pathlib import Path

import peft
import torch

from lanskap.errors import UserError
from lanskap.io import canonicalise_safetensors
from lanskap.params import LoraParams

ADAPTER_NAME = "default"  # the name `add_adapter` gives the adapter it trains
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
EMA_SUBDIR = "ema"  # train_lora writes the EMA weights' files here, inside its output (train.ema_decay)
LOADED_ADAPTER_NAME = "lora"  # the name generate (and the export check) loads the diffusers file under
MODULE_COUNT_KEY = "lanskap_lora_modules"  # diffusers-file metadata: {"unet": n, "text_encoder": m} modules trained
KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_TEXT_ENCODER_PREFIX = "lora_te_text_model_"  # SD 1.x/2.x; `lora_te1_`/`lora_te2_` would mean SDXL
PEFT_TO_KOHYA_WEIGHT = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
# modelspec architecture and kohya base version of each SD 2.x prediction type (768-v vs 512-base models).
SD2_VARIANTS = {
    "v_prediction": {"modelspec": "v", "architecture": "stable-diffusion-v2-768-v", "ss_base": "sd_v2_v"},
    "epsilon": {"modelspec": "epsilon", "architecture": "stable-diffusion-v2-512", "ss_base": "sd_v2"},
}


def lora_config(params: LoraParams, target_modules: list[str]) -> peft.LoraConfig:
    # Gaussian or Kaiming-uniform A and zero B: the adapter starts as an exact no-op on the base model.
    return peft.LoraConfig(r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout,
                           target_modules=list(target_modules), use_dora=params.use_dora,
                           use_rslora=params.use_rslora,
                           init_lora_weights="gaussian" if params.init_lora_weights == "gaussian" else True)


def kohya_alpha(params: LoraParams) -> float:
    """The alpha that gives kohya's loaders (scale = alpha / rank) the trained scale, also under rsLoRA
    (scale = alpha / sqrt(rank))."""
    return params.alpha * params.rank ** 0.5 if params.use_rslora else params.alpha


def add_lora(model, params: LoraParams, target_modules: list[str]) -> list[torch.nn.Parameter]:
    """Freeze `model` (the UNet or the text encoder), attach a LoRA adapter in float32 on `target_modules`, set train
    mode and return the trainable parameters."""
    from diffusers.training_utils import cast_training_params

    model.requires_grad_(False)  # only the adapter trains (and only it is upcast below)
    model.add_adapter(lora_config(params, target_modules))
    model.train()  # from_pretrained returns eval mode, in which lora.dropout does nothing
    # PEFT creates the adapter in the base layer's dtype; train it in float32 whatever the frozen weights are.
    cast_training_params(model, dtype=torch.float32)
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def add_unet_lora(unet, params: LoraParams) -> list[torch.nn.Parameter]:
    return add_lora(unet, params, params.target_modules)


def peft_state_dict(model) -> dict[str, torch.Tensor]:
    # save_embedding_layers=False: the adapters never touch embeddings, and "auto" probes the hub for a config.
    return peft.get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)


def kohya_modules(peft_state_dict: dict[str, torch.Tensor], prefix: str, alpha: float) -> dict[str, torch.Tensor]:
    """PEFT `<path>.lora_A.weight`/`.lora_B.weight` -> kohya `<prefix><path with . -> _>.lora_down.weight`/
    `.lora_up.weight`, plus one `.alpha` per module: the trained alpha as a 0-d float32 tensor (kohya's loaders
    scale by alpha / r, and an int64 or rank-valued alpha changes the strength)."""
    kohya = {}
    for key, weight in peft_state_dict.items():
        path, _, tensor_name = key.partition(".lora_")
        kohya_tensor_name = PEFT_TO_KOHYA_WEIGHT.get(f"lora_{tensor_name}")
        if kohya_tensor_name is None:
            raise ValueError(f"kohya export: unsupported adapter tensor {key!r} (only plain LoRA A/B are exported)")
        module = prefix + path.replace(".", "_")
        kohya[f"{module}.{kohya_tensor_name}"] = weight.contiguous()
        kohya[f"{module}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return kohya


def kohya_state_dict(unet, params: LoraParams, text_encoder=None) -> dict[str, torch.Tensor]:
    """The adapters in kohya format (`lora_unet_...`, `lora_te_text_model_...`), built from the PEFT state dicts."""
    kohya = kohya_modules(peft_state_dict(unet), KOHYA_UNET_PREFIX, kohya_alpha(params))
    if text_encoder is not None:
        text_state = {key.removeprefix("text_model."): value for key, value in peft_state_dict(text_encoder).items()}
        kohya |= kohya_modules(text_state, KOHYA_TEXT_ENCODER_PREFIX, kohya_alpha(params))
    return kohya


def kohya_metadata(params: LoraParams, base: dict) -> dict[str, str]:
    """kohya `ss_*` and Stability `modelspec.*` metadata, which UIs read to show and filter LoRAs by base model.

    `base` holds model, revision, prediction_type, resolution, steps, train_images and data_sha256."""
    if base["prediction_type"] not in SD2_VARIANTS:
        raise ValueError(f"kohya export: prediction_type {base['prediction_type']!r} is not an SD 2.x one "
                         f"({', '.join(SD2_VARIANTS)})")
    variant = SD2_VARIANTS[base["prediction_type"]]
    resolution = int(base["resolution"])
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(params.rank),
        "ss_network_alpha": str(float(kohya_alpha(params))),
        "ss_network_dropout": str(float(params.dropout)),
        "ss_v2": "True",
        "ss_base_model_version": variant["ss_base"],
        "ss_resolution": str((resolution, resolution)),  # kohya writes the tuple: "(768, 768)"
        "ss_sd_model_name": str(base["model"]),
        "ss_max_train_steps": str(base["steps"]),
        "ss_num_train_images": str(base["train_images"]),
        "ss_training_comment": f"base revision {base['revision']}; train.csv sha256 {base['data_sha256']}",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{variant['architecture']}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.prediction_type": variant["modelspec"],
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.title": f"lanskap LoRA for {base['model']}",
    }


def adapter_metadata(model) -> dict:
    """The adapter's LoRA config for the diffusers file, sets as sorted lists (a set's order changes per process)."""
    config = model.peft_config[ADAPTER_NAME].to_dict()
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


def lora_module_count(model, adapter_name: str) -> int:
    """How many layers of `model` carry a LoRA adapter named `adapter_name`."""
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(module, LoraLayer) and adapter_name in module.lora_A for module in model.modules())


def write_diffusers_file(unet, out_dir: Path, text_encoder=None) -> Path:
    """`pytorch_lora_weights.safetensors`: PEFT keys, the adapter configs and the trained module counts."""
    import safetensors
    import safetensors.torch
    from diffusers import StableDiffusionPipeline

    components = {"unet": unet} if text_encoder is None else {"unet": unet, "text_encoder": text_encoder}
    StableDiffusionPipeline.save_lora_weights(
        out_dir, weight_name=DIFFUSERS_WEIGHT_NAME,
        **{f"{name}_lora_layers": peft_state_dict(model) for name, model in components.items()},
        **{f"{name}_lora_adapter_metadata": adapter_metadata(model) for name, model in components.items()},
    )
    path = out_dir / DIFFUSERS_WEIGHT_NAME
    # save_lora_weights takes no metadata of ours: add the counts by writing the file again, then fix its header.
    with safetensors.safe_open(path, "pt") as file:
        metadata = file.metadata()
    counts = {name: lora_module_count(model, ADAPTER_NAME) for name, model in components.items()}
    safetensors.torch.save_file(safetensors.torch.load_file(path), path,
                                metadata={**metadata, MODULE_COUNT_KEY: json.dumps(counts, sort_keys=True)})
    canonicalise_safetensors(path)
    return path


def export_lora(unet, out_dir: Path, params: LoraParams, base: dict, text_encoder=None) -> dict[str, Path]:
    """Write the UNet adapter (and the text encoder's, if given) as diffusers `pytorch_lora_weights.safetensors`
    (alpha in the adapter metadata) and, unless it is a DoRA adapter, kohya `lora_kohya.safetensors`; return the
    paths written."""
    import safetensors.torch

    out_dir = Path(out_dir)
    diffusers_file = write_diffusers_file(unet, out_dir, text_encoder)
    if params.use_dora:  # kohya's format and loaders have no magnitude vector: a file without it would be wrong
        print(f"export_lora: lora.use_dora is on; {KOHYA_WEIGHT_NAME} not written (the kohya format has no DoRA)")
        return {"diffusers": diffusers_file}
    safetensors.torch.save_file(kohya_state_dict(unet, params, text_encoder), out_dir / KOHYA_WEIGHT_NAME,
                                metadata=kohya_metadata(params, base))
    canonicalise_safetensors(out_dir / KOHYA_WEIGHT_NAME)
    return {"diffusers": diffusers_file, "kohya": out_dir / KOHYA_WEIGHT_NAME}


def trained_module_counts(lora_dir: Path) -> dict[str, int]:
    """The modules trained per component, as recorded in the diffusers file at export."""
    import safetensors

    path = Path(lora_dir) / DIFFUSERS_WEIGHT_NAME
    with safetensors.safe_open(path, "pt") as file:
        recorded = (file.metadata() or {}).get(MODULE_COUNT_KEY)
    if recorded is None:
        raise UserError(f"{path}: no {MODULE_COUNT_KEY!r} metadata (the number of LoRA modules trained), so a "
                        f"partial load could not be detected. Export it again with this version of lanskap: "
                        f"dvc repro train_lora")
    return json.loads(recorded)


def require_all_modules_loaded(pipeline, lora_dir: Path, adapter_name: str) -> None:
    """Fail unless every module trained (per the file's record) carries the loaded adapter in `pipeline`."""
    trained = trained_module_counts(lora_dir)
    loaded = {name: lora_module_count(getattr(pipeline, name), adapter_name) for name in ("unet", "text_encoder")}
    if any(loaded[name] != trained.get(name, 0) for name in loaded):
        found = "; ".join(f"{name} {loaded[name]} of {trained.get(name, 0)}" for name in loaded)
        raise UserError(f"{Path(lora_dir) / DIFFUSERS_WEIGHT_NAME}: diffusers' load_lora_weights restored a different "
                        f"number of LoRA modules than were trained ({found}), so the model would differ from the "
                        f"trained one. Export it again with this version of lanskap (dvc repro train_lora); if "
                        f"train_lora wrote it just now, report a bug with this message")


def lora_weights_dir(lora_dir: Path, weights: str) -> Path:
    """The folder of the weights generate.lora_weights names: raw (the trained ones) or ema (their moving average,
    written only when train.ema_decay was set)."""
    if weights == "raw":
        return Path(lora_dir)
    ema_dir = Path(lora_dir) / EMA_SUBDIR
    if not (ema_dir / DIFFUSERS_WEIGHT_NAME).is_file():
        raise UserError(f"generate.lora_weights=ema but {ema_dir / DIFFUSERS_WEIGHT_NAME} does not exist: the LoRA was "
                        "trained without an EMA. Set train.ema_decay (e.g. 0.99) and rerun train_lora, or set "
                        "generate.lora_weights: raw")
    return ema_dir


def load_lora_into_pipeline(pipeline, lora_dir: Path, scale: float) -> None:
    """Load the diffusers-format LoRA from `lora_dir` as adapter "lora", check that every trained module was
    restored, and apply it at `scale` (1.0: as trained; the trained alpha / r comes from the file's adapter
    metadata)."""
    pipeline.load_lora_weights(lora_dir, weight_name=DIFFUSERS_WEIGHT_NAME, adapter_name=LOADED_ADAPTER_NAME)
    require_all_modules_loaded(pipeline, lora_dir, LOADED_ADAPTER_NAME)
    pipeline.set_adapters([LOADED_ADAPTER_NAME], adapter_weights=[scale])


def require_lora_reloads(model_dir: Path, lora_dir: Path) -> None:
    """Load the exported diffusers file into a fresh copy of the base model (no VAE: it takes no LoRA) the way
    users do, and fail unless every trained module is restored."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(model_dir, vae=None, safety_checker=None,
                                                       feature_extractor=None, requires_safety_checker=False)
    load_lora_into_pipeline(pipeline, lora_dir, scale=1.0)
