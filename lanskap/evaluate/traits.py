"""The demo's "traits" diagnostic: does a model draw what its prompts ask for?

Demo only. The built-in Inception stand-in (`builtin:tiny-inception`) was trained as a scene classifier of
procedural landscapes (sky palette, number of ridges and moons, floating islands, spires, lake, stars), and its
heads ship beside its features. The procedural captions state exactly what was drawn (`Scene.caption`), so each
test caption is parsed back into the classes the heads predict. For every trait a prompt asks for:

- share_base / share_lora: the share of the base and of the LoRA images whose detected class is the asked one
  (the palette and ridge count are asked by every prompt; moons, islands, spires, lake and stars only where the
  caption names them), over the prompts that ask for the trait;
- share_gap: LoRA minus base, paired by prompt and seed, with a 95 % interval over those prompts (below);
- share_test, false_positive_test and detector_accuracy: the calibration, on the reference test images, whose
  classes are known: the share in which the detector finds the trait where it is drawn, the share in which it
  finds it where it is not (traits not every caption asks for), and its accuracy over all test images. A share
  on generated images is worth reading only as far as the detector tells drawn from not drawn on real ones;
- false_positive_base / false_positive_lora: the same on generated images, the share of images whose prompt does
  not ask for the trait in which it is found. A model that shows a trait as often where it is not asked has not
  learnt to draw it on request: the detector may be answering to the look of that model's images.

Interval: each prompt gives d = (LoRA share - base share) of its images, in [-1, 1]. With one image per prompt
this is a difference of paired proportions, where the plain t-interval fails (all-equal pairs give a zero-width
interval: at n = 10 prompts and a true share of 0.9 against 0, it covered 65 %). We use the adjusted Wald
interval of Bonett and Price (2012), which adds one discordant pair each way (n + 2 pairs, moments of d), with
Student's t quantile (n - 1 degrees of freedom) in place of z: in simulation over n = 6-30 and shares 0-1 it
covered at least 95 % (`tests/test_traits.py`), where the z version dipped to 93 %.
"""

import re
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from lanskap.builtin.heads import TRAITS, SceneHeads, scene_traits, trait_indices
from lanskap.data.procedural import NUMBER_WORDS, PALETTES, Scene

CONFIDENCE = 0.95
_NUMBERS = "|".join(NUMBER_WORDS.values())
_WORD_VALUE = {word: value for value, word in NUMBER_WORDS.items()}


def caption_scene(caption: str) -> Scene | None:
    """The Scene a procedural caption states, or None for any other caption. A prefix or suffix around it (trigger
    words) is allowed; the parse counts only if the Scene's own caption reads exactly as found."""
    palette = next((name for name, p in PALETTES.items() if f" {p.phrase} with " in caption), None)
    ridges = re.search(rf"\b({_NUMBERS}) layered mountain ridges\b", caption)
    if palette is None or ridges is None:
        return None
    moons = re.search(rf"\b({_NUMBERS}) moons?\b", caption)
    scene = Scene(
        palette=palette,
        n_ridges=_WORD_VALUE[ridges.group(1)],
        n_moons=_WORD_VALUE[moons.group(1)] if moons else 0,
        has_islands="floating islands" in caption,
        has_spires="tall spires on the nearest ridge" in caption,
        has_lake="a lake reflecting the sky" in caption,
        has_stars="a starry sky" in caption,
    )
    return scene if scene.caption() in caption else None


@dataclass(frozen=True)
class AskedTraits:
    """What each test caption asks for, per trait (in the heads' order): the class index its head should predict
    [n], and whether the caption asks for the trait at all [n] (palette and ridges always; moons, islands,
    spires, lake and stars where named: a falsy value, 0 moons or False, is not asked for)."""

    classes: dict[str, np.ndarray]
    asking: dict[str, np.ndarray]


def asked_traits(captions: list[str]) -> AskedTraits | None:
    """The traits the captions ask for; None unless every caption is a procedural one."""
    scenes = [caption_scene(caption) for caption in captions]
    if not scenes or any(scene is None for scene in scenes):
        return None
    indices = trait_indices(scenes).numpy()
    values = [scene_traits(scene) for scene in scenes]
    return AskedTraits(
        classes={trait: indices[:, column] for column, trait in enumerate(TRAITS)},
        asking={trait: np.array([bool(row[trait]) for row in values]) for trait in TRAITS},
    )


