"""LoRA export round trips on the tiny SD 2.x model, with alpha != rank so that a lost or wrong alpha shows."""

import json
import re
import struct

import pytest
import safetensors
import safetensors.torch
import torch

from lanskap.lora import (add_lora, add_unet_lora, diffusers_lora_layers, export_lora, kohya_metadata,
                          kohya_state_dict, load_lora_into_pipeline)
from lanskap.io import canonicalise_safetensors
from lanskap.models import BUILTIN_TINY_SD2, resolve_base_model
from lanskap.params import LoraParams

PARAMS = LoraParams(rank=4, alpha=8.0)  # scale alpha / r = 2: a loader that assumes alpha = r is off by 2x
BASE = {"model": BUILTIN_TINY_SD2, "revision": "n/a", "prediction_type": "v_prediction", "resolution": 64,
        "steps": 10, "train_images": 8, "data_sha256": "0" * 64}
KOHYA_KEY = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
TINY_UNET_ATTENTION_LINEARS = 32  # (down 1 + mid 1 + up 2 transformer blocks) x (attn1, attn2) x (q, k, v, out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny UNet with a non-trivial LoRA (random B: the gaussian init leaves B = 0, a no-op every format would
    round-trip), its exported files, fixed inputs and the UNet outputs with and without the adapter."""
    from diffusers import UNet2DConditionModel

    model_dir = resolve_base_model(BUILTIN_TINY_SD2, None).path
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    targets = tuple(f".{name}" for name in PARAMS.target_modules)
    attention_linears = {name: module.in_features for name, module in unet.named_modules()
                         if isinstance(module, torch.nn.Linear) and name.endswith(targets)}
    add_unet_lora(unet, PARAMS)
    generator = torch.Generator().manual_seed(0)
    randomise_lora_b(unet, generator)
    inputs = (torch.randn(1, 4, 16, 16, generator=generator), torch.tensor([500]),
              torch.randn(1, 8, 32, generator=generator))  # latents, timestep, encoder_hidden_states
    with torch.no_grad():
        lora_output = unet(*inputs).sample
        unet.disable_adapters()
        base_output = unet(*inputs).sample
        unet.enable_adapters()
    files = export_lora(unet, tmp_path_factory.mktemp("lora"), PARAMS, BASE)
    return dict(unet=unet, model_dir=model_dir, attention_linears=attention_linears, inputs=inputs, files=files,
                lora_output=lora_output, base_output=base_output)


def fresh_pipeline(trained):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(trained["model_dir"])


def unet_output(pipeline, trained) -> torch.Tensor:
    with torch.no_grad():
        return pipeline.unet(*trained["inputs"]).sample


def test_adapter_changes_the_unet_output(trained):
    assert not torch.allclose(trained["lora_output"], trained["base_output"], atol=1e-3)


def test_diffusers_file_reloads_identically(trained):
    pipeline = fresh_pipeline(trained)
    load_lora_into_pipeline(pipeline, trained["files"]["diffusers"].parent, scale=1.0)
    assert torch.equal(unet_output(pipeline, trained), trained["lora_output"])  # bit-identical: same r, alpha
    pipeline.set_adapters(["lora"], adapter_weights=[0.0])  # scale 0: the base model again
    torch.testing.assert_close(unet_output(pipeline, trained), trained["base_output"], rtol=0, atol=1e-6)


def test_kohya_file_reloads_identically_in_diffusers(trained):
    pipeline = fresh_pipeline(trained)
    pipeline.load_lora_weights(trained["files"]["kohya"].parent, weight_name=trained["files"]["kohya"].name)
    assert torch.equal(unet_output(pipeline, trained), trained["lora_output"])


def test_diffusers_file_without_adapter_metadata_loads_at_the_wrong_strength(trained, tmp_path):
    stripped = tmp_path / "pytorch_lora_weights.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(trained["files"]["diffusers"]), stripped)
    pipeline = fresh_pipeline(trained)
    load_lora_into_pipeline(pipeline, tmp_path, scale=1.0)
    assert not torch.allclose(unet_output(pipeline, trained), trained["lora_output"], atol=1e-3)


def test_diffusers_keys_and_adapter_metadata(trained):
    linears = trained["attention_linears"]
    expected = {f"unet.{path}.lora.{kind}.weight" for path in linears for kind in ("down", "up")}
    assert set(diffusers_lora_layers(trained["unet"])) == {key.removeprefix("unet.") for key in expected}
    with safetensors.safe_open(trained["files"]["diffusers"], "pt") as file:
        assert set(file.keys()) == expected
        adapter = json.loads(file.metadata()["lora_adapter_metadata"])
    assert (adapter["unet.r"], adapter["unet.lora_alpha"]) == (4, 8.0)
    assert adapter["unet.target_modules"] == sorted(PARAMS.target_modules)  # a list in a fixed order, not a set


def test_canonical_safetensors_header_is_independent_of_key_order_and_still_loads(trained, tmp_path):
    """The library writes its header in hash-map order, which changes per process; canonicalised, the same tensors
    and metadata give the same bytes."""
    original = trained["files"]["kohya"].read_bytes()
    (length,) = struct.unpack("<Q", original[:8])
    header = json.loads(original[8:8 + length])
    reordered = {key: header[key] for key in reversed(list(header))}
    reordered["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    text = json.dumps(reordered).encode()
    copies = {"as_written": original, "reordered": struct.pack("<Q", len(text)) + text + original[8 + length:]}
    for name, data in copies.items():
        (tmp_path / f"{name}.safetensors").write_bytes(data)
        canonicalise_safetensors(tmp_path / f"{name}.safetensors")
    assert (tmp_path / "as_written.safetensors").read_bytes() == (tmp_path / "reordered.safetensors").read_bytes()
    loaded = safetensors.torch.load_file(tmp_path / "reordered.safetensors")
    expected = safetensors.torch.load_file(trained["files"]["kohya"])
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[key], expected[key]) for key in loaded)
    with safetensors.safe_open(tmp_path / "reordered.safetensors", "pt") as file:
        assert file.metadata() == header["__metadata__"]


def test_kohya_golden_keys(trained):
    linears = trained["attention_linears"]
    assert len(linears) == TINY_UNET_ATTENTION_LINEARS
    state = safetensors.torch.load_file(trained["files"]["kohya"])
    assert state.keys() == kohya_state_dict(trained["unet"], PARAMS).keys()
    modules = {key.split(".", 1)[0] for key in state}  # with KOHYA_KEY: no "." inside a module name
    assert len(modules) == len(linears) and len(state) == 3 * len(linears)
    assert modules == {"lora_unet_" + path.replace(".", "_") for path in linears}
    assert all(KOHYA_KEY.match(key) for key in state), [key for key in state if not KOHYA_KEY.match(key)]
    for key, value in state.items():
        if key.endswith(".alpha"):
            assert value.shape == () and value.dtype == torch.float32 and value.item() == 8.0, key
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    down = state[f"lora_unet_{path.replace('.', '_')}.lora_down.weight"]
    assert down.shape == (4, linears[path])


@pytest.mark.parametrize("prediction_type, base_version, modelspec", [
    ("v_prediction", "sd_v2_v", "v"), ("epsilon", "sd_v2", "epsilon")])
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


def test_lora_params_are_float32_on_a_bf16_unet(trained):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(trained["model_dir"], subfolder="unet", torch_dtype=torch.bfloat16)
    trainable = add_unet_lora(unet, PARAMS)
    lora_parameters = [parameter for name, parameter in unet.named_parameters() if ".lora_" in name]
    assert len(trainable) == len(lora_parameters) == 2 * TINY_UNET_ATTENTION_LINEARS
    assert {id(parameter) for parameter in trainable} == {id(parameter) for parameter in lora_parameters}
    assert all(parameter.dtype == torch.float32 and parameter.requires_grad for parameter in trainable)
    assert unet.conv_in.weight.dtype == torch.bfloat16 and not unet.conv_in.weight.requires_grad


KOHYA_TEXT_KEY = re.compile(
    r"^lora_te_text_model_encoder_layers_\d+_(self_attn_[qkv]_proj|self_attn_out_proj)\.(lora_down\.weight|lora_up"
    r"\.weight|alpha)$")


def randomise_lora_b(model, generator) -> None:
    """Non-zero B matrices: the init leaves B = 0, a no-op that every format would round-trip."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module")
