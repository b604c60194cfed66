"""train.cached_latents: K augmented variants per image, VAE-encoded once, trained on as the on-the-fly path."""

import numpy as np
import pytest
import torch
from PIL import Image

from lanskap.core.errors import UserError
from lanskap.core.params import AugmentParams, conf_group
from lanskap.data.augment import train_transform
from lanskap.models.resolve import BUILTIN_TINY_SD2, resolve_base_model
from lanskap.train.batches import CaptionedImages
from lanskap.train.latents import LatentCache, encode, variant_seed
from lanskap.train.setup import load_components
from lanskap.train.step import diffusion_loss
from tests.conftest import write_params
from tests.test_data_stages import run_data_stages
from tests.test_train import run_train_stage, with_train

RESOLUTION, IMAGES, SEED = 32, 3, 7
NO_AUGMENTATION = {
    "crop_scale": [1.0, 1.0],
    "crop_ratio": [1.0, 1.0],
    "hflip_p": 0.0,
    "brightness": 0.0,
    "contrast": 0.0,
    "saturation": 0.0,
}


@pytest.fixture(scope="module")
def parts():
    return load_components(resolve_base_model(BUILTIN_TINY_SD2, None).path, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def images_dataset(folder, augment: AugmentParams) -> CaptionedImages:
    rng = np.random.default_rng(0)
    paths = []
    for index in range(IMAGES):
        paths.append(str(folder / f"{index}.png"))
        Image.fromarray(rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)).save(paths[-1])
    return CaptionedImages(paths, list(range(IMAGES)), [train_transform(augment, (RESOLUTION, RESOLUTION))] * IMAGES)


def test_each_variant_is_its_seeded_augmentation_encoded_and_variants_differ(tmp_path, parts, accelerator):
    dataset = images_dataset(tmp_path, conf_group("augment"))
    cache = LatentCache.build(dataset, parts.vae, accelerator, 3, SEED)
    for index in range(IMAGES):
        pixels, _ = dataset[(index, variant_seed(SEED, index, 1))]
        expected = encode(parts.vae, pixels[None])
        torch.testing.assert_close(cache.posteriors[index][1].mean, expected.mean[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cache.posteriors[index][1].std, expected.std[0], rtol=1e-5, atol=1e-6)
        means = [variant.mean for variant in cache.posteriors[index]]
        assert all(not torch.allclose(means[a], means[b], atol=1e-3) for a, b in [(0, 1), (0, 2), (1, 2)])
    # a key picks variant seed % K, whatever the seed's size
    posterior, caption_ids = cache.batch([(2, 3 * 10**17 + 1), (0, 5)])
    assert posterior.mean.shape == (2, 4, *expected.mean.shape[2:]) and caption_ids.tolist() == [2, 0]
    assert torch.equal(posterior.mean[0], cache.posteriors[2][1].mean)
    assert torch.equal(posterior.std[1], cache.posteriors[0][2].std)
    # loader workers decode and augment ahead, changing nothing
    with_workers = LatentCache.build(dataset, parts.vae, accelerator, 3, SEED, workers=2)
    assert all(
        torch.equal(with_workers.posteriors[index][variant].mean, cache.posteriors[index][variant].mean)
        for index in range(IMAGES)
        for variant in range(3)
    )
    # negative control: without augmentation the variants are the same image
    plain = LatentCache.build(
        images_dataset(tmp_path, conf_group("augment", **NO_AUGMENTATION)), parts.vae, accelerator, 2, SEED
    )
    assert torch.equal(plain.posteriors[0][0].mean, plain.posteriors[0][1].mean)


def test_loss_on_a_cached_variant_equals_the_loss_on_its_pixels_encoded_in_the_step(tmp_path, parts, accelerator):
    """The exact augmentations the cache holds, fed through the on-the-fly path: same random draws, same loss."""
    dataset = images_dataset(tmp_path, conf_group("augment"))
    cache = LatentCache.build(dataset, parts.vae, accelerator, 2, SEED)
    keys = [(2, 1), (0, 0), (1, 1)]  # seed % 2 = variant
    pixels = torch.stack([dataset[(index, variant_seed(SEED, index, variant))][0] for index, variant in keys])
    hidden = parts.text_encoder.config.hidden_size
    states = torch.randn(len(keys), 77, hidden, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cached = diffusion_loss(parts, cache.batch(keys)[0], states, torch.Generator().manual_seed(3), snr_gamma=5.0)
        on_the_fly = diffusion_loss(
            parts, encode(parts.vae, pixels), states, torch.Generator().manual_seed(3), snr_gamma=5.0
        )
    torch.testing.assert_close(cached, on_the_fly, rtol=1e-5, atol=0)


def count_vae_encodes(monkeypatch) -> list[int]:
    """Batch sizes of every AutoencoderKL.encode call from now on."""
    from diffusers import AutoencoderKL

    calls, real_encode = [], AutoencoderKL.encode

    def counting_encode(self, pixel_values, *args, **kwargs):
        calls.append(pixel_values.shape[0])
        return real_encode(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    return calls


def test_without_augmentation_a_cached_run_trains_the_on_the_fly_weights_encoding_once_per_variant(
    workdir, project_params, monkeypatch
):
    """All augmentation off, every variant is the same image: the cached run must then train what the on-the-fly
    run trains (same posterior, same draws), up to the float rounding of encoding one image at a time instead of
    a batch, which AdamW's first steps amplify. The VAE encodes each image's K variants once before training, not
    once per step; the held-out loss still encodes the test images."""
    run_data_stages(workdir)
    unaugmented = {**project_params, "augment": NO_AUGMENTATION}
    write_params(workdir, unaugmented)
    train_images = len((workdir / "data/processed/train.csv").read_text().splitlines()) - 1
    test_images = len((workdir / "data/processed/test.csv").read_text().splitlines()) - 1
    steps, validations = 4, 3  # train.steps 4, validation_every 2: held-out loss at 0, 2, 4
    batch = project_params["train"]["batch_size"]  # validation encodes the test images in chunks of this size
    chunks = [batch] * (test_images // batch) + ([test_images % batch] if test_images % batch else [])
    calls = count_vae_encodes(monkeypatch)
    on_the_fly = run_train_stage("models/on_the_fly")
    assert len(calls) == steps + validations * len(chunks)  # (the preflight probe runs on CUDA only)
    calls.clear()
    with_train(workdir, unaugmented, cached_latents=3)
    cached = run_train_stage("models/cached")
    assert calls.count(1) == train_images * 3 + validations * chunks.count(1)
    assert len(calls) == train_images * 3 + validations * len(chunks)
    largest_change = max(on_the_fly[key].abs().max().item() for key in on_the_fly if ".lora_B." in key)
    assert largest_change > 0 and on_the_fly.keys() == cached.keys()
    difference = max((cached[key] - on_the_fly[key]).abs().max().item() for key in on_the_fly)
    print(f"cached vs on the fly: largest weight difference {difference:.2e} of a largest change {largest_change:.2e}")
    assert difference <= 1e-3 * largest_change  # measured 8.4e-5 of it; see test_distributed.TOLERANCE


def test_cached_latents_must_be_a_variant_count():
    assert conf_group("train", **{"cached_latents": 4}).cached_latents == 4
    for value in (-1, 1025, 2.5, "four"):
        with pytest.raises(UserError, match=r"train\.cached_latents"):
            conf_group("train", **{"cached_latents": value})
