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
from lanskap.data.procedural import WORLDS
from lanskap.evaluate.features import TinyInception, inception_pixels

# Traits the base world never shows (WORLDS["base"] has islands_p = spires_p = 0). Trained on both worlds, their
# heads learn the shortcut "fantasy sky, so islands": on 600 fantasy images the jointly trained islands head said
# "islands" for 83 % (prevalence 61 %, accuracy 58 %). Refit on fantasy images alone over the same frozen features,
# it must find the islands in the picture; the card gives both heads' accuracy within the fantasy world.
FANTASY_ONLY_TRAITS = ("islands", "spires")
REFIT_L2 = 1e-3  # keeps the refit well posed if a few features separate the classes


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
    model.eval()
    refit_fantasy_only_heads(model, images)
    return model.features, model.heads, seconds


def fantasy_rows(images: WorldImages) -> list[int]:
    return [row for row, scene in enumerate(images.scenes) if scene.palette in WORLDS["fantasy"].palettes]


@torch.no_grad()
def pool_features(network: TinyInception, images: WorldImages, rows: list[int], chunk: int = 64) -> torch.Tensor:
    """The frozen network's features [len(rows), dim] of images[rows]."""
    return torch.cat([network(pixels_of(images, rows[start : start + chunk])) for start in range(0, len(rows), chunk)])


def refit_fantasy_only_heads(model: SceneClassifier, images: WorldImages) -> None:
    """Refit, in place, the heads of FANTASY_ONLY_TRAITS on the fantasy images alone, the features frozen (see
    FANTASY_ONLY_TRAITS): so the detector must find islands in the picture, not in the sky's colour."""
    rows = fantasy_rows(images)
    features = pool_features(model.features, images, rows)  # [n, dim]
    targets = trait_indices([images.scenes[row] for row in rows])  # [n, heads]
    columns = list(model.heads.labels)
    for trait in FANTASY_ONLY_TRAITS:
        fit_head_rows(model.heads, trait, features, targets[:, columns.index(trait)])


def fit_head_rows(heads: SceneHeads, trait: str, features: torch.Tensor, targets: torch.Tensor) -> None:
    """Logistic regression (softmax over the trait's classes) by full-batch L-BFGS, from the head's current values,
    written back into the trait's rows of the shared linear layer."""
    rows = heads.rows(trait)
    weight = heads.linear.weight[rows].detach().clone().requires_grad_(True)  # [classes, dim]
    bias = heads.linear.bias[rows].detach().clone().requires_grad_(True)  # [classes]
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, targets) + REFIT_L2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        heads.linear.weight[rows] = weight
        heads.linear.bias[rows] = bias
