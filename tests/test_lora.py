"""LoRA export round trips on the tiny SD 2.x model, with alpha != rank so that a lost or wrong alpha shows, for every
documented target set: each trained module must come back, with its weights, through diffusers' own loader."""

import json
import re
import struct
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from lanskap.core.errors import UserError
from lanskap.core.io import canonicalise_safetensors
from lanskap.core.params import conf_group
from lanskap.lora.adapters import ADAPTER_NAME, LOADED_ADAPTER_NAME, adapter_module_count, add_lora, add_unet_lora
from lanskap.lora.files import (
    DIFFUSERS_WEIGHT_NAME,
    MODULE_COUNT_KEY,
    export_lora,
    load_lora_into_pipeline,
    require_lora_reloads,
)
from lanskap.lora.kohya import kohya_metadata, kohya_state_dict
from lanskap.models.resolve import BUILTIN_TINY_SD2, resolve_base_model

ROOT = Path(__file__).resolve().parents[1]
PARAMS = conf_group("lora", rank=4, alpha=8.0)  # scale alpha / r = 2: a loader that assumes alpha = r is off by 2x
BASE = {
    "model": BUILTIN_TINY_SD2,
    "revision": "n/a",
    "prediction_type": "v_prediction",
    "resolution": 64,
    "steps": 10,
    "train_images": 8,
    "data_sha256": "0" * 64,
}
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
WIDE = [*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_WITH_MLP = [*TEXT_ATTENTION, "fc1", "fc2"]
TARGET_SETS = {  # name -> (UNet targets, text-encoder targets; None: the text encoder is not trained)
    "unet attention": (ATTENTION, None),
    "unet wide": (WIDE, None),
    "text encoder attention": (ATTENTION, TEXT_ATTENTION),
    "text encoder with fc1/fc2": (WIDE, TEXT_WITH_MLP),
}
KOHYA_KEY = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
KOHYA_TEXT_KEY = re.compile(
    r"^lora_te_text_model_encoder_layers_\d+_(self_attn_[qkv]_proj|self_attn_out_proj"
    r"|mlp_fc[12])\.(lora_down\.weight|lora_up\.weight|alpha)$"
)
DIFFUSERS_KEY = re.compile(r"^(unet|text_encoder)\.[a-z0-9_.]+\.lora_[AB]\.weight$")  # PEFT naming, one way only
TINY_UNET_ATTENTION_LINEARS = 32  # (down 1 + mid 1 + up 2 transformer blocks) x (attn1, attn2) x (q, k, v, out)
TOKEN_IDS = torch.tensor([[49406, 320, 1215, 49407] + [49407] * 73])  # "<start> a photo <end>" padded to 77


def randomise_lora_b(model, generator) -> None:
    """Non-zero B matrices: the init leaves B = 0, a no-op that every format would round-trip."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def target_linears(model, targets: list[str]) -> dict[str, int]:
    """Module path -> in_features of every linear layer a target name selects (PEFT matches the path's suffix)."""
    suffixes = tuple(f".{name}" for name in targets)
    return {
        name: module.in_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(suffixes)
    }


def unet_inputs() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, 4, 16, 16, generator=generator),
        torch.tensor([500]),
        torch.randn(1, 8, 32, generator=generator),
    )  # latents, timestep, encoder_hidden_states


