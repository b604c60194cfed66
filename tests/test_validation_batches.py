"""The held-out validation runs in chunks of train.batch_size: the loss is the one-batch loss, whatever the chunk."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lanskap.models.resolve import resolve_base_model
from lanskap.train.monitor import HeldOut
from lanskap.train.setup import load_components


@pytest.fixture(scope="module")
def parts():
    return load_components(resolve_base_model("builtin:tiny-sd2", None).path, torch.float32, torch.device("cpu"))


@pytest.fixture
def test_table(tmp_path) -> pd.DataFrame:
    """Seven random images in two buckets (five 64x64, two 64x32), so chunks split a bucket unevenly."""
    rng, rows = np.random.default_rng(0), []
    for index, (width, height) in enumerate([(64, 64)] * 5 + [(64, 32)] * 2):
        path = tmp_path / f"{index}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        rows.append({"path": str(path), "caption": f"caption {index}", "bucket_width": width, "bucket_height": height})
    return pd.DataFrame(rows)


def held_out_loss(test_table, parts, batch_size: int, seed: int = 0) -> float:
    return HeldOut.load(test_table, parts, "cpu", False, batch_size).loss(parts, seed)


def test_the_validation_loss_is_the_same_in_chunks_as_in_one_batch(test_table, parts):
    one_batch = held_out_loss(test_table, parts, batch_size=100)
    for batch_size in (1, 2, 3):
        assert held_out_loss(test_table, parts, batch_size) == pytest.approx(one_batch, rel=1e-5, abs=1e-7)
    assert held_out_loss(test_table, parts, 2, seed=1) != pytest.approx(one_batch, rel=1e-3)  # the noise matters


def test_chunks_never_exceed_the_batch_size_and_pixels_wait_on_the_cpu(test_table, parts, monkeypatch):
    from lanskap.train import monitor

    seen = []
    real_encode = monitor.encode
    monkeypatch.setattr(monitor, "encode", lambda vae, pixels: seen.append(pixels.shape[0]) or real_encode(vae, pixels))
    held_out = HeldOut.load(test_table, parts, "cpu", False, 2)
    held_out.loss(parts, 0)
    assert seen == [2, 2, 2, 1]  # buckets in (width, height) order: 64x32 (2 images), then 64x64 (5)
    assert all(pixels.device.type == "cpu" for pixels, _ in held_out.buckets)