def detected_traits(heads: SceneHeads, features: np.ndarray) -> dict[str, np.ndarray]:
    """The class index each head predicts per image [n], from the stand-in's pool features [n, dim]."""
    with torch.no_grad():
        logits = heads(torch.from_numpy(features))
    return {trait: head_logits.argmax(dim=1).numpy() for trait, head_logits in logits.items()}


def paired_share_interval(lora: np.ndarray, base: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Interval for the mean of LoRA minus base shares over prompts ([n] each, in [0, 1]), see the module doc."""
    differences = np.asarray(lora, dtype=float) - np.asarray(base, dtype=float)
    n = len(differences)
    if n < 2:
        raise ValueError(f"a paired interval needs at least 2 prompts; got {n}")
    # Two pseudo-prompts, one at +1 and one at -1: the mean shrinks towards 0 and the variance never vanishes.
    mean = differences.sum() / (n + 2)
    second_moment = (np.sum(differences**2) + 2) / (n + 2)
    half_width = stats.t.ppf((1 + confidence) / 2, n - 1) * np.sqrt((second_moment - mean**2) / (n + 2))
    return max(mean - half_width, -1.0), min(mean + half_width, 1.0)


def per_prompt_share(found: np.ndarray, prompt: np.ndarray, n_prompts: int) -> np.ndarray:
    """Share of each prompt's images in which the trait was found: [n_prompts] from per-image booleans."""
    return np.bincount(prompt, found.astype(float), n_prompts) / np.bincount(prompt, minlength=n_prompts)


def trait_metrics(asked: AskedTraits, detected: dict[str, dict[str, np.ndarray]], prompt: np.ndarray) -> dict:
    """Flat `traits_<trait>_*` metrics. `detected[set][trait]`: the detected class per image, for set "test" (row
    i: test image i) and "base", "lora" (row r: an image of prompt `prompt[r]`, the same rows in both). A trait
    fewer than 2 prompts ask for gets its detector accuracy only."""
    out = {}
    for trait, wanted in asked.classes.items():
        asking = asked.asking[trait]
        test_found = detected["test"][trait] == wanted
        out[f"traits_{trait}_detector_accuracy"] = float(test_found.mean())
        if not asking.all():  # found where the caption does not ask: the detector's false-positive rate
            out[f"traits_{trait}_false_positive_test"] = float(1 - test_found[~asking].mean())
            unasked = ~asking[prompt]  # generated images whose prompt does not ask
            for name in ("base", "lora"):
                found = detected[name][trait] == wanted[prompt]
                out[f"traits_{trait}_false_positive_{name}"] = float(1 - found[unasked].mean())
        if asking.sum() < 2:
            continue
        shares = {
            name: per_prompt_share(detected[name][trait] == wanted[prompt], prompt, len(wanted))[asking]
            for name in ("base", "lora")
        }
        out[f"traits_{trait}_prompts"] = float(asking.sum())
        out[f"traits_{trait}_share_test"] = float(test_found[asking].mean())
        out[f"traits_{trait}_share_base"] = float(shares["base"].mean())
        out[f"traits_{trait}_share_lora"] = float(shares["lora"].mean())
        out[f"traits_{trait}_share_gap"] = float(shares["lora"].mean() - shares["base"].mean())
        low, high = paired_share_interval(shares["lora"], shares["base"])
        out[f"traits_{trait}_share_gap_ci_low"], out[f"traits_{trait}_share_gap_ci_high"] = low, high
    return out


def run_traits(captions: list[str], inception: dict[str, np.ndarray], prompt: np.ndarray) -> dict[str, float]:
    """The diagnostic for one evaluate run on `builtin:tiny-inception`: its heads on the pool features already
    extracted (`inception[set]`, sets test, base and lora). Empty, with a line saying why, when the test captions
    are not all procedural ones (the demo machinery on the user's own images)."""
    from lanskap.builtin import builtin_folder
    from lanskap.builtin.heads import load_scene_heads
    from lanskap.evaluate.features import BUILTIN_TINY_INCEPTION

    asked = asked_traits(captions)
    if asked is None:
        print("evaluate: no traits diagnostic: the test captions are not builtin:procedural's")
        return {}
    heads = load_scene_heads(builtin_folder(BUILTIN_TINY_INCEPTION, "evaluate.inception_weights"))
    detected = {name: detected_traits(heads, inception[name]) for name in ("test", "base", "lora")}
    return trait_metrics(asked, detected, prompt)
