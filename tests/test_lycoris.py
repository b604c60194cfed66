"""LoHa and LoKr (lora.type=loha/lokr): peft adapters exported under LyCORIS names for AUTOMATIC1111 and ComfyUI,
checked module by module against an independent implementation of those loaders' formulas, and reloaded through
peft as generate loads them. Every case has alpha != rank, so a lost or misread alpha shows."""

import json
import re
import shutil
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from lanskap.core.errors import UserError
from lanskap.core.params import conf_group
from lanskap.lora.adapters import ADAPTER_NAME, add_lora
from lanskap.lora.files import DIFFUSERS_WEIGHT_NAME, PEFT_WEIGHT_NAME, export_lora, load_lora_into_pipeline
from lanskap.lora.kohya import kohya_weight_name
from lanskap.models.resolve import BUILTIN_TINY_SD2, resolve_base_model
from stages import generate, train_lora
from tests.conftest import GENERATE_ARGS, TRAIN_ARGS, write_params
from tests.test_data_stages import run_data_stages
from tests.test_lora import ATTENTION, BASE, TEXT_WITH_MLP, WIDE, unet_inputs, with_and_without_adapter

HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
FULL_FULL, FULL_LOW = ("lokr_w1", "lokr_w2"), ("lokr_w1", "lokr_w2_a", "lokr_w2_b")
LOW_LOW = ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")
CASES = {  # name -> (lora params, UNet targets, text-encoder targets or None, conv projections, tensor layouts)
    "loha wide, text encoder": (dict(type="loha", rank=4, alpha=8.0), WIDE, TEXT_WITH_MLP, False, {HADA}),
    # rank 4: both factors full on the 32- and 64-wide layers, the second low-rank on ff.net's 256/512-wide ones
    "lokr wide, text encoder": (
        dict(type="lokr", rank=4, alpha=8.0),
        WIDE,
        TEXT_WITH_MLP,
        False,
        {FULL_FULL, FULL_LOW},
    ),
    "lokr decompose_both": (dict(type="lokr", rank=1, alpha=2.0, decompose_both=True), WIDE, None, False, {LOW_LOW}),
    "lokr decompose_factor 4": (
        dict(type="lokr", rank=2, alpha=6.0, decompose_factor=4),
        ATTENTION,
        None,
        False,
        {FULL_LOW},
    ),
    # SD 1.x-style transformer blocks (use_linear_projection: false): 1x1-conv proj_in/proj_out; SD 2.x and the
    # built-in model use linear ones. LoKr at rank 4 keeps w2 a full conv kernel [b, d, 1, 1].
    "loha conv projections": (
        dict(type="loha", rank=4, alpha=8.0),
        ["proj_in", "proj_out", "to_q"],
        None,
        True,
        {HADA},
    ),
    "lokr conv projections": (
        dict(type="lokr", rank=4, alpha=8.0),
        ["proj_in", "proj_out", "to_q"],
        None,
        True,
        {FULL_FULL},
    ),
}
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}
LYCORIS_KEY = {
    "loha": re.compile(r"^lora_(unet|te_text_model)_[a-z0-9_]+\.(hada_w[12]_[ab]|alpha)$"),
    "lokr": re.compile(r"^lora_(unet|te_text_model)_[a-z0-9_]+\.(lokr_w[12](_[ab])?|alpha)$"),
}
TOKEN_IDS = torch.tensor([[49406, 320, 1215, 49407] + [49407] * 73])  # "<start> a photo <end>" padded to 77


