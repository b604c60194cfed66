"""Properties of the built-in procedural dataset: determinism, captions that match
the drawn Scene, and images with the smooth structure of landscapes rather than noise."""

import numpy as np
import pytest

from lanskap.data.procedural import NUMBER_WORDS, PALETTES, WORLDS, Scene, generate, render, sample_scene

SIZE = 64


@pytest.fixture(scope="module")
def sixty():
    return generate(60, SIZE, 0)


@pytest.fixture(scope="module")
def uniform_noise():
    return np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3)).astype(np.float64)


def _arrays(items):
    return [np.asarray(image) for image, _ in items]


def _scene(**overrides) -> Scene:
    fields = dict(
        palette="violet dusk",
        n_ridges=3,
        n_moons=0,
        has_islands=False,
        has_spires=False,
        has_lake=False,
        has_stars=False,
    )
    return Scene(**{**fields, **overrides})


def test_same_seed_gives_byte_identical_items():
    first, second = generate(4, SIZE, 7), generate(4, SIZE, 7)
    assert [c for _, c in first] == [c for _, c in second]
    for a, b in zip(_arrays(first), _arrays(second)):
        assert a.tobytes() == b.tobytes()


def test_different_seeds_give_different_images():
    a, b = _arrays(generate(3, SIZE, 0)), _arrays(generate(3, SIZE, 1))
    assert all(not np.array_equal(x, y) for x, y in zip(a, b))


def test_item_depends_only_on_its_index_not_on_n():
    short, long = generate(5, SIZE, 3), generate(10, SIZE, 3)
    for (image_s, caption_s), (image_l, caption_l) in zip(short, long[:5]):
        assert caption_s == caption_l
        assert np.array_equal(np.asarray(image_s), np.asarray(image_l))


@pytest.mark.parametrize("size", [32, 65, 128])
def test_images_are_rgb_squares_of_the_requested_size(size):
    for image, caption in generate(3, size, 0):
        assert image.mode == "RGB"
        assert image.size == (size, size)
        assert isinstance(caption, str) and caption


@pytest.mark.parametrize("palette", sorted(PALETTES))
def test_caption_names_the_palette_and_ridge_count(palette):
    for n_ridges in range(2, 6):
        caption = _scene(palette=palette, n_ridges=n_ridges).caption()
        assert PALETTES[palette].phrase in caption
        assert f"{NUMBER_WORDS[n_ridges]} layered mountain ridges" in caption


@pytest.mark.parametrize("n_moons", [0, 1, 2, 3])
def test_caption_states_the_moon_count(n_moons):
    caption = _scene(n_moons=n_moons).caption()
    assert ("moon" in caption) == (n_moons > 0)
    if n_moons:
        assert f"{NUMBER_WORDS[n_moons]} moon" in caption


@pytest.mark.parametrize(
    ("field", "word"),
    [("has_lake", "lake"), ("has_islands", "floating islands"), ("has_spires", "spires"), ("has_stars", "star")],
)
def test_caption_mentions_a_feature_exactly_when_the_scene_has_it(field, word):
    assert word in _scene(**{field: True}).caption()
    assert word not in _scene(**{field: False}).caption()


def test_captions_of_busiest_scene_stay_short_for_clip():
    busiest = _scene(
        palette="emerald aurora",
        n_ridges=5,
        n_moons=3,
        has_islands=True,
        has_spires=True,
        has_lake=True,
        has_stars=True,
    )
    assert len(busiest.caption().split()) < 40


def test_sampled_scenes_stay_in_range_and_stars_only_in_dark_skies():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sample_scene(rng)
        assert scene.palette in PALETTES
        assert 2 <= scene.n_ridges <= 5 and 0 <= scene.n_moons <= 3
        assert not scene.has_stars or PALETTES[scene.palette].starry


def test_sixty_items_have_at_least_twenty_distinct_captions(sixty):
    assert len({caption for _, caption in sixty}) >= 20


def test_adjacent_pixels_are_much_closer_than_in_noise(sixty, uniform_noise):
    noise_step = np.abs(np.diff(uniform_noise, axis=1)).mean()
    for pixels in _arrays(sixty):
        step = np.abs(np.diff(pixels.astype(np.float64), axis=1)).mean()
        assert step < 0.2 * noise_step


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_sky_region_varies_less_than_noise(world, uniform_noise):
    sky_rows = SIZE // 6
    noise_var = uniform_noise[:sky_rows].var(axis=(0, 1)).mean()
    items = generate(60, SIZE, 0, world)
    sky_vars = [pixels[:sky_rows].astype(np.float64).var(axis=(0, 1)).mean() for pixels in _arrays(items)]
    # A big bright moon can fill the top rows, so bound every image loosely; an aurora lights half the skies
    # of the fantasy world, so only the base world's typical sky is bound tightly.
    assert max(sky_vars) < noise_var
    assert np.median(sky_vars) < (0.25 if world == "base" else 0.5) * noise_var


@pytest.mark.parametrize("palette", sorted(PALETTES))
def test_empty_sky_is_a_smooth_vertical_gradient(palette, uniform_noise):
    pixels = np.asarray(render(_scene(palette=palette), SIZE, np.random.default_rng(0))).astype(np.float64)
    sky = pixels[: SIZE // 5]
    across = (sky - sky.mean(axis=1, keepdims=True)).std()  # only the aurora varies along a row
    down = np.abs(np.diff(sky, axis=0)).mean()
    assert across < 0.3 * uniform_noise.std()
    assert down < 0.05 * np.abs(np.diff(uniform_noise, axis=0)).mean()


def test_worlds_split_the_palettes_and_keep_islands_and_spires_out_of_the_base_world():
    assert set(WORLDS["base"].palettes).isdisjoint(WORLDS["fantasy"].palettes)
    assert set(WORLDS["base"].palettes) | set(WORLDS["fantasy"].palettes) == set(PALETTES)
    base = [sample_scene(np.random.default_rng(i), "base") for i in range(300)]
    fantasy = [sample_scene(np.random.default_rng(i), "fantasy") for i in range(300)]
    assert all(s.palette in WORLDS["base"].palettes and not s.has_islands and not s.has_spires for s in base)
    assert all(s.palette in WORLDS["fantasy"].palettes for s in fantasy)
    assert sum(s.has_islands for s in fantasy) > 100 and sum(s.has_spires for s in fantasy) > 100


def test_worlds_draw_from_separate_random_streams():
    ((base_image, base_caption),) = generate(1, SIZE, 0, "base")
    ((fantasy_image, fantasy_caption),) = generate(1, SIZE, 0, "fantasy")
    assert base_caption != fantasy_caption
    assert not np.array_equal(np.asarray(base_image), np.asarray(fantasy_image))
