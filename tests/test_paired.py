"""LoRA-minus-base gaps (lanskap.evaluate.paired): the algebra against recomputation, the interval's coverage and
the gap test's size by simulation (also where LoRA and base images differ at equal distance from the test set, and
the swap test rejects), the unclamped CLIP cosine gap, and evaluate's refusal of unpaired images."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from lanskap.core.errors import UserError
from lanskap.core.params import conf_group
from lanskap.evaluate import metrics, paired
from lanskap.evaluate.comparisons import Features, check_pairing, lora_minus_base


def unit(rows: np.ndarray) -> np.ndarray:
    return metrics.l2_normalise(rows)


def prompt_sets(
    rng,
    n: int,
    per_prompt: int,
    dim: int = 8,
    lora_noise: float = 0.3,
    base_noise: float = 0.8,
    base_shift: float = 1.0,
):
    """Test images near one latent per prompt; LoRA images near their prompt's, base images shifted in one
    direction and (by default) more diverse."""
    latent = rng.normal(size=(n, dim))
    prompt = np.repeat(np.arange(n), per_prompt)
    shift = np.zeros(dim)
    shift[0] = base_shift
    test = unit(latent + 0.5 * rng.normal(size=(n, dim)))
    lora = unit(latent[prompt] + 0.5 * shift + lora_noise * rng.normal(size=(len(prompt), dim)))
    base = unit(latent[prompt] + shift + base_noise * rng.normal(size=(len(prompt), dim)))
    return test, lora, base, prompt


def recomputed_cmmd_gap(lora, base, test):
    return metrics.cmmd(lora, test) - metrics.cmmd(base, test)


# --- the gaps' algebra ---------------------------------------------------------------------------------


def test_cmmd_gap_value_leave_one_out_and_swaps_equal_recomputation():
    rng = np.random.default_rng(0)
    test, lora, base, prompt = prompt_sets(rng, 7, per_prompt=2)
    gap = paired.cmmd_gap(lora, base, test, prompt)
    assert gap.value == pytest.approx(recomputed_cmmd_gap(lora, base, test), abs=1e-12)
    for i in range(7):
        kept = prompt != i
        assert gap.leave_one_out[i] == pytest.approx(
            recomputed_cmmd_gap(lora[kept], base[kept], np.delete(test, i, axis=0)), abs=1e-12
        )
    for _ in range(5):
        swap = rng.random(7) < 0.5
        rows = swap[prompt][:, None]
        expected = recomputed_cmmd_gap(np.where(rows, base, lora), np.where(rows, lora, base), test)
        assert gap.swapped(swap) == pytest.approx(expected, abs=1e-12)


def test_clip_cosine_gap_value_leave_one_out_and_swaps_equal_recomputation():
    rng = np.random.default_rng(1)
    text, lora, base, prompt = prompt_sets(rng, 6, per_prompt=3)
    captions = text[prompt]
    gap = paired.clip_cosine_gap(lora, base, text, prompt)

    def recomputed(lora_rows, base_rows, kept=slice(None)):
        return np.mean(metrics.clip_cosines(lora_rows[kept], captions[kept])) - np.mean(
            metrics.clip_cosines(base_rows[kept], captions[kept])
        )

    assert gap.value == pytest.approx(recomputed(lora, base), abs=1e-12)
    assert gap.leave_one_out == pytest.approx([recomputed(lora, base, prompt != i) for i in range(6)], abs=1e-12)
    swap = np.array([True, False, False, True, True, False])
    rows = swap[prompt][:, None]
    assert gap.swapped(swap) == pytest.approx(recomputed(np.where(rows, base, lora), np.where(rows, lora, base)))


def test_jackknife_t_of_a_mean_is_the_classical_t_interval_and_t_test():
    values = np.random.default_rng(2).normal(size=12) + 0.4
    leave_one_out = (values.sum() - values) / 11
    test = paired.jackknife_t(values.mean(), leave_one_out)
    half_width = stats.t.ppf(0.975, 11) * values.std(ddof=1) / np.sqrt(12)
    assert (test.corrected, test.low, test.high) == pytest.approx(
        (values.mean(), values.mean() - half_width, values.mean() + half_width)
    )
    assert test.pvalue == pytest.approx(stats.ttest_1samp(values, 0.0).pvalue, rel=1e-9)


def test_gap_pvalue_is_below_005_exactly_when_the_interval_excludes_0():
    """By construction, for means and for CMMD gaps alike, at effects spread around the 5 % boundary."""
    rng = np.random.default_rng(6)
    cases = []
    for _ in range(400):
        n = int(rng.integers(6, 30))
        values = rng.normal(size=n) + rng.uniform(-1.0, 1.0)
        cases.append(paired.jackknife_t(values.mean(), (values.sum() - values) / (n - 1)))
    for _ in range(100):
        test, lora, base, prompt = prompt_sets(rng, 10, per_prompt=1, base_shift=rng.uniform(0.0, 0.6))
        gap = paired.cmmd_gap(lora, base, test, prompt)
        cases.append(paired.jackknife_t(gap.value, gap.leave_one_out))
    rejected = [case.pvalue < 0.05 for case in cases]
    assert rejected == [case.low > 0 or case.high < 0 for case in cases]
    assert 0.2 < np.mean(rejected) < 0.8  # both sides of the boundary are exercised
    assert paired.jackknife_t(0.0, np.zeros(8)).pvalue == 1.0  # no change at all: LoRA switched off


# --- coverage ------------------------------------------------------------------------------------------

REPETITIONS = 1000  # binomial standard error of a 95 % coverage: 0.7 points
MIN_COVERAGE = 0.94


def mean_coverage(n: int, quantile: float | None = None) -> float:
    """Coverage of 0 by the interval for the mean of n normal differences; `quantile` replaces Student's
    t by a fixed one (the negative control)."""
    rng = np.random.default_rng(10 + n)
    covered = 0
    for _ in range(REPETITIONS):
        values = rng.normal(size=n)
        leave_one_out = (values.sum() - values) / (n - 1)
        if quantile is None:
            test = paired.jackknife_t(values.mean(), leave_one_out)
            low, high = test.low, test.high
        else:
            half_width = quantile * np.sqrt(metrics.jackknife_variance(leave_one_out))
            low, high = values.mean() - half_width, values.mean() + half_width
        covered += low <= 0 <= high
    return covered / REPETITIONS


def population_cmmd_gap(rng) -> float:
    """The gap with unlimited prompts: unbiased CMMDs of 3000 images each, test images from independent
    prompts (the population compares marginal distributions)."""
    test, _, _, _ = prompt_sets(rng, 3000, per_prompt=1)
    _, lora, base, _ = prompt_sets(rng, 3000, per_prompt=1)
    return metrics.cmmd(lora, test, unbiased=True) - metrics.cmmd(base, test, unbiased=True)


def cmmd_gap_coverage(n: int, truth: float) -> float:
    rng = np.random.default_rng(20 + n)
    covered = 0
    for _ in range(REPETITIONS):
        test, lora, base, prompt = prompt_sets(rng, n, per_prompt=1)
        gap = paired.cmmd_gap(lora, base, test, prompt)
        interval = paired.jackknife_t(gap.value, gap.leave_one_out)
        covered += interval.low <= truth <= interval.high
    return covered / REPETITIONS


@pytest.mark.parametrize("n", [10, 15])
def test_interval_covers_a_mean_at_least_94_percent_and_a_normal_quantile_would_not(n):
    assert mean_coverage(n) >= MIN_COVERAGE
    if n == 10:  # the check has power: 1.96 instead of t(9) = 2.26 covers about 92 %
        assert mean_coverage(n, quantile=stats.norm.ppf(0.975)) < MIN_COVERAGE


def test_interval_covers_the_population_cmmd_gap_at_least_94_percent():
    """LoRA images less diverse than base ones, so the biased gap carries a small-n offset; the interval
    targets the gap with unlimited prompts."""
    truth = population_cmmd_gap(np.random.default_rng(99))
    for n in (10, 15):
        assert cmmd_gap_coverage(n, truth) >= MIN_COVERAGE, n


# --- the gap test where LoRA and base images differ at equal distance from the test set -----------------

SIGNIFICANCE = 0.05


def mirrored_sets(rng, n: int, offset: float = 1.0, dim: int = 8):
    """LoRA images offset by +offset along the first axis, base images by -offset, test images not at all: the
    reflection of that axis maps the test population to itself and LoRA images to base images, so both sit at
    exactly the same distance from the test population (population gap 0) while differing everywhere."""
    latent = rng.normal(size=(n, dim))
    shift = np.zeros(dim)
    shift[0] = offset
    test = unit(latent + 0.5 * rng.normal(size=(n, dim)))
    lora = unit(latent + shift + 0.3 * rng.normal(size=(n, dim)))
    base = unit(latent - shift + 0.3 * rng.normal(size=(n, dim)))
    return test, lora, base, np.arange(n)


@pytest.mark.parametrize("n", [10, 20])
def test_gap_test_holds_its_size_where_lora_and_base_differ_at_equal_distance_and_the_swap_test_rejects(n):
    """The reviewer's case: the swap test rejects "nothing changed" (rightly: the images did change), but a
    small swap p-value says nothing about the gap. The gap test's false-positive rate stays at most 5 % (over
    4000 repetitions it is 3.2 % at n = 10 and 4.1 % at n = 20); the swap test rejects in most runs (63 % and
    79 %), which is also this simulation's check that the null is not trivially easy."""
    rng = np.random.default_rng(30 + n)
    gap_rejections = swap_rejections = 0
    for _ in range(REPETITIONS):
        test, lora, base, prompt = mirrored_sets(rng, n)
        gap = paired.cmmd_gap(lora, base, test, prompt)
        gap_rejections += paired.jackknife_t(gap.value, gap.leave_one_out).pvalue < SIGNIFICANCE
        swap_rejections += paired.permutation_pvalue(gap.swapped, n, 200) < SIGNIFICANCE
    assert gap_rejections / REPETITIONS <= SIGNIFICANCE
    assert swap_rejections / REPETITIONS > 0.5


