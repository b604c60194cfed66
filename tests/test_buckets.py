"""Aspect-ratio bucketing: the buckets, each image's bucket, one-bucket micro-batches that are a function of the
position in the run, preprocess's bucketed images and data card, and a bucketed training run."""

import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from PIL import Image

from lanskap.core.errors import UserError
from lanskap.core.params import conf_group
from lanskap.data.augment import canonical_image, fit_to_size, train_transform
from lanskap.data.buckets import (
    bucket_groups,
    bucket_sizes,
    nearest_bucket,
    nominal_resolution,
    require_trainable_bucket,
    untrained_message,
)
from lanskap.train import loop, step
from lanskap.train.batches import BatchShare, global_batches
from lanskap.train.setup import check_training_sizes
from stages import evaluate, generate
from tests.conftest import EVALUATE_ARGS, GENERATE_ARGS, write_params
from tests.test_data_stages import photo, run_data_stages
from tests.test_train import run_train_stage

# (sub-folder, source size, count): squares, 2:1 landscapes and 4:1 panoramas; split stratifies by sub-folder
MIXED = [("square", (96, 96), 4), ("wide", (128, 64), 4), ("panorama", (256, 64), 4)]


@pytest.mark.parametrize(
    ("resolution", "step", "max_ratio"), [(64, 16, 4.0), (768, 64, 4.0), (32, 8, 2.0), (512, 64, 1.0)]
)
def test_buckets_have_about_the_square_area_divisible_sides_and_bounded_ratios(resolution, step, max_ratio):
    sizes = bucket_sizes(resolution, step, max_ratio)
    assert (resolution, resolution) in sizes
    for width, height in sizes:
        assert width % step == 0 and height % step == 0
        assert max(width, height) <= max_ratio * min(width, height)
        assert width * height <= resolution**2
        # the largest a multiple of step allows, at this width or (its transpose) at this height
        assert width * (height + step) > resolution**2 or height * (width + step) > resolution**2
        assert (height, width) in sizes
    if max_ratio == 1.0:
        assert sizes == [(resolution, resolution)]


def test_each_image_goes_to_the_bucket_nearest_its_aspect_ratio_and_a_panorama_keeps_its_shape():
    sizes = bucket_sizes(64, 16, 4.0)
    for width, height in [(100, 100), (300, 200), (200, 300), (640, 160), (160, 640), (90, 40), (1000, 100)]:
        chosen = nearest_bucket(width, height, sizes)
        distance = abs(math.log(chosen[0] / chosen[1]) - math.log(width / height))
        assert all(distance <= abs(math.log(w / h) - math.log(width / height)) for w, h in sizes)
    assert nearest_bucket(100, 100, sizes) == (64, 64)
    assert nearest_bucket(640, 160, sizes) == (128, 32)  # 4:1 stays 4:1
    assert nearest_bucket(160, 640, sizes) == (32, 128)
    assert nearest_bucket(1000, 100, sizes) == (128, 32)  # beyond the widest bucket: the widest

    panorama = photo(0, (256, 64))
    bucketed = fit_to_size(panorama, 128, 32)
    assert bucketed.size == (128, 32)
    whole = panorama.resize((128, 32), Image.Resampling.LANCZOS)
    assert list(bucketed.getdata()) == list(whole.getdata())  # nothing cropped
    squared = canonical_image(panorama, 64)  # negative control: without buckets, a quarter of it is left
    assert squared.size == (64, 64)


def test_a_square_bucket_is_the_unbucketed_square_bit_for_bit():
    image = photo(1, (128, 96))
    assert list(fit_to_size(image, 64, 64).getdata()) == list(canonical_image(image, 64).getdata())
    torch.manual_seed(0)
    square = train_transform(conf_group("augment"), (64, 64))(image)
    assert square.shape == (3, 64, 64)
    torch.manual_seed(0)
    wide = train_transform(conf_group("augment"), (128, 32))(fit_to_size(image, 128, 32))
    assert wide.shape == (3, 32, 128)  # [3, H, W] of the bucket


def bucketed_groups() -> list[list[int]]:
    """Images 0-9 in three buckets of 5, 3 and 2 images (interleaved positions, as in a split table)."""
    sizes = [(64, 64), (128, 32), (64, 64), (32, 128), (64, 64), (128, 32), (64, 64), (128, 32), (64, 64), (32, 128)]
    return list(bucket_groups(sizes).values())


def take(batches, count: int) -> list:
    return [next(batches) for _ in range(count)]


