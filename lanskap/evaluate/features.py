"""Image and caption features for the metrics: CLIP embeddings (CMMD, CLIP score), Inception pool features
(FID, KID). `lanskap.evaluate.metrics` does the math on the arrays returned here.

Each extractor has one code path for real weights and for a built-in tiny stand-in, trained on procedural
data by `lanskap.builtin` and shipped in the package; a stand-in is used only when params name it
(`builtin:tiny-clip`, `builtin:tiny-inception`), never as a fallback for missing weights. Stand-ins load
exactly like real weights and take the same input as the real models, so the preprocessing under test is
the real one.

Reference preprocessing, reproduced exactly:
- CLIP / CMMD (google-research cmmd, cmmd-pytorch): decode to RGB uint8; centre-crop to a square of side
  s = min(W, H) at offsets ((W - s) // 2, (H - s) // 2); PIL bicubic resize (uint8) to the model's
  image_size (336 for openai/clip-vit-large-patch14-336); divide by 255; normalise with CLIP's mean/std.
  The projected embedding is L2-normalised. The HF image processor is not used: it resizes the short
  side first and crops afterwards, which is a different image.
- Captions: CLIP BPE tokens, padded to 77 and truncated at 77; projected text embedding, L2-normalised.
- Inception / clean-fid "clean" mode: decode to RGB uint8; PIL bicubic resize to 299 x 299 on float32
  data, one channel at a time (`cleanfid.resize.make_resizer("PIL", False, "bicubic", (299, 299))`);
  fed as float32 [N, 3, 299, 299] in [0, 255], the layout clean-fid's `ResizeDataset` produces. The
  model (clean-fid's `InceptionV3W` wrapper of NVIDIA's TF-Inception torchscript) rescales to [-1, 1]
  itself and returns 2048-d pool features.
"""

import json
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from cleanfid.resize import make_resizer
from PIL import Image

from lanskap.builtin import builtin_folder
from lanskap.core.console import progress
from lanskap.core.errors import UserError
from lanskap.core.io import sha256_file
from lanskap.models.folders import check_model_folder
from lanskap.models.resolve import fetch_hub_snapshot, require_safetensors, weights_digest

BUILTIN_TINY_CLIP = "builtin:tiny-clip"
BUILTIN_TINY_INCEPTION = "builtin:tiny-inception"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_CONTEXT_LENGTH = 77
# Files a CLIPModel folder needs; other weight formats (pytorch_model.bin, tf, flax) are not fetched.
CLIP_HUB_FILES = [
    "config.json",
    "*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "preprocessor_config.json",
]
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE}"
# clean-fid's "clean" mode resize (its build_resizer("clean")): PIL bicubic on float32, per channel.
CLEAN_FID_RESIZE = make_resizer("PIL", False, "bicubic", (299, 299))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def read_rgb(path: Path) -> Image.Image:
    """Decode an image file to 8-bit RGB, as both references do (palette, grey and alpha are dropped)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def embed_in_batches(
    items: Sequence, batch_size: int, embed_batch: Callable[[Sequence], torch.Tensor], dim: int, description: str
) -> np.ndarray:
    """Run `embed_batch` over `items` in order, batch by batch; float64 [len(items), dim]."""
    starts = range(0, len(items), batch_size)
    chunks = []
    with torch.inference_mode():
        for start in progress(starts, desc=description, unit="batch", disable=len(starts) <= 1):
            chunks.append(embed_batch(items[start : start + batch_size]).double().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.empty((0, dim))


def l2_normalised(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------- CLIP


def clip_crop_and_resize(image: Image.Image, size: int) -> Image.Image:
    """CMMD's geometry: the centred square of side min(W, H), then a PIL bicubic resize to size x size."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square.resize((size, size), resample=Image.Resampling.BICUBIC)


