"""The files a run writes, and loading them back with a check that every trained module returned.

- `pytorch_lora_weights.safetensors` (lora.type=lora), diffusers format, for `pipe.load_lora_weights(dir)`: the
  PEFT keys as they are (what diffusers' own `save_lora_adapter` writes), prefixed `unet.` / `text_encoder.`. The
  file holds no alpha tensor; alpha lives only in the adapter metadata (the LoRA config as JSON under
  `lora_adapter_metadata`), so it is always written with it.
- `peft_adapter_weights.safetensors` (loha, lokr; diffusers' loader takes LoRA only): the PEFT keys the same way,
  with each component's peft config under `lanskap_adapter_config`; loaded by injecting that config with peft and
  setting the state dict, every key checked.
- `<type>_kohya.safetensors` for AUTOMATIC1111 / ComfyUI / Forge (lanskap.lora.kohya), unless DoRA.
Both peft-keyed files record the number of modules trained per component (`lanskap_lora_modules`), which every
load is checked against.

Traps avoided:
- `diffusers.utils.convert_state_dict_to_diffusers` renames only attention projections (`to_q`... to `lora.down`,
  `q_proj`... to `lora_linear_layer`) and leaves every other target (`proj_in`, `ff.net.2`, `fc1`) as `lora_A`; the
  UNet loader picks the naming from the file's first key and then drops every module named the other way, silently
  (16 of 48 on the tiny UNet with the wider target set);
- without the adapter metadata, diffusers assumes alpha = r and a model trained with alpha != r reloads at the
  wrong strength.
"""

import json
from pathlib import Path

from lanskap.core.errors import UserError
from lanskap.core.io import canonicalise_safetensors
from lanskap.core.params import LoraParams
from lanskap.lora.adapters import (
    ADAPTER_NAME,
    LOADED_ADAPTER_NAME,
    adapter_metadata,
    adapter_module_count,
    peft_state_dict,
)
from lanskap.lora.kohya import kohya_metadata, kohya_state_dict, kohya_weight_name

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHT_NAME = "peft_adapter_weights.safetensors"
MODULE_COUNT_KEY = "lanskap_lora_modules"  # file metadata: {"unet": n, "text_encoder": m} modules trained
ADAPTER_CONFIG_KEY = "lanskap_adapter_config"  # peft file metadata: {"unet": config, "text_encoder": config}
EMA_SUBDIR = "ema"  # train_lora writes the EMA weights' files here, inside its output (train.ema_decay)


def components_of(unet, text_encoder=None) -> dict:
    return {"unet": unet} if text_encoder is None else {"unet": unet, "text_encoder": text_encoder}


def module_counts(components: dict) -> str:
    return json.dumps(
        {name: adapter_module_count(model, ADAPTER_NAME) for name, model in components.items()}, sort_keys=True
    )


def write_diffusers_file(components: dict, out_dir: Path) -> Path:
    """`pytorch_lora_weights.safetensors`: PEFT keys, the adapter configs and the trained module counts."""
    import safetensors
    import safetensors.torch
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        out_dir,
        weight_name=DIFFUSERS_WEIGHT_NAME,
        **{f"{name}_lora_layers": peft_state_dict(model) for name, model in components.items()},
        **{f"{name}_lora_adapter_metadata": adapter_metadata(model) for name, model in components.items()},
    )
    path = out_dir / DIFFUSERS_WEIGHT_NAME
    # save_lora_weights takes no metadata of ours: add the counts by writing the file again, then fix its header.
    with safetensors.safe_open(path, "pt") as file:
        metadata = file.metadata()
    safetensors.torch.save_file(
        safetensors.torch.load_file(path), path, metadata={**metadata, MODULE_COUNT_KEY: module_counts(components)}
    )
    canonicalise_safetensors(path)
    return path


def write_peft_file(components: dict, out_dir: Path) -> Path:
    """`peft_adapter_weights.safetensors`: `<component>.<PEFT key>`, the peft configs and the trained counts."""
    import safetensors.torch

    tensors = {
        f"{name}.{key}": weight.contiguous()
        for name, model in components.items()
        for key, weight in peft_state_dict(model).items()
    }
    configs = {name: adapter_metadata(model) for name, model in components.items()}
    path = out_dir / PEFT_WEIGHT_NAME
    safetensors.torch.save_file(
        tensors,
        path,
        metadata={ADAPTER_CONFIG_KEY: json.dumps(configs, sort_keys=True), MODULE_COUNT_KEY: module_counts(components)},
    )
    canonicalise_safetensors(path)
    return path


def export_lora(unet, out_dir: Path, params: LoraParams, base: dict, text_encoder=None) -> dict[str, Path]:
    """Write the UNet adapter (and the text encoder's, if given): LoRA as diffusers `pytorch_lora_weights.safetensors`
    (alpha in the adapter metadata), LoHa/LoKr as `peft_adapter_weights.safetensors`, and, unless it is a DoRA
    adapter, `<type>_kohya.safetensors`; return the paths written by kind ("diffusers" or "peft", "kohya")."""
    import safetensors.torch

    out_dir = Path(out_dir)
    components = components_of(unet, text_encoder)
    files = (
        {"diffusers": write_diffusers_file(components, out_dir)}
        if params.type == "lora"
        else {"peft": write_peft_file(components, out_dir)}
    )
    if params.use_dora:  # kohya's format and loaders have no magnitude vector: a file without it would be wrong
        print(
            f"export_lora: lora.use_dora is on; {kohya_weight_name(params.type)} not written (the kohya format "
            f"has no DoRA)"
        )
        return files
    files["kohya"] = out_dir / kohya_weight_name(params.type)
    safetensors.torch.save_file(
        kohya_state_dict(unet, params, text_encoder), files["kohya"], metadata=kohya_metadata(params, base)
    )
    canonicalise_safetensors(files["kohya"])
    return files