def with_and_without_adapter(model, *inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        lora_output = model(*inputs)[0]
        model.disable_adapters()
        base_output = model(*inputs)[0]
        model.enable_adapters()
    return lora_output, base_output


def train_and_export(model_dir: Path, name: str, out_dir: Path) -> dict:
    """A non-trivial LoRA on `name`'s target set (random B), its exported files, and the outputs with and without
    the adapter of the UNet (and the text encoder, when it is trained)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet_targets, text_targets = TARGET_SETS[name]
    params = conf_group(
        "lora",
        rank=4,
        alpha=8.0,
        target_modules=unet_targets,
        text_encoder_target_modules=text_targets or TEXT_ATTENTION,
    )
    generator = torch.Generator().manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", dtype=torch.float32)
    result = dict(
        unet=unet,
        params=params,
        targets={"unet": unet_targets},
        text_encoder=None,
        linears={"unet": target_linears(unet, unet_targets)},
    )
    add_lora(unet, params, unet_targets)
    randomise_lora_b(unet, generator)
    result["unet_outputs"] = with_and_without_adapter(unet, *unet_inputs())
    if text_targets is not None:
        text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", dtype=torch.float32)
        result["targets"]["text_encoder"] = text_targets
        result["linears"]["text_encoder"] = target_linears(text_encoder, text_targets)
        add_lora(text_encoder, params, text_targets)
        randomise_lora_b(text_encoder, generator)
        text_encoder.eval()
        result |= dict(text_encoder=text_encoder, text_outputs=with_and_without_adapter(text_encoder, TOKEN_IDS))
    result["files"] = export_lora(unet, out_dir, params, BASE, result["text_encoder"])
    return result


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return resolve_base_model(BUILTIN_TINY_SD2, None).path


@pytest.fixture(scope="module")
def export_of(model_dir, tmp_path_factory):
    """name -> `train_and_export` of that target set, each trained once per module."""
    exports = {}

    def get(name: str) -> dict:
        if name not in exports:
            exports[name] = train_and_export(model_dir, name, tmp_path_factory.mktemp("lora"))
        return exports[name]

    return get


@pytest.fixture(scope="module", params=list(TARGET_SETS))
def exported(request, export_of):
    return export_of(request.param)


@pytest.fixture(scope="module")
def trained(export_of):
    return export_of("unet attention")


def fresh_pipeline(model_dir):
    """The base pipeline in float32, as trained here (transformers would keep the shipped weights' float16)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32)


def unet_output(pipeline) -> torch.Tensor:
    with torch.no_grad():
        return pipeline.unet(*unet_inputs()).sample


def text_states(pipeline) -> torch.Tensor:
    with torch.no_grad():
        return pipeline.text_encoder(TOKEN_IDS)[0]


def test_target_sets_are_the_documented_ones():
    config = (ROOT / "conf/config.yaml").read_text()
    assert f"[{', '.join(WIDE)}]" in config  # the wider set, as conf/config.yaml's comment lists it
    assert "fc1, fc2" in config
    assert (conf_group("lora").target_modules, conf_group("lora").text_encoder_target_modules) == (
        ATTENTION,
        TEXT_ATTENTION,
    )


def test_adapters_change_the_outputs(exported):
    lora_output, base_output = exported["unet_outputs"]
    assert not torch.allclose(lora_output, base_output, atol=1e-3)
    if exported["text_encoder"] is not None:
        assert not torch.allclose(*exported["text_outputs"], atol=1e-3)


def adapter_state(model, adapter_name: str = LOADED_ADAPTER_NAME) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)


def test_diffusers_file_restores_every_trained_module_with_its_weights(exported, model_dir):
    pipeline = fresh_pipeline(model_dir)
    load_lora_into_pipeline(pipeline, exported["files"]["diffusers"].parent, scale=1.0)  # checks the counts too
    for name, linears in exported["linears"].items():
        trained_model, loaded_model = exported[name], getattr(pipeline, name)
        assert adapter_module_count(loaded_model, LOADED_ADAPTER_NAME) == adapter_module_count(
            trained_model, ADAPTER_NAME
        )
        assert adapter_module_count(loaded_model, LOADED_ADAPTER_NAME) == len(linears) > 0
        trained_state, loaded_state = adapter_state(trained_model, ADAPTER_NAME), adapter_state(loaded_model)
        assert loaded_state.keys() == trained_state.keys()
        assert all(torch.equal(loaded_state[key], trained_state[key]) for key in trained_state)
    assert torch.equal(unet_output(pipeline), exported["unet_outputs"][0])  # bit-identical: same r, alpha
    if exported["text_encoder"] is not None:
        assert torch.equal(text_states(pipeline), exported["text_outputs"][0])


def test_diffusers_file_is_named_one_way_and_records_the_trained_counts(exported):
    with safetensors.safe_open(exported["files"]["diffusers"], "pt") as file:
        keys = list(file.keys())
        counts = json.loads(file.metadata()[MODULE_COUNT_KEY])
    assert all(DIFFUSERS_KEY.match(key) for key in keys), [key for key in keys if not DIFFUSERS_KEY.match(key)]
    assert counts == {name: len(linears) for name, linears in exported["linears"].items()}
    expected = {
        f"{name}.{path}.lora_{kind}.weight"
        for name, linears in exported["linears"].items()
        for path in linears
        for kind in "AB"
    }
    assert set(keys) == expected


def test_kohya_file_covers_every_trained_module_and_reloads_identically(exported, model_dir):
    state = safetensors.torch.load_file(exported["files"]["kohya"])
    text_paths = [path.replace(".", "_") for path in exported["linears"].get("text_encoder", {})]
    expected = {"lora_unet_" + path.replace(".", "_") for path in exported["linears"]["unet"]}
    expected |= {"lora_te_text_model_" + path for path in text_paths}
    assert {key.split(".", 1)[0] for key in state} == expected and len(state) == 3 * len(expected)
    pipeline = fresh_pipeline(model_dir)
    pipeline.load_lora_weights(exported["files"]["kohya"].parent, weight_name=exported["files"]["kohya"].name)
    assert torch.equal(unet_output(pipeline), exported["unet_outputs"][0])
    if exported["text_encoder"] is not None:
        assert torch.equal(text_states(pipeline), exported["text_outputs"][0])


def test_diffusers_file_at_scale_zero_is_the_base_model(trained, model_dir):
    pipeline = fresh_pipeline(model_dir)
    load_lora_into_pipeline(pipeline, trained["files"]["diffusers"].parent, scale=0.0)
    torch.testing.assert_close(unet_output(pipeline), trained["unet_outputs"][1], rtol=0, atol=1e-6)


def without_module(source: Path, destination: Path, module: str) -> None:
    """A copy of a diffusers file, metadata and all, without the tensors of one module."""
    with safetensors.safe_open(source, "pt") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key) for key in file.keys() if not key.startswith(f"{module}.")}  # noqa: SIM118
    safetensors.torch.save_file(tensors, destination / DIFFUSERS_WEIGHT_NAME, metadata=metadata)