def clip_pixels(image: Image.Image, size: int) -> np.ndarray:
    """The CLIP model input for one RGB image: float32 [3, size, size], CLIP-normalised."""
    scaled = np.asarray(clip_crop_and_resize(image, size), dtype=np.float32) / 255.0
    normalised = (scaled - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return normalised.transpose(2, 0, 1)


class ClipEmbedder:
    """A CLIPModel and its tokenizer, loaded from a folder saved with `save_pretrained`."""

    def __init__(self, folder: Path, name: str, device: str | None = None):
        from transformers import CLIPModel, CLIPTokenizer

        self.name = name
        self.device = device or default_device()
        self.model = CLIPModel.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).to(self.device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        self.image_size = self.model.config.vision_config.image_size
        self.dim = self.model.config.projection_dim
        self.weights = weights_digest(folder)  # what the feature cache keys its entries by

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Projected image embeddings of decoded RGB images, [len(images), dim], before L2 normalisation."""
        pixels = np.stack([clip_pixels(image, self.image_size) for image in images])
        tower = self.model.vision_model(pixel_values=torch.from_numpy(pixels).to(self.device))
        return self.model.visual_projection(tower.pooler_output)

    def image_embeddings(self, paths: list[Path], batch_size: int = 32) -> np.ndarray:
        """L2-normalised projected image embeddings, float64 [len(paths), dim], CMMD preprocessing."""

        def embed(batch_paths):
            return self.embed_images([read_rgb(path) for path in batch_paths])

        return l2_normalised(embed_in_batches(paths, batch_size, embed, self.dim, "CLIP images"))

    def text_embeddings(self, captions: list[str], batch_size: int = 32) -> np.ndarray:
        """L2-normalised projected caption embeddings, float64 [len(captions), dim]; tokens past 77 are cut."""

        def embed(batch_captions):
            tokens = self.tokenizer(
                list(batch_captions),
                padding="max_length",
                max_length=CLIP_CONTEXT_LENGTH,
                truncation=True,
                return_tensors="pt",
            ).to(self.device)
            tower = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
            return self.model.text_projection(tower.pooler_output)

        return l2_normalised(embed_in_batches(captions, batch_size, embed, self.dim, "CLIP captions"))


def resolve_clip_folder(spec: str, revision: str | None) -> tuple[Path, str]:
    """`evaluate.clip_model` -> (local CLIPModel folder, name for reports), or a UserError saying what to do."""
    if spec.startswith("builtin:"):
        if spec != BUILTIN_TINY_CLIP:
            raise UserError(
                f"evaluate.clip_model: unknown built-in {spec!r}; the built-in model is {BUILTIN_TINY_CLIP!r}"
            )
        folder = builtin_folder(spec, "evaluate.clip_model")
        return folder, f"{spec}@{weights_digest(folder)}"
    check_model_folder(spec, "evaluate.clip_model")
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"evaluate.clip_model: {local} is not a CLIP model folder (no config.json)")
        require_safetensors(local, "evaluate.clip_model")
        return local, str(local)
    folder, repo_id, commit = fetch_hub_snapshot(
        spec, revision, CLIP_HUB_FILES, "evaluate.clip_model", "evaluate.clip_revision"
    )
    require_safetensors(folder, "evaluate.clip_model")
    return folder, f"{repo_id}@{commit}"


def load_clip(spec: str, revision: str | None, device: str | None = None) -> ClipEmbedder:
    """The CLIP model named by `evaluate.clip_model` (built-in, local folder or hub id) on `device`."""
    folder, name = resolve_clip_folder(spec, revision)
    return ClipEmbedder(folder, name, device)


# ----------------------------------------------------------------------------------------- Inception


class TinyInception(torch.nn.Module):
    """Stand-in for the TF-Inception extractor: same input ([N, 3, 299, 299] in [0, 255]), a few strided
    convolutions and a global average pool to the last channel count."""

    def __init__(self, channels: list[int], kernel_sizes: list[int], strides: list[int]):
        super().__init__()
        self.dim = channels[-1]
        layers, in_channels = [], 3
        for out_channels, kernel_size, stride in zip(channels, kernel_sizes, strides, strict=True):
            layers += [torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride), torch.nn.ReLU()]
            in_channels = out_channels
        self.convs = torch.nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The same rescaling to [-1, 1] as clean-fid's InceptionV3W does before the real network.
        return self.convs((images - 128) / 128).mean(dim=(2, 3))


def load_tiny_inception(folder: Path) -> TinyInception:
    from safetensors.torch import load_file

    network = TinyInception(**json.loads((folder / "config.json").read_text())["architecture"])
    network.load_state_dict(load_file(folder / "model.safetensors"))
    return network


def load_cleanfid_inception(spec: str) -> torch.nn.Module:
    """clean-fid's InceptionV3W on a local copy of NVIDIA's torchscript file; never downloads."""
    from cleanfid.inception_torchscript import InceptionV3W

    weights = Path(spec).expanduser()
    if not weights.is_file():
        raise UserError(
            f"evaluate.inception_weights: {weights} not found. FID and KID need NVIDIA's TF-Inception "
            f"torchscript file {INCEPTION_FILE}, which clean-fid downloads from the stylegan2-ada-pytorch "
            f"release ({INCEPTION_URL}). Download it on a machine with network, copy it here and set "
            f"evaluate.inception_weights to its path (or use {BUILTIN_TINY_INCEPTION!r} for a dry run)."
        )
    if weights.name != INCEPTION_FILE:
        # InceptionV3W takes a folder and opens the file in it by its release name.
        raise UserError(
            f"evaluate.inception_weights: {weights} must be named {INCEPTION_FILE} "
            "(clean-fid's loader opens it by that name); rename it or link it under that name"
        )
    require_torchscript(weights)
    # download=False: clean-fid would otherwise fetch the file whenever it is absent from the folder.
    return InceptionV3W(str(weights.parent), download=False, resize_inside=False)


def require_torchscript(weights: Path) -> None:
    """Refuse a file that is not a TorchScript archive. clean-fid opens the file with `torch.jit.load`, whose
    loader rebuilds only tensors and TorchScript classes (an arbitrary pickled global is an error) and runs
    TorchScript code, never Python; a pickled checkpoint (`torch.save`) under the same name is refused here
    with its reason rather than with a miniz error."""
    try:
        with zipfile.ZipFile(weights) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        names = []
    if not any("/code/" in f"/{name}" for name in names):  # torch.save archives hold data, no code/
        raise UserError(
            f"evaluate.inception_weights: {weights} is not a TorchScript archive (no code/ inside); "
            f"use NVIDIA's {INCEPTION_FILE} from {INCEPTION_URL} unchanged"
        )


def inception_pixels(image: Image.Image) -> np.ndarray:
    """clean-fid "clean" input for one RGB image: float32 [3, 299, 299] in [0, 255]."""
    return CLEAN_FID_RESIZE(np.asarray(image)).transpose(2, 0, 1)


class InceptionEmbedder:
    """An extractor taking clean-fid's input ([N, 3, 299, 299] float in [0, 255]) to pool features."""

    def __init__(
        self, network: torch.nn.Module, name: str, dim: int, device: str | None = None, weights: str | None = None
    ):
        self.name = name
        self.dim = dim
        self.device = device or default_device()
        self.network = network.to(self.device).eval()
        self.weights = weights  # the weights' digest, what the feature cache keys its entries by

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Pool features of decoded RGB images, [len(images), dim], clean-fid "clean" preprocessing."""
        pixels = np.stack([inception_pixels(image) for image in images])
        return self.network(torch.from_numpy(pixels).to(self.device))

    def features(self, paths: list[Path], batch_size: int = 32) -> np.ndarray:
        """Pool features, float64 [len(paths), dim], with clean-fid "clean" preprocessing."""

        def embed(batch_paths):
            return self.embed_images([read_rgb(path) for path in batch_paths])

        return embed_in_batches(paths, batch_size, embed, self.dim, "Inception")


def load_inception(spec: str, device: str | None = None) -> InceptionEmbedder:
    """The extractor named by `evaluate.inception_weights`: the built-in stand-in or clean-fid's file."""
    if spec.startswith("builtin:"):
        if spec != BUILTIN_TINY_INCEPTION:
            raise UserError(
                f"evaluate.inception_weights: unknown built-in {spec!r}; "
                f"the built-in model is {BUILTIN_TINY_INCEPTION!r}"
            )
        folder = builtin_folder(spec, "evaluate.inception_weights")
        network, digest = load_tiny_inception(folder), weights_digest(folder)
        return InceptionEmbedder(network, f"{spec}@{digest}", network.dim, device, weights=digest)
    name = f"clean-fid {INCEPTION_FILE} ({spec})"
    network = load_cleanfid_inception(spec)
    return InceptionEmbedder(network, name, 2048, device, weights=sha256_file(Path(spec).expanduser())[:16])