def adapter_file(lora_dir: Path) -> Path:
    """The peft-keyed file of `lora_dir`: exactly one of the diffusers and the peft file."""
    found = [
        Path(lora_dir) / name for name in (DIFFUSERS_WEIGHT_NAME, PEFT_WEIGHT_NAME) if (Path(lora_dir) / name).is_file()
    ]
    if len(found) != 1:
        raise UserError(
            f"{lora_dir}: expected one of {DIFFUSERS_WEIGHT_NAME} (LoRA) and {PEFT_WEIGHT_NAME} "
            f"(LoHa, LoKr), found {[path.name for path in found] or 'neither'}. Export it again: "
            f"dvc repro train_lora"
        )
    return found[0]


def file_metadata(path: Path) -> dict[str, str]:
    import safetensors

    with safetensors.safe_open(path, "pt") as file:
        return file.metadata() or {}


def trained_module_counts(path: Path) -> dict[str, int]:
    """The modules trained per component, as recorded in the file at export."""
    recorded = file_metadata(path).get(MODULE_COUNT_KEY)
    if recorded is None:
        raise UserError(
            f"{path}: no {MODULE_COUNT_KEY!r} metadata (the number of LoRA modules trained), so a "
            f"partial load could not be detected. Export it again with this version of lanskap: "
            f"dvc repro train_lora"
        )
    return json.loads(recorded)


def require_all_modules_loaded(pipeline, path: Path, adapter_name: str) -> None:
    """Fail unless every module trained (per the file's record) carries the loaded adapter in `pipeline`."""
    trained = trained_module_counts(path)
    loaded = {name: adapter_module_count(getattr(pipeline, name), adapter_name) for name in ("unet", "text_encoder")}
    if any(loaded[name] != trained.get(name, 0) for name in loaded):
        found = "; ".join(f"{name} {loaded[name]} of {trained.get(name, 0)}" for name in loaded)
        raise UserError(
            f"{path}: loading restored a different number of adapter modules than were trained "
            f"({found}), so the model would differ from the trained one. Export it again with this "
            f"version of lanskap (dvc repro train_lora); if train_lora wrote it just now, report a bug "
            f"with this message"
        )


def load_peft_file(pipeline, path: Path, adapter_name: str) -> None:
    """Inject each component's recorded peft config as `adapter_name` and set its tensors, failing unless the file
    holds exactly the tensors the injected adapter has."""
    import peft
    import safetensors.torch

    tensors = safetensors.torch.load_file(path)
    for name, config in json.loads(file_metadata(path)[ADAPTER_CONFIG_KEY]).items():
        model = getattr(pipeline, name)
        model.add_adapter(
            peft.PeftConfig.from_peft_type(**{**config, "inference_mode": True}), adapter_name=adapter_name
        )
        state = {key.removeprefix(f"{name}."): weight for key, weight in tensors.items() if key.startswith(f"{name}.")}
        peft.set_peft_model_state_dict(model, state, adapter_name=adapter_name)
        expected = peft_state_dict(model, adapter_name).keys()
        if expected != state.keys():
            raise UserError(
                f"{path}: the {name} tensors do not match the adapter its config describes "
                f"({len(state.keys() - expected)} unexpected, {len(expected - state.keys())} missing). "
                f"Export it again: dvc repro train_lora"
            )


def lora_weights_dir(lora_dir: Path, weights: str) -> Path:
    """The folder of the weights generate.lora_weights names: raw (the trained ones) or ema (their moving average,
    written only when train.ema_decay was set)."""
    if weights == "raw":
        return Path(lora_dir)
    ema_dir = Path(lora_dir) / EMA_SUBDIR
    if not any((ema_dir / name).is_file() for name in (DIFFUSERS_WEIGHT_NAME, PEFT_WEIGHT_NAME)):
        raise UserError(
            f"generate.lora_weights=ema but {ema_dir} holds no adapter file: the adapter was trained "
            "without an EMA. Set train.ema_decay (e.g. 0.99) and rerun train_lora, or set "
            "generate.lora_weights: raw"
        )
    return ema_dir


def load_lora_into_pipeline(pipeline, lora_dir: Path, scale: float) -> None:
    """Load the adapter exported to `lora_dir` (diffusers' loader for LoRA, peft for LoHa/LoKr) as adapter "lora",
    check that every trained module was restored, and apply it at `scale` (1.0: as trained)."""
    path = adapter_file(lora_dir)
    if path.name == DIFFUSERS_WEIGHT_NAME:  # the trained alpha / r comes from the file's adapter metadata
        pipeline.load_lora_weights(lora_dir, weight_name=DIFFUSERS_WEIGHT_NAME, adapter_name=LOADED_ADAPTER_NAME)
    else:
        load_peft_file(pipeline, path, LOADED_ADAPTER_NAME)
    require_all_modules_loaded(pipeline, path, LOADED_ADAPTER_NAME)
    pipeline.set_adapters([LOADED_ADAPTER_NAME], adapter_weights=[scale])


def require_lora_reloads(model_dir: Path, lora_dir: Path) -> None:
    """Load the exported adapter into a fresh copy of the base model (no VAE: it takes no adapter) the way generate
    does, and fail unless every trained module is restored."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        model_dir, vae=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    load_lora_into_pipeline(pipeline, lora_dir, scale=1.0)
