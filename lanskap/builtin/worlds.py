"""The builder's data: procedural images of either world, drawn and resized exactly as the demo's ingest and
preprocess stages draw and resize them, so the models learn the distribution the demo shows them."""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lanskap.builtin.sources import DATA_SOURCES, source_digest
from lanskap.core.console import progress
from lanskap.core.io import atomic_dir
from lanskap.data.augment import canonical_image
from lanskap.data.procedural import Scene, generate_scene


@dataclass
class WorldImages:
    pixels: np.ndarray  # uint8 [n, resolution, resolution, 3]
    captions: list[str]
    scenes: list[Scene]

    def __len__(self) -> int:
        return len(self.captions)

    def take(self, count: int) -> "WorldImages":
        return WorldImages(self.pixels[:count], self.captions[:count], self.scenes[:count])

    @staticmethod
    def concat(parts: list["WorldImages"]) -> "WorldImages":
        return WorldImages(
            np.concatenate([part.pixels for part in parts]),
            [caption for part in parts for caption in part.captions],
            [scene for part in parts for scene in part.scenes],
        )


def render_world(world: str, count: int, seed: int, render_size: int, resolution: int) -> WorldImages:
    """Items 0..count-1 of `world` at `seed`, drawn at render_size and resized as preprocess does."""
    pixels = np.empty((count, resolution, resolution, 3), dtype=np.uint8)
    scenes = []
    for index in progress(range(count), desc=f"draw {world} world", unit="image", disable=count < 100):
        scene, image = generate_scene(index, render_size, seed, world)
        pixels[index] = np.asarray(canonical_image(image, resolution))
        scenes.append(scene)
    return WorldImages(pixels, [scene.caption() for scene in scenes], scenes)


def cached_world(work: Path, world: str, count: int, seed: int, render_size: int, resolution: int) -> WorldImages:
    """`render_world`, kept in the build's work folder so that each model's build draws the images once; keyed by
    the drawing code's digest, so that changed code draws afresh."""
    code = source_digest(DATA_SOURCES)[:12]
    folder = work / "worlds" / f"{world}-{seed}-{count}-{render_size}-{resolution}-{code}"
    if (folder / "scenes.json").is_file():
        scenes = [Scene(**fields) for fields in json.loads((folder / "scenes.json").read_text())]
        return WorldImages(np.load(folder / "pixels.npy"), [scene.caption() for scene in scenes], scenes)
    images = render_world(world, count, seed, render_size, resolution)
    with atomic_dir(folder) as staging:  # two builds running side by side may both draw it
        np.save(staging / "pixels.npy", images.pixels)
        (staging / "scenes.json").write_text(json.dumps([asdict(scene) for scene in images.scenes]))
    return images


def to_unit_range(pixels: np.ndarray):
    """uint8 [n, H, W, 3] -> float32 tensor [n, 3, H, W] in [-1, 1], the VAE's input range."""
    import torch

    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
