"""The demo's traits diagnostic: captions read back into what they ask for, shares per trait, the paired interval's
coverage (with the plain t-interval as the negative control), and the report's table."""

import numpy as np
import pytest
import torch
from scipy import stats

from lanskap.builtin.heads import LABELS, TRAITS, SceneHeads, scene_traits, trait_indices
from lanskap.data.procedural import sample_scene
from lanskap.evaluate.report import sample_size, traits_section
from lanskap.evaluate.traits import (
    asked_traits,
    caption_scene,
    detected_traits,
    paired_share_interval,
    trait_metrics,
)


def scenes(n: int, world: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, world) for _ in range(n)]


@pytest.mark.parametrize("world", ["fantasy", "base"])
def test_every_procedural_caption_reads_back_as_its_scene(world):
    drawn = scenes(300, world)
    assert [caption_scene(scene.caption()) for scene in drawn] == drawn
    assert caption_scene("sks " + drawn[0].caption() + ", trending") == drawn[0]  # caption.prefix / suffix


@pytest.mark.parametrize(
    "caption",
    [
        "a photo of a cat",
        "a fantasy landscape at violet dusk with six layered mountain ridges",
        "a fantasy landscape at violet dusk with two layered mountain ridges, one moons",  # not the Scene's wording
        "",
    ],
)
def test_other_captions_are_not_read(caption):
    assert caption_scene(caption) is None


def test_asked_traits_are_the_builders_labels_and_the_named_traits():
    drawn = scenes(50, "fantasy", seed=1)
    asked = asked_traits([scene.caption() for scene in drawn])
    indices = trait_indices(drawn).numpy()
    for column, trait in enumerate(TRAITS):
        assert (asked.classes[trait] == indices[:, column]).all()
    assert asked.asking["palette"].all() and asked.asking["ridges"].all()
    assert (asked.asking["islands"] == [scene.has_islands for scene in drawn]).all()
    assert (asked.asking["moons"] == [scene.n_moons > 0 for scene in drawn]).all()
    assert asked_traits([drawn[0].caption(), "a photo of a cat"]) is None
    assert asked_traits([]) is None


def test_detected_traits_take_each_heads_top_logit():
    heads = SceneHeads(2, LABELS)
    with torch.no_grad():
        heads.linear.weight.zero_()
        heads.linear.bias.zero_()
        # Column layout: palette (6), ridges (4), moons (4), islands (2), ...: islands True follows feature 0.
        heads.linear.weight[6 + 4 + 4 + 1, 0] = 1.0
    found = detected_traits(heads, np.array([[1.0, 0.0], [-1.0, 0.0]]))
    assert found["islands"].tolist() == [1, 0]
    assert set(found) == set(TRAITS)


def test_shares_gap_and_calibration_on_a_tiny_run():
    """Three prompts, two images each; prompts 0 and 1 ask for islands, prompt 2 does not."""
    drawn = [s for s in scenes(60, "fantasy", seed=2) if s.has_islands][:2] + [
        s for s in scenes(60, "fantasy", seed=2) if not s.has_islands
    ][:1]
    asked = asked_traits([scene.caption() for scene in drawn])
    prompt = np.array([0, 0, 1, 1, 2, 2])
    right = {trait: asked.classes[trait][prompt] for trait in TRAITS}
    detected = {
        "test": {trait: asked.classes[trait] for trait in TRAITS},
        "base": {**right, "islands": np.array([0, 0, 0, 1, 1, 1])},
        "lora": {**right, "islands": np.array([1, 1, 1, 0, 0, 0])},
    }
    detected["test"]["islands"] = np.array([1, 0, 0])  # the detector misses prompt 1's islands
    out = trait_metrics(asked, detected, prompt)
    assert out["traits_islands_prompts"] == 2
    assert out["traits_islands_share_base"] == pytest.approx((0 + 0.5) / 2)
    assert out["traits_islands_share_lora"] == pytest.approx((1 + 0.5) / 2)
    assert out["traits_islands_share_gap"] == pytest.approx(0.5)
    assert out["traits_islands_share_test"] == pytest.approx(0.5)
    assert out["traits_islands_detector_accuracy"] == pytest.approx(2 / 3)
    assert out["traits_islands_false_positive_test"] == 0  # prompt 2: no islands drawn, none found
    assert out["traits_islands_false_positive_base"] == 1  # prompt 2 asks for none: base finds them in both images
    assert out["traits_islands_false_positive_lora"] == 0
    assert "traits_palette_false_positive_test" not in out  # every caption asks for a palette
    assert out["traits_palette_share_gap"] == 0 and out["traits_palette_detector_accuracy"] == 1
    assert out["traits_islands_share_gap_ci_low"] < 0.5 < out["traits_islands_share_gap_ci_high"]
    for trait in TRAITS:  # a trait fewer than 2 prompts ask for gets its detector accuracy only
        assert (f"traits_{trait}_share_gap" in out) == (asked.asking[trait].sum() >= 2)
        assert f"traits_{trait}_detector_accuracy" in out


