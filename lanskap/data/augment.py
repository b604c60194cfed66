"""The paper's augmentation as one declared transform, used on the fly by train_lora and previewed by
preprocess: random resized crop, horizontal flip, colour jitter (brightness, contrast, saturation),
then normalisation with mean 0.5 / std 0.5 to [-1, 1]. The resize is done once by preprocess.
"""

from PIL import Image

from lanskap.core.params import AugmentParams


def train_transform(params: AugmentParams, size: tuple[int, int]):
    """PIL RGB image -> float tensor [3, height, width] in [-1, 1], randomly augmented, for a training size
    (width, height): the square resolution, or an aspect-ratio bucket.

    The crop's aspect-ratio range is relative to the size's own (augment.crop_ratio x width / height), so a wide
    bucket takes wide crops, as a square takes near-square ones. Randomness comes from torch's global generator,
    so a seeded run is reproducible."""
    import torch
    from torchvision.transforms import v2

    width, height = size
    aspect = width / height  # exactly 1.0 for a square: the paper's ratios unchanged, bit for bit
    ratio = (params.crop_ratio[0] * aspect, params.crop_ratio[1] * aspect)
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop((height, width), scale=params.crop_scale, ratio=ratio, antialias=True),
        v2.RandomHorizontalFlip(params.hflip_p),
        v2.ColorJitter(brightness=params.brightness, contrast=params.contrast, saturation=params.saturation),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ])


def eval_transform(size: tuple[int, int]):
    """PIL RGB image -> [3, height, width] in [-1, 1], no randomness (centre crop to (width, height)): held-out
    images."""
    import torch
    from torchvision.transforms import v2

    width, height = size
    return v2.Compose([
        v2.PILToTensor(),
        v2.CenterCrop((height, width)),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ])


def to_pil(tensor) -> Image.Image:
    """Inverse of the normalisation: [3, H, W] in [-1, 1] -> PIL RGB image."""
    array = ((tensor.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def canonical_image(image: Image.Image, resolution: int, center_crop: bool = True) -> Image.Image:
    """Shorter side resized to `resolution` (Lanczos), then centre-cropped to a square if asked."""
    return fit_to_size(image, resolution, resolution, crop=center_crop)


def fit_to_size(image: Image.Image, width: int, height: int, crop: bool = True) -> Image.Image:
    """Resized (Lanczos) to the smallest size covering width x height with the aspect ratio kept, then the excess
    centre-cropped if asked: an image of the target's aspect ratio loses nothing."""
    scale = max(width / image.width, height / image.height)
    size = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize(size, Image.Resampling.LANCZOS)
    if not crop:
        return image
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))
