"""Feature extraction: the reference preprocessing reproduced exactly, the built-in stand-ins loaded through
the real loading path, and clear errors for missing real weights (all offline). What the stand-ins learnt is
tested in tests/test_builtin.py."""

import numpy as np
import pytest
import torch
from PIL import Image

from lanskap.core.errors import UserError
from lanskap.evaluate.features import (
    BUILTIN_TINY_CLIP,
    BUILTIN_TINY_INCEPTION,
    CLIP_MEAN,
    CLIP_STD,
    INCEPTION_FILE,
    clip_crop_and_resize,
    clip_pixels,
    inception_pixels,
    load_clip,
    load_inception,
    read_rgb,
)

# (width, height, PIL mode): landscape, portrait with an odd margin, small, square, grey, with alpha.
IMAGE_SHAPES = [
    (400, 300, "RGB"),
    (300, 401, "RGB"),
    (64, 128, "RGB"),
    (512, 512, "RGB"),
    (90, 70, "L"),
    (200, 120, "RGBA"),
]


def _random_image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for index, (width, height, mode) in enumerate(IMAGE_SHAPES):
        path = folder / f"{index}-{width}x{height}-{mode}.png"
        _random_image(width, height, mode, index).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def tiny_clip():
    return load_clip(BUILTIN_TINY_CLIP, None, device="cpu")


@pytest.fixture(scope="module")
def tiny_inception():
    return load_inception(BUILTIN_TINY_INCEPTION, device="cpu")


# --------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize(
    ("width", "height", "box"),
    [
        (400, 300, (50, 0, 350, 300)),  # landscape: offset ((400 - 300) // 2, 0)
        (300, 401, (0, 50, 300, 350)),  # portrait, odd margin: offset (0, 101 // 2) rounds down
        (336, 336, (0, 0, 336, 336)),
    ],
)
def test_clip_crop_is_the_centred_square_then_pil_bicubic(width, height, box):
    image = _random_image(width, height, "RGB", seed=1)
    by_hand = image.crop(box).resize((336, 336), resample=Image.BICUBIC)
    assert np.array_equal(np.asarray(clip_crop_and_resize(image, 336)), np.asarray(by_hand))


def test_clip_pixels_are_scaled_to_unit_range_then_clip_normalised():
    image = _random_image(400, 300, "RGB", seed=2)
    resized = np.asarray(image.crop((50, 0, 350, 300)).resize((336, 336), resample=Image.BICUBIC))
    by_hand = ((resized / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)
    pixels = clip_pixels(image, 336)
    assert pixels.shape == (3, 336, 336) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, by_hand, atol=1e-5)


def test_inception_input_is_exactly_what_clean_fid_feeds_its_model(image_paths):
    from cleanfid.utils import ResizeDataset

    reference = ResizeDataset([str(path) for path in image_paths], mode="clean")
    for index, path in enumerate(image_paths):
        pixels = inception_pixels(read_rgb(path))
        assert pixels.shape == (3, 299, 299) and pixels.dtype == np.float32
        assert np.array_equal(pixels, reference[index].numpy())
    assert pixels.min() >= 0 and pixels.max() <= 255 and pixels.max() > 1  # [0, 255], not [0, 1]


# ---------------------------------------------------------------------------------------------- CLIP


def test_tiny_clip_image_embeddings_are_unit_rows_one_per_image(tiny_clip, image_paths):
    embeddings = tiny_clip.image_embeddings(image_paths)
    assert embeddings.shape == (len(image_paths), 32) and embeddings.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-12)
    assert len({row.tobytes() for row in embeddings}) == len(image_paths)
    assert tiny_clip.image_size == 336  # the real model's input size, so the same preprocessing runs


def test_tiny_clip_embeddings_do_not_depend_on_batching(tiny_clip, image_paths):
    np.testing.assert_allclose(
        tiny_clip.image_embeddings(image_paths, batch_size=4),
        tiny_clip.image_embeddings(image_paths, batch_size=32),
        atol=1e-6,
    )


def test_tiny_clip_loads_identically_twice_and_from_its_folder(tiny_clip, image_paths):
    again = load_clip(BUILTIN_TINY_CLIP, None, device="cpu")
    assert np.array_equal(again.image_embeddings(image_paths), tiny_clip.image_embeddings(image_paths))
    # The built-in folder is an ordinary save_pretrained folder: loading it by path gives the same model.
    by_path = load_clip(tiny_clip.model.name_or_path, None, device="cpu")
    assert np.array_equal(by_path.text_embeddings(["a hill"]), tiny_clip.text_embeddings(["a hill"]))


