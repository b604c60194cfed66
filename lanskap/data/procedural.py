"""The built-in demo dataset ``builtin:procedural``: fantasy landscapes drawn from code.

Each item is a square RGB image and a caption that states exactly what was drawn.
A :class:`Scene` records the content (sky palette, number of mountain ridges, moons,
and whether there are floating islands, spires, a lake and stars); the caption is
derived from the Scene alone, and :func:`render` draws that Scene:

* a vertical three-stop sky gradient in one of six named fantasy palettes
  (an aurora curtain is added for the "emerald aurora" palette);
* optional stars, then one to three moons with a soft glow;
* optional floating islands (an inverted rock cone under a grassy cap);
* two to five fractal mountain ridges, drawn back to front with atmospheric
  perspective: farther ridges are blended towards the hazy sky colour and every
  ridge fades into valley mist at its foot;
* optional spires standing on the nearest ridge;
* an optional lake whose rippled surface mirrors everything above it.

Drawing is vectorised numpy over a coordinate grid at twice the requested size,
then downsampled with LANCZOS, which anti-aliases every edge for free.

Two worlds (``ingest.world``), so that fine-tuning has something to learn:

* ``base``: what the built-in ``builtin:tiny-sd2`` was pretrained on: golden dawn,
  crimson sunset, icy twilight and indigo midnight skies, ridges, moons, lakes and
  stars. Never violet or aurora skies, floating islands or spires.
* ``fantasy`` (the demo's training and test data): violet dusk and emerald aurora
  skies, often with floating islands and spires; ridges, moons, lakes and stars as
  in the base world. The base model has never drawn any of what sets it apart.

Determinism contract: :func:`generate` gives byte-identical images and identical
captions for the same ``(n, size, seed, world)``, and item ``i`` depends only on
``(i, size, seed, world)``, because it draws from its own
``numpy.random.default_rng([seed, i, world number])``.
So ``generate(5, s, k)[i] == generate(10, s, k)[i]`` for every ``i < 5``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

SUPERSAMPLE = 2  # render at this multiple of the target size, then downsample


@dataclass(frozen=True)
class Palette:
    """Colours of one named sky; RGB triples in 0..255."""

    phrase: str  # how the caption names the time of day, e.g. "at violet dusk"
    sky_top: tuple[int, int, int]
    sky_mid: tuple[int, int, int]
    sky_horizon: tuple[int, int, int]
    ridge: tuple[int, int, int]  # the nearest ridge; farther ones drift towards the haze
    moon: tuple[int, int, int]
    starry: bool  # dark enough for stars to show


PALETTES: dict[str, Palette] = {
    "violet dusk": Palette(
        "at violet dusk", (28, 16, 64), (118, 58, 140), (244, 150, 160), (26, 14, 40), (250, 236, 220), True
    ),
    "emerald aurora": Palette(
        "under an emerald aurora", (4, 12, 28), (10, 48, 62), (44, 120, 112), (8, 22, 28), (220, 245, 235), True
    ),
    "golden dawn": Palette(
        "at golden dawn", (96, 140, 200), (236, 186, 130), (255, 226, 160), (70, 48, 60), (255, 250, 235), False
    ),
    "crimson sunset": Palette(
        "at crimson sunset", (50, 16, 48), (190, 46, 52), (255, 150, 70), (36, 8, 18), (255, 228, 200), False
    ),
    "icy twilight": Palette(
        "in icy twilight", (18, 34, 78), (84, 130, 186), (205, 230, 245), (28, 44, 72), (235, 245, 255), True
    ),
    "indigo midnight": Palette(
        "at indigo midnight", (4, 4, 18), (18, 20, 58), (52, 46, 104), (6, 6, 16), (240, 240, 255), True
    ),
}



@dataclass(frozen=True)
class World:
    """Which scenes a world draws: its skies, and how often islands and spires appear."""

    palettes: tuple[str, ...]
    islands_p: float
    spires_p: float


WORLDS: dict[str, World] = {  # the order fixes each world's random stream: append, never reorder
    "fantasy": World(("violet dusk", "emerald aurora"), islands_p=0.6, spires_p=0.5),
    "base": World(("golden dawn", "crimson sunset", "icy twilight", "indigo midnight"), islands_p=0.0, spires_p=0.0),
}

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}

# Sky gradient stops (fraction of image height) for top, mid and horizon colours.
SKY_STOPS = (0.0, 0.33, 0.6)
FAR_RIDGE_BASE = 0.5  # where the farthest ridge meets its valley
LAND_BOTTOM = 0.94  # where the nearest ridge's valleys sit when there is no lake


@dataclass(frozen=True)
class Scene:
    """What one image shows. ``palette`` is a key of PALETTES and names the time of day."""

    palette: str
    n_ridges: int  # 2..5
    n_moons: int  # 0..3
    has_islands: bool
    has_spires: bool
    has_lake: bool
    has_stars: bool

    def caption(self) -> str:
        features = [f"{NUMBER_WORDS[self.n_ridges]} layered mountain ridges"]
        if self.n_moons:
            features.append(f"{NUMBER_WORDS[self.n_moons]} moon" + ("s" if self.n_moons > 1 else ""))
        if self.has_islands:
            features.append("floating islands")
        if self.has_spires:
            features.append("tall spires on the nearest ridge")
        if self.has_lake:
            features.append("a lake reflecting the sky")
        if self.has_stars:
            features.append("a starry sky")
        listed = features[0] if len(features) == 1 else ", ".join(features[:-1]) + " and " + features[-1]
        return f"a fantasy landscape {PALETTES[self.palette].phrase} with {listed}"


def sample_scene(rng: np.random.Generator, world: str = "fantasy") -> Scene:
    spec = WORLDS[world]
    palette = str(rng.choice(list(spec.palettes)))
    # Stars are only plausible in the dark palettes; draw the coin anyway so the
    # number of rng draws does not depend on the palette.
    wants_stars = rng.random() < 0.75
    return Scene(
        palette=palette,
        n_ridges=int(rng.integers(2, 6)),
        n_moons=int(rng.choice(4, p=[0.3, 0.35, 0.2, 0.15])),
        has_islands=bool(rng.random() < spec.islands_p),
        has_spires=bool(rng.random() < spec.spires_p),
        has_lake=bool(rng.random() < 0.45),
        has_stars=bool(wants_stars and PALETTES[palette].starry),
    )


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image; ``rng`` only places things."""
    palette = PALETTES[scene.palette]
    n = size * SUPERSAMPLE
    sky = _sky_gradient(palette, n)
    canvas = np.repeat(sky[:, None, :], n, axis=1)
    if scene.has_stars:
        _draw_stars(canvas, rng)
    if scene.palette == "emerald aurora":
        _draw_aurora(canvas, rng)
    _draw_moons(canvas, scene.n_moons, _rgb(palette.moon), rng)
    haze = _lerp(_rgb(palette.sky_mid), _rgb(palette.sky_horizon), 0.6)
    if scene.has_islands:
        _draw_islands(canvas, haze, rng)
    lake_line = rng.uniform(0.7, 0.76) if scene.has_lake else None
    _draw_ridges(canvas, scene, _rgb(palette.ridge), haze, lake_line, rng)
    if lake_line is not None:
        _draw_lake(canvas, sky, int(lake_line * n), rng)
    pixels = np.clip(canvas * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").resize((size, size), Image.Resampling.LANCZOS)


def generate_scene(index: int, size: int, seed: int, world: str = "fantasy") -> tuple[Scene, Image.Image]:
    """Item ``index`` of ``world``: (scene, image), depending only on ``(index, size, seed, world)``."""
    rng = np.random.default_rng([seed, index, list(WORLDS).index(world)])
    scene = sample_scene(rng, world)
    return scene, render(scene, size, rng)


def generate_item(index: int, size: int, seed: int, world: str = "fantasy") -> tuple[Image.Image, str]:
    """Item ``index`` of ``world``: (image, caption)."""
    scene, image = generate_scene(index, size, seed, world)
    return image, scene.caption()


def generate(n: int, size: int, seed: int, world: str = "fantasy") -> list[tuple[Image.Image, str]]:
    """``n`` (image, caption) pairs; item ``i`` depends only on ``(i, size, seed, world)``."""
    return [generate_item(i, size, seed, world) for i in range(n)]


def _rgb(colour: tuple[int, int, int]) -> np.ndarray:
    return np.asarray(colour, dtype=np.float32) / 255.0


def _lerp(a, b, t):
    """Linear blend from ``a`` (t=0) to ``b`` (t=1); works on floats and broadcast arrays."""
    return a + (b - a) * t


def _window(n: int, x0: float, x1: float, y0: float, y1: float):
    """Pixel slices and fractional coordinates for a box, so a small shape costs only its own area."""
    rows = slice(int(np.clip(y0 * n, 0, n)), int(np.clip(np.ceil(y1 * n), 0, n)))
    cols = slice(int(np.clip(x0 * n, 0, n)), int(np.clip(np.ceil(x1 * n), 0, n)))
    ys = ((np.arange(rows.start, rows.stop) + 0.5) / n)[:, None]
    xs = ((np.arange(cols.start, cols.stop) + 0.5) / n)[None, :]
    return rows, cols, ys, xs


def _sky_gradient(palette: Palette, n: int) -> np.ndarray:
    """One RGB colour per row: top -> mid -> horizon, flat below the horizon stop."""
    ys = (np.arange(n) + 0.5) / n
    stops = np.stack([_rgb(palette.sky_top), _rgb(palette.sky_mid), _rgb(palette.sky_horizon)])
    return np.stack([np.interp(ys, SKY_STOPS, stops[:, c]) for c in range(3)], axis=1).astype(np.float32)


def _draw_stars(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """Scatter 2x2-pixel stars over the upper sky so they survive the 2x downsample."""
    n = canvas.shape[0]
    count = int(rng.integers(120, 260))
    ys = rng.integers(0, int(0.55 * n), count)
    xs = rng.integers(0, n - 1, count)
    brightness = rng.uniform(0.45, 1.0, count)[:, None].astype(np.float32)
    # Fade stars towards the horizon, where the sky is brighter and hazier.
    strength = brightness * (1.0 - ys / (0.55 * n))[:, None].astype(np.float32)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        pixel = canvas[ys + dy, xs + dx]
        canvas[ys + dy, xs + dx] = np.maximum(pixel, _lerp(pixel, 1.0, strength))


def _draw_aurora(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """A wavy curtain of green light: bright lower edge, long fading upper tail, vertical rays."""
    n = canvas.shape[0]
    rows, cols, ys, xs = _window(n, 0.0, 1.0, 0.0, 0.5)
    phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(0.8, 1.6)
    edge = rng.uniform(0.26, 0.34) + 0.06 * np.sin(2 * np.pi * freq * xs + phase)
    below, above = ys - edge, edge - ys
    curtain = np.where(below > 0, np.exp(-((below / 0.02) ** 2)), np.exp(-above / 0.12))
    rays = 0.65 + 0.35 * np.sin(2 * np.pi * 23.0 * xs + 3.0 * np.sin(2 * np.pi * 3.0 * xs + phase))
    glow = (0.55 * curtain * rays).astype(np.float32)[..., None]
    canvas[rows, cols] += glow * np.array([0.25, 0.95, 0.55], dtype=np.float32)
    np.clip(canvas, 0.0, 1.0, out=canvas)


def _draw_moons(canvas: np.ndarray, count: int, colour: np.ndarray, rng: np.random.Generator) -> None:
    """Moons sit in separate horizontal slots, above the islands' band, so none is hidden."""
    n = canvas.shape[0]
    for slot in range(count):
        radius = rng.uniform(0.03, 0.075) / max(1.0, count * 0.7)
        cx = (slot + rng.uniform(0.3, 0.7)) / count
        cy = rng.uniform(0.08, 0.17)
        reach = radius * 3.5
        rows, cols, ys, xs = _window(n, cx - reach, cx + reach, cy - reach, cy + reach)
        dist = np.hypot(xs - cx, ys - cy)
        glow = (0.35 * np.exp(-np.maximum(dist - radius, 0) / (0.6 * radius)))[..., None]
        patch = _lerp(canvas[rows, cols], colour, glow)
        # Limb darkening makes the disc read as a sphere rather than a flat dot.
        limb = np.sqrt(np.clip(1.0 - (dist / radius) ** 2, 0, 1))[..., None]
        disc = (dist < radius)[..., None]
        canvas[rows, cols] = np.where(disc, colour * (0.8 + 0.2 * limb), patch)


def _draw_islands(canvas: np.ndarray, haze: np.ndarray, rng: np.random.Generator) -> None:
    """Two or three rock cones hanging in the sky, each under a dome of grass."""
    n = canvas.shape[0]
    count = int(rng.integers(2, 4))
    for slot in range(count):
        cx = (slot + rng.uniform(0.25, 0.75)) / count
        top = rng.uniform(0.21, 0.27)  # below the moons, above most crests
        half_width = rng.uniform(0.04, 0.08)
        depth = half_width * rng.uniform(1.1, 1.6)
        # Nearer (lower, larger) islands get less haze.
        haze_amount = 0.55 - 3.0 * (half_width - 0.04)
        _draw_island(canvas, n, (cx, top, half_width, depth), haze, haze_amount, rng)


def _draw_island(
    canvas: np.ndarray,
    n: int,
    shape: tuple[float, float, float, float],
    haze: np.ndarray,
    haze_amount: float,
    rng: np.random.Generator,
) -> None:
    """One island; ``shape`` is (centre x, grass line y, half-width, rock depth) as fractions."""
    cx, top, half_width, depth = shape
    cap = 0.25 * depth
    rows, cols, ys, xs = _window(n, cx - half_width, cx + half_width, top - cap, top + depth)
    # A jagged rim: the cone's half-width shrinks to zero with noise added per row.
    descent = np.clip((ys - top) / depth, 0, 1)
    jag = 0.012 * rng.standard_normal(ys.shape)
    rock = (ys >= top) & (np.abs(xs - cx) < half_width * (1 - descent) ** 0.9 + jag * (1 - descent))
    grass = ((xs - cx) / half_width) ** 2 + ((ys - top) / cap) ** 2 < 1.0
    grass &= ys < top + 0.35 * cap
    # Light from the left: the rock's left flank is brighter than its right.
    side = np.clip(0.5 - (xs - cx) / half_width, 0, 1)[..., None]
    rock_colour = _lerp(np.float32([0.22, 0.17, 0.15]), np.float32([0.48, 0.40, 0.34]), side)
    rock_colour = _lerp(rock_colour, haze, haze_amount)
    grass_colour = _lerp(np.float32([0.24, 0.52, 0.22]), haze, haze_amount)
    patch = canvas[rows, cols]
    patch[:] = np.where(rock[..., None], rock_colour, patch)
    patch[:] = np.where(grass[..., None], grass_colour, patch)


def _fractal_profile(n: int, roughness: float, rng: np.random.Generator) -> np.ndarray:
    """1-D summed-octave value noise in [0, 1]; linear interpolation keeps peaks sharp."""
    xs = np.linspace(0.0, 1.0, n)
    total = np.zeros(n)
    amplitude = 1.0
    for octave in range(7):
        knots = 3 * 2**octave + 1
        total += amplitude * np.interp(xs, np.linspace(0.0, 1.0, knots), rng.random(knots))
        amplitude *= roughness
    return (total - total.min()) / (total.max() - total.min())


def _draw_ridges(
    canvas: np.ndarray,
    scene: Scene,
    near_colour: np.ndarray,
    haze: np.ndarray,
    lake_line: float | None,
    rng: np.random.Generator,
) -> None:
    """Ridges back to front; each nearer one is lower, taller, rougher and less hazy."""
    n = canvas.shape[0]
    ys = ((np.arange(n) + 0.5) / n)[:, None]
    ground = LAND_BOTTOM if lake_line is None else lake_line + 0.01
    for k in range(scene.n_ridges):
        depth = k / (scene.n_ridges - 1)  # 0 = farthest, 1 = nearest
        base = _lerp(FAR_RIDGE_BASE, ground, depth)
        height = rng.uniform(0.12, 0.18) + 0.1 * depth
        crest = base - height * _fractal_profile(n, 0.45 + 0.1 * depth, rng)
        colour = _lerp(near_colour, haze, 0.75 * (1 - depth) ** 1.2)
        # Valley mist: each ridge fades back towards the haze near its foot.
        mist = 0.4 * np.clip((ys - (base - 0.4 * height)) / (0.6 * height), 0, 1) ** 2
        shaded = _lerp(colour, haze, mist[..., None].astype(np.float32))
        inside = (ys >= crest[None, :])[..., None]
        canvas[:] = np.where(inside, shaded, canvas)
        if scene.has_spires and k == scene.n_ridges - 1:
            _draw_spires(canvas, crest, colour, rng)


def _draw_spires(canvas: np.ndarray, crest: np.ndarray, colour: np.ndarray, rng: np.random.Generator) -> None:
    """Slender towers with pointed roofs, planted on the highest points of the ridge."""
    n = canvas.shape[0]
    count = int(rng.integers(1, 4))
    for slot in range(count):
        # Highest crest point inside this slot, so the tower stands on a summit.
        lo = int((slot + 0.1) * n / count)
        hi = max(int((slot + 0.9) * n / count), lo + 1)
        peak = lo + int(np.argmin(crest[lo:hi]))  # smallest y is the highest point
        cx, foot = (peak + 0.5) / n, crest[peak] + 0.01
        half_width = rng.uniform(0.008, 0.014)
        body, roof = rng.uniform(0.07, 0.14), rng.uniform(0.05, 0.08)
        rows, cols, ys, xs = _window(n, cx - 2 * half_width, cx + 2 * half_width, foot - body - roof, foot)
        offset = np.abs(xs - cx)
        shaft = (ys > foot - body) & (offset < half_width * (1 + 0.3 * (ys - foot + body) / body))
        taper = np.clip((ys - (foot - body - roof)) / roof, 0, 1)
        spire = shaft | ((ys <= foot - body) & (offset < 1.3 * half_width * taper))
        patch = canvas[rows, cols]
        patch[:] = np.where(spire[..., None], colour * 0.85, patch)


def _draw_lake(canvas: np.ndarray, sky: np.ndarray, shore: int, rng: np.random.Generator) -> None:
    """Mirror everything above the shore line into the water, with ripples and a sky sheen."""
    n = canvas.shape[0]
    below = np.arange(shore, n)
    source = np.clip(2 * shore - below - 1, 0, n - 1)
    # Ripples shift each mirrored row sideways, more strongly nearer the viewer.
    distance = (below - shore) / max(n - shore, 1)
    phase = rng.uniform(0, 2 * np.pi)
    shift = np.round(distance * 0.005 * n * np.sin(below * 0.3 + phase)).astype(int)
    columns = (np.arange(n)[None, :] + shift[:, None]) % n
    mirrored = canvas[source[:, None], columns]
    sheen = sky[source][:, None, :]
    # Water darkens towards the viewer, where less light is reflected.
    darkening = (0.82 - 0.2 * distance)[:, None, None]
    water = _lerp(mirrored * darkening, sheen, 0.25).astype(np.float32)
    canvas[shore:] = water
    # A faint bright line where water meets land sells the surface.
    canvas[shore : shore + 2] = _lerp(canvas[shore : shore + 2], sky[-1], 0.35)