def test_a_dropped_module_fails_generate_and_export_loudly(trained, model_dir, tmp_path):
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    without_module(trained["files"]["diffusers"], tmp_path, module)
    with pytest.raises(UserError, match="unet 31 of 32; text_encoder 0 of 0"):
        load_lora_into_pipeline(fresh_pipeline(model_dir), tmp_path, scale=1.0)  # what generate calls
    with pytest.raises(UserError, match="unet 31 of 32"):
        require_lora_reloads(model_dir, tmp_path)  # what train_lora calls after export
    require_lora_reloads(model_dir, trained["files"]["diffusers"].parent)  # negative control: the complete file


def test_the_old_mixed_naming_is_caught(export_of, model_dir, tmp_path):
    """The file as lanskap wrote it before: `convert_state_dict_to_diffusers` renames the attention modules only, and
    diffusers then restores 16 of the 48 modules of the wider set, without a word."""
    from diffusers.utils import convert_state_dict_to_diffusers

    source = export_of("unet wide")["files"]["diffusers"]
    with safetensors.safe_open(source, "pt") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (safe_open is not iterable)
    mixed = {
        f"unet.{key}": value
        for key, value in convert_state_dict_to_diffusers(
            {key.removeprefix("unet."): value for key, value in tensors.items()}
        ).items()
    }
    safetensors.torch.save_file(mixed, tmp_path / DIFFUSERS_WEIGHT_NAME, metadata=metadata)
    canonicalise_safetensors(tmp_path / DIFFUSERS_WEIGHT_NAME)
    with pytest.raises(UserError, match="unet 16 of 48"):
        load_lora_into_pipeline(fresh_pipeline(model_dir), tmp_path, scale=1.0)


def test_a_file_without_the_module_count_is_refused(trained, model_dir, tmp_path):
    safetensors.torch.save_file(
        safetensors.torch.load_file(trained["files"]["diffusers"]), tmp_path / DIFFUSERS_WEIGHT_NAME
    )
    with pytest.raises(UserError, match=f"no '{MODULE_COUNT_KEY}' metadata.*dvc repro train_lora"):
        load_lora_into_pipeline(fresh_pipeline(model_dir), tmp_path, scale=1.0)


def test_diffusers_file_without_adapter_metadata_loads_at_the_wrong_strength(trained, model_dir, tmp_path):
    safetensors.torch.save_file(
        safetensors.torch.load_file(trained["files"]["diffusers"]), tmp_path / DIFFUSERS_WEIGHT_NAME
    )
    pipeline = fresh_pipeline(model_dir)
    pipeline.load_lora_weights(tmp_path, weight_name=DIFFUSERS_WEIGHT_NAME)
    assert not torch.allclose(unet_output(pipeline), trained["unet_outputs"][0], atol=1e-3)


def test_adapter_metadata(exported):
    with safetensors.safe_open(exported["files"]["diffusers"], "pt") as file:
        adapter = json.loads(file.metadata()["lora_adapter_metadata"])
    for name, targets in exported["targets"].items():
        assert (adapter[f"{name}.r"], adapter[f"{name}.lora_alpha"]) == (4, 8.0)
        assert adapter[f"{name}.target_modules"] == sorted(targets)  # a list in a fixed order, not a set


