"""The paper's augmentation as one declared transform, used on the fly by train_lora and previewed by
preprocess: random resized crop, horizontal flip, colour jitter (brightness, contrast, saturation),
then normalisation with mean 0.5 / std 0.5 to [-1, 1]. The resize is done once by preprocess.
"""

from PIL import Image

from lanskap.params import AugmentParams


def train_transform(params: AugmentParams, resolution: int):
    """PIL RGB image -> float tensor [3, resolution, resolution] in [-1, 1], randomly augmented.

    Randomness comes from torch's global generator, so a seeded run is reproducible.
    """
    import torch
    from torchvision.transforms import v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(resolution, scale=params.crop_scale, ratio=params.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(params.hflip_p),
        v2.ColorJitter(brightness=params.brightness, contrast=params.contrast, saturation=params.saturation),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ])


def eval_transform(resolution: int):
    """PIL RGB image -> [3, resolution, resolution] in [-1, 1], no randomness (centre crop): held-out images."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.CenterCrop(resolution),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ])


def to_pil(tensor) -> Image.Image:
    """Inverse of the normalisation: [3, H, W] in [-1, 1] -> PIL RGB image."""
    array = ((tensor.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def canonical_image(image: Image.Image, resolution: int, center_crop: bool = True) -> Image.Image:
    """Shorter side resized to `resolution` (Lanczos), then centre-cropped to a square if asked."""
    scale = resolution / min(image.size)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.LANCZOS)
    if not center_crop:
        return image
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))
