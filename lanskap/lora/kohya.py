"""The file AUTOMATIC1111, ComfyUI and Forge load: `<type>_kohya.safetensors`, built from peft's state dicts.

Keys: `lora_unet_<module path with "." -> "_">.<tensor>`, diffusers block names (`down_blocks_0_attentions_0_...`,
as kohya uses for SD 1.x/2.x), and `lora_te_text_model_encoder_layers_<i>_...` for the text encoder (transformers 5
dropped `text_model.` from the module path; kohya's loaders expect it). Tensors: LoRA `lora_down.weight` /
`lora_up.weight` / `alpha`; LoHa and LoKr under LyCORIS names (lanskap.lora.lycoris). Metadata: kohya `ss_*` and
Stability `modelspec.*`.

Trap avoided: `diffusers.utils.convert_state_dict_to_kohya` writes `.alpha = rank` whatever alpha was trained,
stores it as int64 and names the text encoder `lora_te1_` (SDXL to AUTOMATIC1111), so the dict is built here
directly from the PEFT state dict with the configured alpha as a 0-d float32 tensor.
"""

import json
import re

import torch

from lanskap.core.params import LoraParams
from lanskap.lora.adapters import ADAPTER_TITLES, peft_state_dict
from lanskap.lora.lycoris import loha_tensors, lokr_tensors

KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_TEXT_ENCODER_PREFIX = "lora_te_text_model_"  # SD 1.x/2.x; `lora_te1_`/`lora_te2_` would mean SDXL
PEFT_TO_KOHYA_WEIGHT = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
# `<module path>.<adapter tensor>` in peft's state dict, for each adapter type (DoRA's magnitude has no kohya form)
PEFT_KEY = re.compile(r"^(?P<path>.+)\.(?P<tensor>lora_[AB]\.weight|hada_w[12]_[ab]|lokr_w[12](_[ab])?)$")
# modelspec architecture and kohya base version of each SD 2.x prediction type (768-v vs 512-base models).
SD2_VARIANTS = {
    "v_prediction": {"modelspec": "v", "architecture": "stable-diffusion-v2-768-v", "ss_base": "sd_v2_v"},
    "epsilon": {"modelspec": "epsilon", "architecture": "stable-diffusion-v2-512", "ss_base": "sd_v2"},
}


def kohya_weight_name(adapter_type: str) -> str:
    return f"{adapter_type}_kohya.safetensors"


def kohya_alpha(params: LoraParams) -> float:
    """The alpha that gives kohya's loaders (scale = alpha / rank) the trained scale, also under rsLoRA
    (scale = alpha / sqrt(rank))."""
    return params.alpha * params.rank**0.5 if params.use_rslora else params.alpha


def lora_tensors(tensors: dict[str, torch.Tensor], params: LoraParams) -> dict[str, torch.Tensor]:
    """One module's PEFT `lora_A.weight`/`lora_B.weight` -> kohya `lora_down.weight`/`lora_up.weight`, plus `alpha`:
    the trained alpha as a 0-d float32 tensor (kohya's loaders scale by alpha / r; an int64 or rank-valued alpha
    changes the strength)."""
    kohya = {PEFT_TO_KOHYA_WEIGHT[name]: weight.contiguous() for name, weight in tensors.items()}
    return kohya | {"alpha": torch.tensor(float(kohya_alpha(params)), dtype=torch.float32)}


def modules_of(peft_state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """peft's flat state dict -> {module path: {adapter tensor name: tensor}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, weight in peft_state.items():
        match = PEFT_KEY.match(key)
        if match is None:
            raise ValueError(f"kohya export: unsupported adapter tensor {key!r} (LoRA A/B, LoHa and LoKr are exported)")
        modules.setdefault(match["path"], {})[match["tensor"]] = weight
    return modules


def kohya_modules(peft_state: dict[str, torch.Tensor], prefix: str, params: LoraParams) -> dict[str, torch.Tensor]:
    """Every module's tensors in kohya/LyCORIS form under `<prefix><path with . -> _>.`."""
    convert = {"lora": lora_tensors, "loha": loha_tensors, "lokr": lokr_tensors}[params.type]
    return {
        f"{prefix}{path.replace('.', '_')}.{name}": tensor
        for path, tensors in modules_of(peft_state).items()
        for name, tensor in convert(tensors, params).items()
    }


def kohya_state_dict(unet, params: LoraParams, text_encoder=None) -> dict[str, torch.Tensor]:
    """The adapters in kohya format (`lora_unet_...`, `lora_te_text_model_...`), built from the PEFT state dicts."""
    kohya = kohya_modules(peft_state_dict(unet), KOHYA_UNET_PREFIX, params)
    if text_encoder is not None:
        text_state = {key.removeprefix("text_model."): value for key, value in peft_state_dict(text_encoder).items()}
        kohya |= kohya_modules(text_state, KOHYA_TEXT_ENCODER_PREFIX, params)
    return kohya


def network_metadata(params: LoraParams) -> dict[str, str]:
    """kohya's network module and args: sd-scripts' `networks.lora`, or LyCORIS's `lycoris.kohya` with its algo."""
    if params.type == "lora":
        return {"ss_network_module": "networks.lora"}
    args = {"algo": params.type}  # as sd-scripts records --network_args: strings
    if params.type == "lokr":
        args |= {"factor": str(params.decompose_factor), "decompose_both": str(params.decompose_both)}
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args, sort_keys=True)}


def kohya_metadata(params: LoraParams, base: dict) -> dict[str, str]:
    """kohya `ss_*` and Stability `modelspec.*` metadata, which UIs read to show and filter LoRAs by base model.

    `base` holds model, revision, prediction_type, resolution, steps, train_images and data_sha256."""
    if base["prediction_type"] not in SD2_VARIANTS:
        raise ValueError(
            f"kohya export: prediction_type {base['prediction_type']!r} is not an SD 2.x one "
            f"({', '.join(SD2_VARIANTS)})"
        )
    variant = SD2_VARIANTS[base["prediction_type"]]
    resolution = int(base["resolution"])
    return {
        **network_metadata(params),
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
        "modelspec.architecture": f"{variant['architecture']}/lora",  # sd-scripts writes /lora for LyCORIS too
        "modelspec.implementation": "diffusers",
        "modelspec.prediction_type": variant["modelspec"],
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.title": f"lanskap {ADAPTER_TITLES[params.type]} for {base['model']}",
    }