def plain_t_interval(lora, base):
    d = lora - base
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return d.mean() - half, d.mean() + half


def coverage(interval, n: int, p_lora: float, p_base: float, runs: int = 1500, seed: int = 0) -> float:
    """Share of simulated runs (one image per prompt, independent pairs) whose interval holds p_lora - p_base."""
    rng = np.random.default_rng(seed)
    lora = (rng.random((runs, n)) < p_lora).astype(float)
    base = (rng.random((runs, n)) < p_base).astype(float)
    held = [low <= p_lora - p_base <= high for low, high in (interval(a, b) for a, b in zip(lora, base))]
    return float(np.mean(held))


SHARES = [(0.0, 0.0), (0.05, 0.05), (0.3, 0.3), (0.1, 0.0), (0.2, 0.0), (0.5, 0.05), (0.6, 0.1), (0.9, 0.0)]


@pytest.mark.parametrize("n", [10, 20])
@pytest.mark.parametrize(("p_lora", "p_base"), SHARES)
def test_paired_interval_covers_the_share_difference(n, p_lora, p_base):
    # At 1500 runs a true 95 % coverage falls below 0.935 with probability about 2 %.
    assert coverage(paired_share_interval, n, p_lora, p_base) >= 0.935


def test_the_plain_t_interval_does_not_and_the_coverage_check_has_teeth():
    """A near-certain trait against an absent one: all pairs often agree and the t-interval shrinks to a point."""
    assert coverage(plain_t_interval, 10, 0.9, 0.0) < 0.8
    assert coverage(paired_share_interval, 10, 0.9, 0.0) >= 0.935


def test_paired_interval_excludes_zero_for_a_clear_effect_and_rejects_one_prompt():
    low, high = paired_share_interval(np.r_[np.ones(8), np.zeros(4)], np.zeros(12))
    assert 0 < low < 8 / 12 < high <= 1
    with pytest.raises(ValueError, match="at least 2 prompts"):
        paired_share_interval(np.ones(1), np.zeros(1))


def test_report_table_appears_only_with_trait_metrics():
    metrics = {
        "n_test": 20.0,
        "traits_palette_detector_accuracy": 1.0,
        "traits_palette_prompts": 20.0,
        "traits_palette_share_test": 1.0,
        "traits_palette_share_base": 0.0,
        "traits_palette_share_lora": 0.85,
        "traits_palette_share_gap": 0.85,
        "traits_palette_share_gap_ci_low": 0.6,
        "traits_palette_share_gap_ci_high": 0.95,
        "traits_spires_detector_accuracy": 0.8,
        "traits_spires_false_positive_test": 0.3,
        "traits_spires_false_positive_base": 0.1,
        "traits_spires_false_positive_lora": 0.9,
    }
    section = traits_section(metrics)
    assert "| palette | 20 | 1 | - | 1 | 0 | 0.85 | - | - | 0.85 [0.6, 0.95] |" in section
    assert "| spires | fewer than 2 | - | 0.3 | 0.8 |  |  | 0.1 | 0.9 |  |" in section
    assert traits_section({"n_test": 20.0}) is None
    assert sample_size("traits_palette_share_lora", metrics) == ""


def test_scene_traits_falsy_means_not_asked():
    """The asked rule rests on this: only the absent value of a named trait is falsy."""
    for scene in scenes(100, "fantasy", seed=3):
        values = scene_traits(scene)
        assert values["palette"] and values["ridges"]
        assert bool(values["moons"]) == (scene.n_moons > 0)
