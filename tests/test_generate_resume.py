"""Resumable generation's cache: verified reuse of whole batches, a redraw of anything incomplete or damaged, the
same bytes either way. The kill -9 runs through dvc are in test_interruptions.py."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from lanskap.core.params import conf_group
from lanskap.generate import sampling
from lanskap.generate.resume import ImageCache, cache_key, keep_only


@pytest.fixture
def drawn(monkeypatch) -> list[list[int]]:
    """sampling.sample replaced by a deterministic stand-in (an image per seed); records the seeds of each call."""
    calls = []

    def fake_sample(pipeline, captions, seeds, params, resolution, steps):
        calls.append(list(seeds))
        return [
            Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)) for seed in seeds
        ]

    monkeypatch.setattr(sampling, "sample", fake_sample)
    monkeypatch.setattr(sampling, "native_resolution", lambda pipeline: 8)
    return calls


def jobs_and_params():
    params = conf_group("generate", images_per_prompt=2, batch_size=2)
    return sampling.plan_jobs(["a", "b", "c"], params), params


def tree(folder) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.glob("*.png"))}


def test_a_resumed_run_reuses_whole_verified_batches_and_redraws_the_rest_to_the_same_bytes(tmp_path, drawn):
    jobs, params = jobs_and_params()
    sampling.generate_images(None, jobs, params, tmp_path / "reference", "base")  # no cache: an uninterrupted run
    reference, seeds = tree(tmp_path / "reference"), [job.seed for job in jobs]
    cache = ImageCache(tmp_path / "cache")
    sampling.generate_images(None, jobs, params, tmp_path / "first", "base", cache)
    # as a kill would leave it: batch 2 missing its second image's sha256, batch 3 with a damaged image
    (cache.folder / "0001_01.png.sha256").unlink()
    (cache.folder / "0002_00.png").write_bytes(b"truncated")
    drawn.clear()
    sampling.generate_images(None, jobs, params, tmp_path / "resumed", "base", cache)
    assert drawn == [seeds[2:4], seeds[4:6]]  # batch 1 reused; batches 2 and 3 drawn whole, as composed before
    assert tree(tmp_path / "resumed") == tree(tmp_path / "first") == reference
    drawn.clear()
    sampling.generate_images(None, jobs, params, tmp_path / "again", "base", cache)
    assert drawn == [] and tree(tmp_path / "again") == reference  # everything cached and verified now


def test_the_key_covers_the_lora_files_and_other_runs_caches_are_removed(tmp_path):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "weights.safetensors").write_bytes(b"one")
    first = cache_key(["lora", 1], lora)
    assert cache_key(["lora", 1], lora) == first != cache_key(["lora", 2], lora)
    (lora / "weights.safetensors").write_bytes(b"two")
    assert cache_key(["lora", 1], lora) != first
    root = tmp_path / "cache"
    for key in ("keep", "stale"):
        ImageCache(root / key).put("0000_00.png", b"png")
    keep_only(["keep"], root)
    assert sorted(path.name for path in root.iterdir()) == ["keep"]