def test_every_micro_batch_is_from_one_bucket_and_partial_batches_are_dropped_per_epoch():
    groups = bucketed_groups()
    bucket_of = {index: number for number, group in enumerate(groups) for index in group}
    per_epoch = sum(len(group) // 2 for group in groups)  # 2 + 1 + 1: one image of the 5 sits out each epoch
    batches = take(global_batches(groups, 2, seed=0, start=0), 3 * per_epoch)
    for batch in batches:
        assert len(batch) == 2 and len({bucket_of[index] for index, _ in batch}) == 1
    for epoch in range(3):
        seen = [index for batch in batches[epoch * per_epoch : (epoch + 1) * per_epoch] for index, _ in batch]
        assert len(seen) == len(set(seen)) == 8
    largest = max(groups, key=len)
    sat_out = [
        set(largest) - {index for batch in batches[epoch * per_epoch : (epoch + 1) * per_epoch] for index, _ in batch}
        for epoch in range(3)
    ]
    assert all(len(left) == 1 for left in sat_out) and len(set.union(*sat_out)) > 1  # a different one each epoch
    assert len({bucket_of[batch[0][0]] for batch in batches}) == 3  # every bucket trains


def test_bucketed_batches_depend_on_the_micro_batch_number_only():
    groups = bucketed_groups()
    from_start = take(global_batches(groups, 2, seed=7, start=0), 12)
    for start in (1, 4, 5, 9):  # mid-epoch and at epoch boundaries: a resume sees the tail of the uninterrupted run
        assert take(global_batches(groups, 2, seed=7, start=start), 12 - start) == from_start[start:]
    shares = [BatchShare(2, start, 1) for start in (0, 1)]  # two processes, one row each
    split = zip(*(take((share.rows(batch) for batch in global_batches(groups, 2, 7, 0)), 12) for share in shares))
    assert [first + second for first, second in split] == from_start
    assert take(global_batches(groups, 2, seed=8, start=0), 12) != from_start


def test_one_bucket_draws_exactly_the_unbucketed_sequence():
    """Buckets on data that all falls in one bucket (the demo's square images) trains on exactly what it did."""
    generator, expected = torch.Generator().manual_seed(3), []
    for _ in range(3):  # the sequence before buckets: one permutation per epoch, cut into whole batches
        order = torch.randperm(10, generator=generator).tolist()
        expected += [order[start : start + 3] for start in (0, 3, 6)]
    drawn = take(global_batches([list(range(10))], 3, seed=3, start=0), 9)
    assert [[index for index, _ in batch] for batch in drawn] == expected


def test_buckets_too_small_for_a_micro_batch_are_named_and_none_trainable_is_refused():
    groups = bucket_groups([(64, 64)] * 4 + [(128, 32)] * 1 + [(32, 128)] * 2)
    assert untrained_message(groups, 4) == (
        "3 training images are never trained on: their aspect-ratio buckets hold "
        "fewer than a global micro-batch of 4: 32x128 (2), 128x32 (1)"
    )
    assert untrained_message(groups, 1) is None
    require_trainable_bucket(groups, 4, "train_lora", "train.batch_size")
    with pytest.raises(UserError, match=r"train_lora: no aspect-ratio bucket holds train.batch_size = 5 .*64x64.*4"):
        require_trainable_bucket(groups, 5, "train_lora", "train.batch_size")
    with pytest.raises(UserError, match="train_lora: train.batch_size = 5 exceeds the 4 training images"):
        require_trainable_bucket(bucket_groups([(64, 64)] * 4), 5, "train_lora", "train.batch_size")


def test_bucket_settings_are_validated_and_sizes_checked_against_the_model():
    with pytest.raises(UserError, match=r"preprocess: .*resolution=96 must be a multiple of bucket_reso_steps=64"):
        conf_group("preprocess", **{"resolution": 96, "buckets": True, "bucket_reso_steps": 64})
    conf_group("preprocess", **{"resolution": 96, "buckets": False})  # off: no constraint added
    with pytest.raises(UserError, match=r"preprocess.bucket_reso_steps: .*multiple of 8"):
        conf_group("preprocess", **{"buckets": True, "bucket_reso_steps": 12})
    with pytest.raises(UserError, match=r"preprocess.bucket_max_aspect_ratio: .*greater than or equal to 1"):
        conf_group("preprocess", **{"buckets": True, "bucket_max_aspect_ratio": 0.5})
    sd2 = SimpleNamespace(
        vae=SimpleNamespace(config=SimpleNamespace(block_out_channels=[128, 256, 512, 512])),
        unet=SimpleNamespace(config=SimpleNamespace(down_block_types=["a", "b", "c", "d"])),
    )
    check_training_sizes(sd2, [(768, 768), (1024, 576), (520, 520)])  # squares: preprocess.resolution, as before
    with pytest.raises(UserError, match=r"buckets 992x608 .*multiples of 64.*bucket_reso_steps"):
        check_training_sizes(sd2, [(768, 768), (992, 608)])
    assert nominal_resolution([(64, 64), (128, 32), (96, 32)]) == 64


def mixed_aspect_workdir(workdir, project_params, **preprocess) -> dict:
    """A folder source of squares, 2:1 landscapes and 4:1 panoramas (sub-folders, which split stratifies by)."""
    folder = workdir / "raw"
    seed = 0
    for group, size, count in MIXED:
        (folder / group).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            photo(seed, size).save(folder / group / f"{index}.png")
            (folder / group / f"{index}.txt").write_text(f"a {group} landscape number {index}\n")
            seed += 1
    params = {
        **project_params,
        "ingest": {**project_params["ingest"], "source": str(folder), "min_size": 32},
        "split": {**project_params["split"], "stratify": "group"},
        "preprocess": {**project_params["preprocess"], "resolution": 32, **preprocess},
    }
    write_params(workdir, params)
    return params


def processed_sizes(workdir) -> dict[str, set]:
    table = pd.concat([pd.read_csv(workdir / f"data/processed/{side}.csv") for side in ("train", "test")])
    sizes = {}
    for row in table.itertuples():
        with Image.open(workdir / row.path) as image:
            assert image.size == (row.bucket_width, row.bucket_height)
        sizes.setdefault(row.caption.split()[1], set()).add(image.size)  # "a <group> landscape number i"
    return sizes


def test_preprocess_stores_each_image_at_its_bucket_and_the_data_card_lists_the_buckets(workdir, project_params):
    mixed_aspect_workdir(workdir, project_params, buckets=True, bucket_reso_steps=8)
    run_data_stages(workdir)
    assert processed_sizes(workdir) == {"square": {(32, 32)}, "wide": {(40, 24)}, "panorama": {(64, 16)}}
    card = (workdir / "reports/preprocess/data_card.md").read_text()
    assert "## Aspect-ratio buckets" in card and "partial batch" in card
    for row in ["| 32x32 | 1.00 | 2 | 2 | 1 |", "| 40x24 | 1.67 | 2 | 2 | 1 |", "| 64x16 | 4.00 | 2 | 2 | 1 |"]:
        assert row in card  # train.batch_size 2: one batch per epoch each
    assert "every training image is in a bucket that trains" in card

    mixed_aspect_workdir(workdir, project_params, buckets=False)  # negative control: all squared, no bucket table
    run_data_stages(workdir)
    assert processed_sizes(workdir) == {"square": {(32, 32)}, "wide": {(32, 32)}, "panorama": {(32, 32)}}
    assert "Aspect-ratio buckets" not in (workdir / "reports/preprocess/data_card.md").read_text()


def test_preprocess_refuses_buckets_that_leave_nothing_to_train(workdir, project_params):
    params = mixed_aspect_workdir(workdir, project_params, buckets=True, bucket_reso_steps=8)
    write_params(workdir, {**params, "train": {**params["train"], "batch_size": 3}})
    with pytest.raises(UserError, match="preprocess: no aspect-ratio bucket holds train.batch_size = 3"):
        run_data_stages(workdir)


@pytest.mark.slow
def test_bucketed_training_trains_each_micro_batch_at_one_buckets_shape(workdir, project_params, monkeypatch, capsys):
    mixed_aspect_workdir(workdir, project_params, buckets=True, bucket_reso_steps=8)
    run_data_stages(workdir)
    shapes, real_loss = [], step.diffusion_loss

    def recording_loss(parts, posterior, *args, **kwargs):  # the pixel shape its latents [B, 4, H/f, W/f] came from
        factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
        shapes.append(tuple(side * factor for side in posterior.mean.shape[-2:]))
        return real_loss(parts, posterior, *args, **kwargs)

    monkeypatch.setattr(step, "diffusion_loss", recording_loss)
    weights = run_train_stage()
    assert len(shapes) == 4 and set(shapes) <= {(32, 32), (24, 40), (16, 64)} and len(set(shapes)) > 1
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    card = (workdir / "models/lora/README.md").read_text()
    assert "aspect-ratio buckets (W x H: training images): 32x32: 2, 40x24: 2, 64x16: 2" in card
    assert "never trained on" not in capsys.readouterr().out
    generate.main(GENERATE_ARGS)  # downstream stages take the bucketed held-out images
    evaluate.main(EVALUATE_ARGS)
    assert math.isfinite(json.loads((workdir / "metrics/eval.json").read_text())["fid_test_vs_lora"])


@pytest.mark.slow
def test_a_bucketed_run_resumes_to_bit_identical_weights(workdir, project_params, monkeypatch):
    """Killed after its checkpoint at step 4 (mid second epoch of 3 one-bucket batches), then rerun: the same
    weights as a run never interrupted."""
    params = mixed_aspect_workdir(workdir, project_params, buckets=True, bucket_reso_steps=8)
    run_data_stages(workdir)
    write_params(workdir, {**params, "train": {**params["train"], "steps": 6, "images_every": 0}})
    uninterrupted = run_train_stage("models/uninterrupted")
    write_params(
        workdir, {**params, "train": {**params["train"], "steps": 6, "images_every": 0, "checkpoint_every": 4}}
    )
    save_checkpoint = loop.save_checkpoint

    def save_then_die(checkpoint_dir, state, *args):
        save_checkpoint(checkpoint_dir, state, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_train_stage("models/resumed")
    monkeypatch.setattr(loop, "save_checkpoint", save_checkpoint)
    resumed = run_train_stage("models/resumed")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)
