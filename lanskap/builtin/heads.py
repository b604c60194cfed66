"""The tiny-inception scene heads: linear classifiers over its 64-d pool features of what a procedural scene shows
(sky palette, number of ridges and moons, islands, spires, lake, stars). The builder trains them with the
features and ships them beside them, so evaluation can ask the stand-in what a generated image shows:

    from lanskap.builtin.heads import load_scene_heads
    heads = load_scene_heads(folder)                 # folder: builtin_folder("builtin:tiny-inception", key)
    logits = heads(torch.from_numpy(features))       # features [n, 64] from load_inception(...).features(paths)
    heads.labels["ridges"][logits["ridges"].argmax(1)[0]]   # -> 2, 3, 4 or 5

`heads.safetensors` holds one linear layer (`weight` [classes, 64], `bias` [classes]) whose outputs are the heads'
logits one after another; config.json's "heads" records their order and labels: [{"name": ..., "labels": [...]}].
"""

import json
from pathlib import Path

import numpy as np
import torch

from lanskap.core.errors import UserError
from lanskap.data.procedural import PALETTES, Scene

HEADS_FILE = "heads.safetensors"

# What each head classifies: the Scene attribute it reads and its classes in order (the logits' columns).
TRAITS: dict[str, tuple[str, list]] = {
    "palette": ("palette", sorted(PALETTES)),
    "ridges": ("n_ridges", [2, 3, 4, 5]),
    "moons": ("n_moons", [0, 1, 2, 3]),
    "islands": ("has_islands", [False, True]),
    "spires": ("has_spires", [False, True]),
    "lake": ("has_lake", [False, True]),
    "stars": ("has_stars", [False, True]),
}
LABELS = {name: labels for name, (_, labels) in TRAITS.items()}


def scene_traits(scene: Scene) -> dict[str, object]:
    """What `scene` shows, head by head: {"palette": "violet dusk", "ridges": 3, ..., "stars": False}."""
    return {name: getattr(scene, attribute) for name, (attribute, _) in TRAITS.items()}


def trait_indices(scenes: list[Scene]) -> torch.Tensor:
    """Class indices [n, len(TRAITS)], the heads' training targets, in the order of TRAITS."""
    return torch.tensor(
        [[LABELS[name].index(value) for name, value in scene_traits(scene).items()] for scene in scenes]
    )


class SceneHeads(torch.nn.Module):
    """Features [n, dim] (any float dtype; the embedders give float64) -> {head name: logits [n, its labels]};
    `labels[name][i]` names logit column i."""

    def __init__(self, dim: int, labels: dict[str, list]):
        super().__init__()
        self.labels = labels
        self.linear = torch.nn.Linear(dim, sum(len(classes) for classes in labels.values()))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.linear(features.to(self.linear.weight.dtype))
        return dict(zip(self.labels, logits.split([len(classes) for classes in self.labels.values()], dim=1)))

    def rows(self, name: str) -> slice:
        """The rows of the shared linear layer that give head `name`'s logits."""
        names = list(self.labels)
        start = sum(len(self.labels[other]) for other in names[: names.index(name)])
        return slice(start, start + len(self.labels[name]))

    def layout(self) -> list[dict]:
        """The heads' order and labels, as config.json records them."""
        return [{"name": name, "labels": classes} for name, classes in self.labels.items()]


def head_accuracy(heads: SceneHeads, features: np.ndarray, scenes: list[Scene]) -> dict[str, float]:
    """Per head, the fraction of images whose top logit is the label of what their scene shows."""
    with torch.no_grad():
        logits = heads(torch.from_numpy(features))
    targets = trait_indices(scenes)
    return {
        name: (head_logits.argmax(dim=1) == targets[:, column]).float().mean().item()
        for column, (name, head_logits) in enumerate(logits.items())
    }


def save_scene_heads(heads: SceneHeads, folder: Path) -> None:
    """Write `heads.safetensors` (fp16, as the features ship); the caller records `heads.layout()` in config.json."""
    from safetensors.torch import save_file

    save_file({name: tensor.half() for name, tensor in heads.linear.state_dict().items()}, folder / HEADS_FILE)


def load_scene_heads(folder: Path) -> SceneHeads:
    """The heads shipped in a tiny-inception folder, in float32 and eval mode, or a UserError saying how to get them."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    if "heads" not in config or not (folder / HEADS_FILE).is_file():
        raise UserError(
            f"{folder} has no scene heads ({HEADS_FILE} and config.json's 'heads'); they ship with tiny-inception "
            "built since the heads were kept: rebuild it with `python -m lanskap.builtin tiny-inception`"
        )
    labels = {head["name"]: head["labels"] for head in config["heads"]}
    state = load_file(folder / HEADS_FILE)
    heads = SceneHeads(state["weight"].shape[1], labels)
    heads.linear.load_state_dict({name: tensor.float() for name, tensor in state.items()})
    return heads.eval()