def trained_text_encoder(trained, tmp_path_factory):
    """The trained UNet plus a text encoder with a non-trivial LoRA, exported together, and text-encoder outputs."""
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(trained["model_dir"], subfolder="text_encoder")
    token_ids = torch.tensor([[49406, 320, 1215, 49407] + [49407] * 73])  # "<start> a photo <end>" padded to 77
    add_lora(text_encoder, PARAMS, PARAMS.text_encoder_target_modules)
    randomise_lora_b(text_encoder, torch.Generator().manual_seed(1))
    text_encoder.eval()
    with torch.no_grad():
        lora_states = text_encoder(token_ids)[0]
    files = export_lora(trained["unet"], tmp_path_factory.mktemp("lora-te"), PARAMS, BASE, text_encoder)
    return dict(text_encoder=text_encoder, token_ids=token_ids, lora_states=lora_states, files=files)


def text_states(pipeline, token_ids) -> torch.Tensor:
    with torch.no_grad():
        return pipeline.text_encoder(token_ids)[0]


def test_text_encoder_adapter_changes_its_output(trained, trained_text_encoder):
    base_states = text_states(fresh_pipeline(trained), trained_text_encoder["token_ids"])
    assert not torch.allclose(base_states, trained_text_encoder["lora_states"], atol=1e-3)


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_text_encoder_lora_reloads_identically_in_diffusers(trained, trained_text_encoder, kind):
    path = trained_text_encoder["files"][kind]
    pipeline = fresh_pipeline(trained)
    pipeline.load_lora_weights(path.parent, weight_name=path.name)
    assert torch.equal(text_states(pipeline, trained_text_encoder["token_ids"]), trained_text_encoder["lora_states"])
    assert torch.equal(unet_output(pipeline, trained), trained["lora_output"])


