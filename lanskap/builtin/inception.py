"""The built-in Inception stand-in: `features.TinyInception`, trained as Inception was, as a classifier, here of
what each procedural scene shows (sky palette, number of ridges and moons, islands, spires, lake, stars), on
both worlds. Its global-average-pool features then feed FID and KID, as Inception's pool features do. Input is
clean-fid's: `features.inception_pixels` (PIL bicubic to 299 x 299 on float32, values in [0, 255]). The heads
are dropped after training; only the feature network ships."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lanskap.builtin.config import TINY_INCEPTION, BuildConfig
from lanskap.builtin.training import LossLog, batch_indices, optimizer_and_schedule, train_loop
from lanskap.builtin.worlds import WorldImages
from lanskap.data.procedural import PALETTES
from lanskap.evaluate.features import TinyInception, inception_pixels

PALETTE_NAMES = sorted(PALETTES)
# Label heads: (name, number of classes); binary attributes are two-class heads too, so one loss serves all.
HEADS = [
    ("palette", len(PALETTE_NAMES)),
    ("ridges", 4),
    ("moons", 4),
    ("islands", 2),
    ("spires", 2),
    ("lake", 2),
    ("stars", 2),
]


def scene_labels(images: WorldImages) -> torch.Tensor:
    """Class indices [n, len(HEADS)], in the order of HEADS."""
    return torch.tensor(
        [
            [
                PALETTE_NAMES.index(s.palette),
                s.n_ridges - 2,
                s.n_moons,
                s.has_islands,
                s.has_spires,
                s.has_lake,
                s.has_stars,
            ]
            for s in images.scenes
        ]
    )


class SceneClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = TinyInception(**TINY_INCEPTION)
        self.heads = torch.nn.Linear(self.features.dim, sum(classes for _, classes in HEADS))

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        logits = self.heads(self.features(pixels))  # [B, sum of classes]
        return list(logits.split([classes for _, classes in HEADS], dim=1))


def pixels_of(images: WorldImages, rows) -> torch.Tensor:
    return torch.from_numpy(np.stack([inception_pixels(Image.fromarray(images.pixels[row])) for row in rows]))


def classification_loss(model: SceneClassifier, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(logits, labels[:, head]) for head, logits in enumerate(model(pixels)))


def train_inception(config: BuildConfig, images: WorldImages, held_out: WorldImages, log: LossLog):
    """Train the scene classifier; returns (feature network, held-out accuracy per head, seconds)."""
    torch.manual_seed(config.seed)
    model = SceneClassifier()
    labels, held_out_labels = scene_labels(images), scene_labels(held_out)
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
    with torch.no_grad():
        predictions = [logits.argmax(dim=1) for logits in model.eval()(held_out_pixels)]
    accuracy = {
        name: (predicted == held_out_labels[:, head]).float().mean().item()
        for head, ((name, _), predicted) in enumerate(zip(HEADS, predictions))
    }
    return model.features, accuracy, seconds