def test_gap_test_detects_a_real_cmmd_gap():
    """Power, so the size check above is not met by a test that never rejects: base images shifted 3 along one
    axis, LoRA images 1.5, from the test images' latents (the gap test rejects in 98 % of runs)."""
    rng = np.random.default_rng(40)
    rejections = 0
    for _ in range(200):
        test, lora, base, prompt = prompt_sets(rng, 20, per_prompt=1, base_shift=3.0)
        gap = paired.cmmd_gap(lora, base, test, prompt)
        rejections += paired.jackknife_t(gap.value, gap.leave_one_out).high < 0
    assert rejections / 200 > 0.9


# --- the CLIP cosine gap where the clamped CLIP score cannot move ---------------------------------------


def clip_sets(rng, n: int, lora_pull: float, base_pull: float = -0.3, dim: int = 8):
    """Caption embeddings and, per prompt, base and LoRA images sharing a content latent, pulled toward their
    caption by `*_pull` (negative: pushed away). At base_pull -0.3 the base's mean cosine is about -0.17,
    near the demo's -0.136: a clamped CLIP score reads 0 for base and for any LoRA further away."""
    text = unit(rng.normal(size=(n, dim)))
    latent = 0.5 * rng.normal(size=(n, dim))

    def images(pull: float) -> np.ndarray:
        return unit(latent + pull * text + 0.3 * rng.normal(size=(n, dim)))

    return images(lora_pull), images(base_pull), text, np.arange(n)