def test_text_encoder_golden_keys(trained, trained_text_encoder):
    layers = trained_text_encoder["text_encoder"].config.num_hidden_layers
    with safetensors.safe_open(trained_text_encoder["files"]["diffusers"], "pt") as file:
        text_keys = [key for key in file.keys() if key.startswith("text_encoder.")]
        adapter = json.loads(file.metadata()["lora_adapter_metadata"])
    assert len(text_keys) == 2 * 4 * layers  # (down, up) x (q, k, v, out) x layers
    assert (adapter["text_encoder.r"], adapter["text_encoder.lora_alpha"]) == (4, 8.0)
    kohya = safetensors.torch.load_file(trained_text_encoder["files"]["kohya"])
    text_kohya = [key for key in kohya if key.startswith("lora_te")]
    assert len(text_kohya) == 3 * 4 * layers and all(KOHYA_TEXT_KEY.match(key) for key in text_kohya), text_kohya
    assert len(kohya) - len(text_kohya) == 3 * TINY_UNET_ATTENTION_LINEARS
    assert all(kohya[key].item() == 8.0 for key in text_kohya if key.endswith(".alpha"))


def test_dora_diffusers_file_reloads_identically(trained, tmp_path):
    """DoRA has no kohya form (the file is skipped), so its diffusers file must carry everything, magnitudes too."""
    from diffusers import UNet2DConditionModel

    params = LoraParams(rank=4, alpha=8.0, use_dora=True)
    unet = UNet2DConditionModel.from_pretrained(trained["model_dir"], subfolder="unet")
    add_unet_lora(unet, params)
    generator = torch.Generator().manual_seed(2)
    randomise_lora_b(unet, generator)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.1 * torch.randn(parameter.shape, generator=generator))
        expected = unet.eval()(*trained["inputs"]).sample
    export_lora(unet, tmp_path, params, BASE)
    pipeline = fresh_pipeline(trained)
    load_lora_into_pipeline(pipeline, tmp_path, scale=1.0)
    assert torch.equal(unet_output(pipeline, trained), expected)