def loader_delta(tensors: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """The weight delta ComfyUI's and AUTOMATIC1111's LoHa/LoKr loaders add at strength 1, from one module's
    exported tensors (written from their formulas, independently of lanskap)."""
    alpha = tensors["alpha"].item()
    if "hada_w1_a" in tensors:  # Hadamard product of two low-rank products, scale alpha / rank
        product = (tensors["hada_w1_a"] @ tensors["hada_w1_b"]) * (tensors["hada_w2_a"] @ tensors["hada_w2_b"])
        return product.reshape(shape) * (alpha / tensors["hada_w1_b"].shape[0])
    rank = None  # the rank of a low-rank factor, w2's over w1's; none when both factors are full matrices
    w1 = tensors.get("lokr_w1")
    if w1 is None:
        w1, rank = tensors["lokr_w1_a"] @ tensors["lokr_w1_b"], tensors["lokr_w1_b"].shape[0]
    w2 = tensors.get("lokr_w2")
    if w2 is None:
        w2, rank = tensors["lokr_w2_a"] @ tensors["lokr_w2_b"], tensors["lokr_w2_b"].shape[0]
    if w2.dim() == 4:  # a full conv-kernel factor
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape) * (1.0 if rank is None else alpha / rank)


def modules_in(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A kohya-format state dict -> {module name: {tensor name: tensor}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, tensor_name = key.split(".", 1)
        modules.setdefault(module, {})[tensor_name] = tensor
    return modules


def adapted_layers(model, prefix: str) -> dict[str, torch.nn.Module]:
    """kohya module name -> peft layer, for every layer carrying the trained adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        prefix + path.replace(".", "_"): module
        for path, module in model.named_modules()
        if isinstance(module, BaseTunerLayer) and ADAPTER_NAME in module.r
    }


def targeted_layers(model, targets: list[str]) -> dict[str, type]:
    """Module path -> type of every linear or conv layer a target name selects (peft matches the path's suffix)."""
    suffixes = tuple(f".{name}" for name in targets)
    return {
        name: type(module)
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(suffixes)
    }


def randomise_adapter(model, generator) -> None:
    """Every adapter tensor random: the init zeroes one factor, a no-op that any format would round-trip."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return resolve_base_model(BUILTIN_TINY_SD2, None).path


@pytest.fixture(scope="module")
def conv_model_dir(model_dir, tmp_path_factory) -> Path:
    """The built-in model with an SD 1.x-style UNet: 1x1-conv proj_in/proj_out (random weights, seeded)."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("conv-model") / "model"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("unet"))
    torch.manual_seed(0)
    config = UNet2DConditionModel.load_config(model_dir, subfolder="unet")
    UNet2DConditionModel.from_config({**config, "use_linear_projection": False}).save_pretrained(folder / "unet")
    return folder


def export_case(name: str, model_dir: Path, conv_model_dir: Path, out_dir: Path) -> dict:
    """A random adapter of case `name` on the UNet (and the text encoder), the outputs with and without it, and
    the exported files."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    values, unet_targets, text_targets, conv, _ = CASES[name]
    params = conf_group("lora", **values, target_modules=unet_targets)
    folder = conv_model_dir if conv else model_dir
    targets = {"unet": unet_targets} | ({} if text_targets is None else {"text_encoder": text_targets})
    loaders = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}
    result = dict(case=name, params=params, model_dir=folder, models={}, targeted={}, outputs={})
    generator = torch.Generator().manual_seed(1)
    for component, component_targets in targets.items():
        model = loaders[component].from_pretrained(folder, subfolder=component, dtype=torch.float32)
        result["targeted"][component] = targeted_layers(model, component_targets)
        add_lora(model, params, component_targets)
        randomise_adapter(model, generator)
        result["models"][component] = model.eval()
        inputs = unet_inputs() if component == "unet" else [TOKEN_IDS]
        result["outputs"][component] = with_and_without_adapter(model, *inputs)
    result["files"] = export_lora(result["models"]["unet"], out_dir, params, BASE, result["models"].get("text_encoder"))
    return result


@pytest.fixture(scope="module")
def export_of(model_dir, conv_model_dir, tmp_path_factory):
    """name -> `export_case` of that case, each exported once per module."""
    exports = {}

    def get(name: str) -> dict:
        if name not in exports:
            exports[name] = export_case(name, model_dir, conv_model_dir, tmp_path_factory.mktemp("lycoris"))
        return exports[name]

    return get


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, export_of) -> dict:
    return export_of(request.param)


def kohya_modules(exported) -> dict[str, dict[str, torch.Tensor]]:
    return modules_in(safetensors.torch.load_file(exported["files"]["kohya"]))


def test_every_module_delta_as_the_loaders_compute_it_is_peft_s(exported):
    """The delta AUTOMATIC1111 and ComfyUI add to each weight equals the one peft trained with, for every module
    trained and no other."""
    modules = kohya_modules(exported)
    layers = {
        name: layer
        for component, model in exported["models"].items()
        for name, layer in adapted_layers(model, PREFIXES[component]).items()
    }
    targeted = sum(len(paths) for paths in exported["targeted"].values())
    assert modules.keys() == layers.keys() and len(layers) == targeted > 0
    for name, layer in layers.items():
        with torch.no_grad():
            trained = layer.get_delta_weight(ADAPTER_NAME)
            loaded = loader_delta(modules[name], layer.get_base_layer().weight.shape)
        torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-6, msg=name)
        assert trained.abs().max() > 1e-3, name  # not a vacuous zero


def test_the_case_covers_its_layer_types_and_factor_layouts(exported):
    _, _, _, conv, layouts = CASES[exported["case"]]
    kinds = {kind for paths in exported["targeted"].values() for kind in paths.values()}
    assert kinds == ({torch.nn.Conv2d, torch.nn.Linear} if conv else {torch.nn.Linear})
    modules = kohya_modules(exported)
    assert {tuple(sorted(set(tensors) - {"alpha"})) for tensors in modules.values()} == layouts
    if exported["case"] == "lokr conv projections":  # the conv-kernel factor, which the loaders reshape with w1
        assert any(tensors["lokr_w2"].dim() == 4 for tensors in modules.values())


@pytest.mark.parametrize("case", [name for name, spec in CASES.items() if FULL_FULL in spec[4]])
def test_lokr_with_both_factors_full_needs_the_scale_folded_into_w1(export_of, case):
    """Negative control: with both LoKr factors full, the loaders apply scale 1 whatever alpha says, so peft's
    tensors written as they are (with the trained alpha) would load at 1 / (alpha / rank) of the trained strength."""
    exported = export_of(case)
    params, unet = exported["params"], exported["models"]["unet"]
    name, layer = next(
        (name, layer)
        for name, layer in adapted_layers(unet, "lora_unet_").items()
        if ADAPTER_NAME in layer.lokr_w1 and ADAPTER_NAME in layer.lokr_w2
    )
    raw = {
        "lokr_w1": layer.lokr_w1[ADAPTER_NAME].detach(),
        "lokr_w2": layer.lokr_w2[ADAPTER_NAME].detach(),
        "alpha": torch.tensor(params.alpha),
    }
    with torch.no_grad():
        trained = layer.get_delta_weight(ADAPTER_NAME)
    shape = layer.get_base_layer().weight.shape
    torch.testing.assert_close(loader_delta(raw, shape) * (params.alpha / params.rank), trained)
    assert not torch.allclose(loader_delta(raw, shape), trained)
    assert kohya_modules(exported)[name]["alpha"].item() == params.rank


def test_lycoris_keys_alpha_and_metadata(exported):
    params = exported["params"]
    assert exported["files"]["kohya"].name == f"{params.type}_kohya.safetensors"
    assert DIFFUSERS_WEIGHT_NAME not in [path.name for path in exported["files"].values()]
    state = safetensors.torch.load_file(exported["files"]["kohya"])
    assert all(LYCORIS_KEY[params.type].match(key) for key in state), [
        key for key in state if not LYCORIS_KEY[params.type].match(key)
    ]
    assert all(state[key].shape == () and state[key].dtype == torch.float32 for key in state if key.endswith(".alpha"))
    with safetensors.safe_open(exported["files"]["kohya"], "pt") as file:
        metadata = file.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["algo"] == params.type
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (str(params.rank), str(params.alpha))


def fresh_pipeline(model_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32)


def reloaded_outputs(pipeline) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"unet": pipeline.unet(*unet_inputs()).sample, "text_encoder": pipeline.text_encoder(TOKEN_IDS)[0]}


def test_peft_file_reloads_as_trained_and_at_scale_zero_as_the_base(exported):
    """What generate does: the peft file into a fresh pipeline (every module and tensor checked) gives the trained
    outputs, bit for bit; at lora_scale 0, the base model's."""
    pipeline = fresh_pipeline(exported["model_dir"])
    load_lora_into_pipeline(pipeline, exported["files"]["peft"].parent, scale=1.0)
    reloaded = reloaded_outputs(pipeline)
    for name, (adapted, _) in exported["outputs"].items():
        assert torch.equal(reloaded[name], adapted), name
    pipeline.set_adapters(["lora"], adapter_weights=[0.0])
    torch.testing.assert_close(reloaded_outputs(pipeline)["unet"], exported["outputs"]["unet"][1], rtol=0, atol=1e-6)


def test_a_peft_file_missing_a_module_fails_loudly(export_of, tmp_path):
    """Injection follows the config, so a module's lost tensors would leave it at its random init: refused."""
    exported = export_of("lokr wide, text encoder")
    path = exported["files"]["peft"]
    with safetensors.safe_open(path, "pt") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (safe_open is not iterable)
    dropped = next(key for key in tensors if key.startswith("unet.")).rsplit(".", 1)[0]  # one UNet module
    safetensors.torch.save_file(
        {key: value for key, value in tensors.items() if not key.startswith(dropped + ".")},
        tmp_path / PEFT_WEIGHT_NAME,
        metadata=metadata,
    )
    with pytest.raises(UserError, match=r"unet tensors do not match .* missing"):
        load_lora_into_pipeline(fresh_pipeline(exported["model_dir"]), tmp_path, scale=1.0)


def test_the_adapter_file_must_be_one_of_the_two(tmp_path, model_dir):
    with pytest.raises(UserError, match="found neither"):
        load_lora_into_pipeline(fresh_pipeline(model_dir), tmp_path, scale=1.0)
    for name in (DIFFUSERS_WEIGHT_NAME, PEFT_WEIGHT_NAME):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(UserError, match="found .*pytorch_lora_weights.*peft_adapter_weights"):
        load_lora_into_pipeline(fresh_pipeline(model_dir), tmp_path, scale=1.0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("adapter_type", "title", "lora_values", "train_values"),
    [
        ("loha", "LoHa", {}, {"text_encoder_learning_rate": 1.0e-3}),  # the text encoder too
        ("lokr", "LoKr", {"decompose_both": True}, {}),
    ],
)
def test_train_and_generate_end_to_end(workdir, project_params, adapter_type, title, lora_values, train_values):
    """train_lora trains the adapter type and writes its files; generate loads them (checked) and the images
    change."""
    import pandas as pd
    from PIL import Image

    params = {
        **project_params,
        "lora": {**project_params["lora"], "type": adapter_type, **lora_values},
        "train": {**project_params["train"], **train_values},
    }
    write_params(workdir, params)
    run_data_stages(workdir)
    train_lora.main(TRAIN_ARGS)
    out = workdir / "models/lora"
    assert sorted(path.name for path in out.iterdir()) == sorted(
        ["README.md", PEFT_WEIGHT_NAME, kohya_weight_name(adapter_type)]
    )
    assert (out / "README.md").read_text().startswith(f"# {title} for ")
    with safetensors.safe_open(out / PEFT_WEIGHT_NAME, "pt") as file:
        counts = json.loads(file.metadata()["lanskap_lora_modules"])
    assert set(counts) == ({"unet", "text_encoder"} if train_values else {"unet"}) and all(counts.values())
    generate.main(GENERATE_ARGS)
    index = pd.read_csv(workdir / "data/generated/index.csv")
    first = index[(index["prompt_index"] == 0) & (index["sample"] == 0)].set_index("model")["path"]
    base, adapted = (Image.open(workdir / first[model]).tobytes() for model in ("base", "lora"))
    assert base != adapted
