"""The built-in Inception stand-in: `features.TinyInception`, trained as Inception was, as a classifier, here of
what each procedural scene shows (sky palette, number of ridges and moons, islands, spires, lake, stars), on
both worlds. Its global-average-pool features then feed FID and KID, as Inception's pool features do. Input is
clean-fid's: `features.inception_pixels` (PIL bicubic to 299 x 299 on float32, values in [0, 255]). The heads
(lanskap/builtin/heads.py) ship beside the feature network, for evaluation's diagnostics; FID and KID use the
features alone."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lanskap.builtin.config import TINY_INCEPTION, BuildConfig
from lanskap.builtin.heads import LABELS, SceneHeads, trait_indices
from lanskap.builtin.training import LossLog, batch_indices, optimizer_and_schedule, train_loop
from lanskap.builtin.worlds import WorldImages
from lanskap.evaluate.features import TinyInception, inception_pixels


class SceneClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = TinyInception(**TINY_INCEPTION)
        self.heads = SceneHeads(self.features.dim, LABELS)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.features(pixels))


def pixels_of(images: WorldImages, rows) -> torch.Tensor:
    return torch.from_numpy(np.stack([inception_pixels(Image.fromarray(images.pixels[row])) for row in rows]))


def classification_loss(model: SceneClassifier, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(logits, labels[:, head]) for head, logits in enumerate(model(pixels).values()))


def train_inception(config: BuildConfig, images: WorldImages, held_out: WorldImages, log: LossLog):
    """Train the scene classifier; returns (feature network, its heads, seconds)."""
    torch.manual_seed(config.seed)
    model = SceneClassifier()
    labels, held_out_labels = trait_indices(images.scenes), trait_indices(held_out.scenes)
    held_out_pixels = pixels_of(held_out, range(len(held_out)))
    generator = torch.Generator().manual_seed(config.seed)
    batches = batch_indices(len(images), config.inception.batch_size, generator)
    optimizer, schedule = optimizer_and_schedule(model.parameters(), config.inception, weight_decay=1e-4)

    def step_loss(step: int) -> torch.Tensor:
        rows = next(batches)
        return classification_loss(model, pixels_of(images, rows.tolist()), labels[rows])

    def held_out_loss() -> float:
        return classification_loss(model, held_out_pixels, held_out_labels).item()

    seconds = train_loop(config.inception, model, optimizer, schedule, step_loss, held_out_loss, log, "train Inception")
    return model.features, model.heads, seconds