def cosine_gap_outcomes(lora_pull: float, repetitions: int = REPETITIONS) -> tuple[float, float, float]:
    """(share of runs whose interval lies below 0, above 0, share where both clamped CLIP scores read 0)."""
    rng = np.random.default_rng(50)
    below = above = clamped = 0
    for _ in range(repetitions):
        lora, base, text, prompt = clip_sets(rng, 10, lora_pull)
        gap = paired.clip_cosine_gap(lora, base, text, prompt)
        interval = paired.jackknife_t(gap.value, gap.leave_one_out)
        below, above = below + (interval.high < 0), above + (interval.low > 0)
        clamped += metrics.clip_score(lora, text) == metrics.clip_score(base, text) == 0
    return below / repetitions, above / repetitions, clamped / repetitions


def test_cosine_gap_is_negative_for_a_lora_that_moves_images_from_their_captions_where_the_clamp_hid_it():
    below, above, clamped = cosine_gap_outcomes(lora_pull=-1.0, repetitions=200)
    assert clamped > 0.9  # the clamped CLIP-score gap was 0 here: it could not fail
    assert below > 0.9 and above == 0


def test_cosine_gap_test_holds_its_size_when_the_lora_changes_nothing():
    below, above, _ = cosine_gap_outcomes(lora_pull=-0.3)  # LoRA images drawn as base ones are
    assert below + above <= 1 - MIN_COVERAGE