def test_tiny_clip_text_embeddings_are_unit_rows_that_differ_by_caption(tiny_clip):
    embeddings = tiny_clip.text_embeddings(["a misty valley at dawn", "three moons over a violet sea"])
    assert embeddings.shape == (2, 32) and embeddings.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-12)
    assert not np.allclose(embeddings[0], embeddings[1])


def test_captions_longer_than_77_tokens_are_truncated(tiny_clip):
    long_prefix = "mountain " * 100  # 100 tokens: everything after token 75 is cut
    embeddings = tiny_clip.text_embeddings([long_prefix + "with a lake", long_prefix + "under snow"])
    assert np.array_equal(embeddings[0], embeddings[1])
    assert not np.array_equal(embeddings[0], tiny_clip.text_embeddings(["mountain"])[0])


@pytest.fixture
def offline_empty_hub(tmp_path, monkeypatch):
    """An empty HF cache with downloads disabled: huggingface_hub reads these at import, so patch both."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_missing_hub_clip_names_model_revision_and_how_to_get_it(offline_empty_hub):
    revision = "ce19dc912ca5cd21c8a653c79e251e808ccabcd1"
    with pytest.raises(UserError) as error:
        load_clip("openai/clip-vit-large-patch14-336", revision, device="cpu")
    message = str(error.value)
    for expected in ("evaluate.clip_model", "openai/clip-vit-large-patch14-336", revision, "hf download"):
        assert expected in message


def test_hub_clip_without_revision_asks_for_clip_revision(offline_empty_hub):
    with pytest.raises(UserError, match="evaluate.clip_revision"):
        load_clip("openai/clip-vit-large-patch14-336", None, device="cpu")


def test_bad_clip_specs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown built-in"):
        load_clip("builtin:huge-clip", None, device="cpu")
    with pytest.raises(UserError, match="no config.json"):
        load_clip(str(tmp_path), None, device="cpu")


# ----------------------------------------------------------------------------------------- Inception


def test_tiny_inception_features_one_row_per_image(tiny_inception, image_paths):
    features = tiny_inception.features(image_paths, batch_size=4)
    assert features.shape == (len(image_paths), 64) and features.dtype == np.float64
    assert np.isfinite(features).all()
    assert len({row.tobytes() for row in features}) == len(image_paths)
    assert tiny_inception.dim == 64


def test_missing_inception_file_says_what_is_needed_and_where_to_set_it(tmp_path):
    with pytest.raises(UserError) as error:
        load_inception(str(tmp_path / INCEPTION_FILE), device="cpu")
    message = str(error.value)
    for expected in (INCEPTION_FILE, "stylegan2-ada-pytorch", "evaluate.inception_weights", str(tmp_path)):
        assert expected in message


def test_inception_file_under_another_name_is_a_user_error(tmp_path):
    renamed = tmp_path / "inception.pt"
    renamed.write_bytes(b"not read")
    with pytest.raises(UserError, match=INCEPTION_FILE):
        load_inception(str(renamed), device="cpu")


class _FakeInceptionLayers(torch.nn.Module):
    """Stands in for the torchscript's `layers`: per-channel means of its input, tiled to 2048 values."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3)).repeat(1, 683)[:, :2048].reshape(-1, 2048, 1, 1)


class _FakeInceptionTorchscript(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _FakeInceptionLayers()

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(images)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")  # clean-fid loads torchscript
def test_real_inception_file_goes_through_clean_fid_wrapper_offline(image_paths, tmp_path, monkeypatch):
    import cleanfid.inception_torchscript

    def no_download(*args, **kwargs):
        raise AssertionError("clean-fid tried to download the Inception weights")

    monkeypatch.setattr(cleanfid.inception_torchscript, "check_download_inception", no_download)
    weights = tmp_path / INCEPTION_FILE
    torch.jit.save(torch.jit.script(_FakeInceptionTorchscript()), str(weights))

    embedder = load_inception(str(weights), device="cpu")
    features = embedder.features(image_paths[:3])
    assert features.shape == (3, 2048) and embedder.dim == 2048
    # The wrapper maps the [0, 255] input to [-1, 1] before its layers, which here return channel means.
    pixels = np.stack([inception_pixels(read_rgb(path)) for path in image_paths[:3]]).astype(np.float64)
    np.testing.assert_allclose(features[:, :3], ((pixels - 128) / 128).mean(axis=(2, 3)), atol=1e-5)