def test_canonical_safetensors_header_is_independent_of_key_order_and_still_loads(trained, tmp_path):
    """The library writes its header in hash-map order, which changes per process; canonicalised, the same tensors
    and metadata give the same bytes."""
    original = trained["files"]["kohya"].read_bytes()
    (length,) = struct.unpack("<Q", original[:8])
    header = json.loads(original[8 : 8 + length])
    reordered = {key: header[key] for key in reversed(list(header))}
    reordered["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    text = json.dumps(reordered).encode()
    copies = {"as_written": original, "reordered": struct.pack("<Q", len(text)) + text + original[8 + length :]}
    for name, data in copies.items():
        (tmp_path / f"{name}.safetensors").write_bytes(data)
        canonicalise_safetensors(tmp_path / f"{name}.safetensors")
    assert (tmp_path / "as_written.safetensors").read_bytes() == (tmp_path / "reordered.safetensors").read_bytes()
    loaded = safetensors.torch.load_file(tmp_path / "reordered.safetensors")
    expected = safetensors.torch.load_file(trained["files"]["kohya"])
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[key], expected[key]) for key in loaded)
    with safetensors.safe_open(tmp_path / "reordered.safetensors", "pt") as file:
        assert file.metadata() == header["__metadata__"]


def test_kohya_golden_keys(exported):
    state = safetensors.torch.load_file(exported["files"]["kohya"])
    assert state.keys() == kohya_state_dict(exported["unet"], exported["params"], exported["text_encoder"]).keys()
    unet_keys = [key for key in state if key.startswith("lora_unet_")]
    text_keys = [key for key in state if not key.startswith("lora_unet_")]
    assert all(KOHYA_KEY.match(key) for key in unet_keys), [key for key in unet_keys if not KOHYA_KEY.match(key)]
    assert all(KOHYA_TEXT_KEY.match(key) for key in text_keys), [k for k in text_keys if not KOHYA_TEXT_KEY.match(k)]
    for key, value in state.items():
        if key.endswith(".alpha"):
            assert value.shape == () and value.dtype == torch.float32 and value.item() == 8.0, key
    linears = exported["linears"]["unet"]
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert state[f"lora_unet_{path.replace('.', '_')}.lora_down.weight"].shape == (4, linears[path])


@pytest.mark.parametrize(
    ("prediction_type", "base_version", "modelspec"),
    [("v_prediction", "sd_v2_v", "v"), ("epsilon", "sd_v2", "epsilon")],
)
def test_kohya_metadata(trained, prediction_type, base_version, modelspec):
    metadata = kohya_metadata(PARAMS, {**BASE, "prediction_type": prediction_type})
    assert all(isinstance(value, str) for value in metadata.values())
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"], metadata["ss_v2"]) == ("4", "8.0", "True")
    assert metadata["ss_base_model_version"] == base_version
    assert metadata["modelspec.prediction_type"] == modelspec
    assert metadata["modelspec.resolution"] == "64x64"
    if prediction_type == BASE["prediction_type"]:
        with safetensors.safe_open(trained["files"]["kohya"], "pt") as file:
            assert file.metadata() == metadata


def test_kohya_metadata_rejects_a_non_sd2_prediction_type():
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        kohya_metadata(PARAMS, {**BASE, "prediction_type": "sample"})


def test_lora_params_are_float32_on_a_bf16_unet(model_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=torch.bfloat16)
    trainable = add_unet_lora(unet, PARAMS)
    lora_parameters = [parameter for name, parameter in unet.named_parameters() if ".lora_" in name]
    assert len(trainable) == len(lora_parameters) == 2 * TINY_UNET_ATTENTION_LINEARS
    assert {id(parameter) for parameter in trainable} == {id(parameter) for parameter in lora_parameters}
    assert all(parameter.dtype == torch.float32 and parameter.requires_grad for parameter in trainable)
    assert unet.conv_in.weight.dtype == torch.bfloat16 and not unet.conv_in.weight.requires_grad


def test_dora_diffusers_file_reloads_identically(model_dir, tmp_path):
    """DoRA has no kohya form (the file is skipped), so its diffusers file must carry everything, magnitudes too."""
    from diffusers import UNet2DConditionModel

    params = conf_group("lora", rank=4, alpha=8.0, use_dora=True)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", dtype=torch.float32)
    add_unet_lora(unet, params)
    generator = torch.Generator().manual_seed(2)
    randomise_lora_b(unet, generator)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.1 * torch.randn(parameter.shape, generator=generator))
        expected = unet.eval()(*unet_inputs()).sample
    export_lora(unet, tmp_path, params, BASE)
    pipeline = fresh_pipeline(model_dir)
    load_lora_into_pipeline(pipeline, tmp_path, scale=1.0)
    assert torch.equal(unet_output(pipeline), expected)