# --- swap p-value and when an interval is given -------------------------------------------------------


def test_swap_pvalue_is_small_for_an_effect_large_without_and_exact_for_few_prompts():
    rng = np.random.default_rng(3)

    def sign_flip_mean(differences):
        return lambda swap: float(np.mean(np.where(swap, -differences, differences)))

    with_effect = sign_flip_mean(1.0 + 0.5 * rng.normal(size=20))
    assert paired.permutation_pvalue(with_effect, 20, seed=5) == paired.permutation_pvalue(with_effect, 20, seed=5)
    assert paired.permutation_pvalue(with_effect, 20) == pytest.approx(1 / 201)
    assert paired.permutation_pvalue(sign_flip_mean(rng.normal(size=20)), 20) > 0.05
    assert paired.permutation_pvalue(sign_flip_mean(np.zeros(20)), 20) == 1.0
    # 2^n <= permutations: every swap pattern once; with all differences positive only the identity and
    # the full swap are as extreme, 2 / 2^n
    assert paired.permutation_pvalue(sign_flip_mean(np.ones(3)), 3) == 2 / 8
    assert paired.permutation_pvalue(sign_flip_mean(np.ones(6)), 6) == 2 / 64


@pytest.mark.parametrize("n", [3, 5, 6])
def test_interval_and_gap_test_only_from_the_size_where_the_swap_test_can_reject(n):
    rng = np.random.default_rng(4)
    test, lora, base, prompt = prompt_sets(rng, n, per_prompt=1, base_shift=3.0)
    clip = {"test": test, "lora": lora, "base": base, "text": test}
    results = lora_minus_base(Features(clip, {}, prompt), conf_group("evaluate", permutations=200))
    for gap in ("cmmd_vs_test_lora_minus_base", "clip_cosine_lora_minus_base"):
        for suffix in ("_bias_corrected", "_ci_low", "_ci_high", "_pvalue"):
            assert (gap + suffix in results) == (n >= paired.MIN_INTERVAL_PROMPTS)
        assert results[gap + "_changed_pvalue"] >= 2 / 2**n
    assert 2 / 2**paired.MIN_INTERVAL_PROMPTS < 0.05 <= 2 / 2 ** (paired.MIN_INTERVAL_PROMPTS - 1)


# --- pairing check -------------------------------------------------------------------------------------


def generated_index(captions: list[str], samples: int = 2) -> pd.DataFrame:
    rows = [
        {
            "prompt_index": i,
            "sample": s,
            "caption": caption,
            "seed": 100 * i + s,
            "model": model,
            "path": f"{model}/{i}_{s}.png",
        }
        for model in ("base", "lora")
        for i, caption in enumerate(captions)
        for s in range(samples)
    ]
    return pd.DataFrame(rows)


CAPTIONS = ["a fjord", "a dune", "a moor"]
TEST = pd.DataFrame({"path": ["t0.png", "t1.png", "t2.png"], "caption": CAPTIONS})


def test_pairing_check_accepts_what_generate_writes_in_any_row_order():
    check_pairing(TEST, generated_index(CAPTIONS).sample(frac=1, random_state=0), "index.csv")


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (
            lambda g: g.assign(seed=np.where((g["model"] == "lora") & (g["prompt_index"] == 1), 7, g["seed"])),
            "differ in seed",
        ),
        (
            lambda g: g.assign(caption=np.where(g["model"] == "base", g["caption"].str.upper(), g["caption"])),
            "differ in caption",
        ),
        (lambda g: g.drop(index=g.index[-1]), "not one per"),
        (lambda g: g[g["prompt_index"] < 2], "each of the 3 test captions"),
        (lambda g: g[g["model"] == "lora"], "expected base and lora"),
    ],
)
def test_pairing_check_refuses_mismatched_images(break_it, message):
    with pytest.raises(UserError, match=message) as error:
        check_pairing(TEST, break_it(generated_index(CAPTIONS)), "data/generated/index.csv")
    assert "data/generated/index.csv" in str(error.value) and "generate" in str(error.value)


def test_pairing_check_refuses_images_generated_for_other_captions():
    with pytest.raises(UserError, match="1 caption\\(s\\) differ from test.csv's, first at prompt 2"):
        check_pairing(TEST, generated_index(["a fjord", "a dune", "a heath"]), "index.csv")
