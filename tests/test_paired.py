"""LoRA-minus-base gaps (lanskap.evaluate.paired): the algebra against recomputation, the interval's coverage by
simulation, the permutation p-value, and evaluate's refusal of unpaired images."""

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


def test_clip_score_gap_value_leave_one_out_and_swaps_equal_recomputation():
    rng = np.random.default_rng(1)
    text, lora, base, prompt = prompt_sets(rng, 6, per_prompt=3)
    captions = text[prompt]
    gap = paired.clip_score_gap(lora, base, text, prompt)

    def recomputed(lora_rows, base_rows, kept=slice(None)):
        return metrics.clip_score(lora_rows[kept], captions[kept]) - metrics.clip_score(base_rows[kept], captions[kept])

    assert gap.value == pytest.approx(recomputed(lora, base), abs=1e-12)
    assert gap.leave_one_out == pytest.approx([recomputed(lora, base, prompt != i) for i in range(6)], abs=1e-12)
    swap = np.array([True, False, False, True, True, False])
    rows = swap[prompt][:, None]
    assert gap.swapped(swap) == pytest.approx(recomputed(np.where(rows, base, lora), np.where(rows, lora, base)))


def test_jackknife_interval_of_a_mean_is_the_classical_t_interval():
    values = np.random.default_rng(2).normal(size=12)
    leave_one_out = (values.sum() - values) / 11
    corrected, low, high = paired.jackknife_interval(values.mean(), leave_one_out)
    half_width = stats.t.ppf(0.975, 11) * values.std(ddof=1) / np.sqrt(12)
    assert (corrected, low, high) == pytest.approx(
        (values.mean(), values.mean() - half_width, values.mean() + half_width)
    )


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
            _, low, high = paired.jackknife_interval(values.mean(), leave_one_out)
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
        _, low, high = paired.jackknife_interval(gap.value, gap.leave_one_out)
        covered += low <= truth <= high
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


# --- permutation p-value and when an interval is given ------------------------------------------------


def test_permutation_pvalue_is_small_for_an_effect_large_without_and_exact_for_few_prompts():
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
def test_interval_only_from_the_size_where_the_permutation_test_can_reject(n):
    rng = np.random.default_rng(4)
    test, lora, base, prompt = prompt_sets(rng, n, per_prompt=1, base_shift=3.0)
    clip = {"test": test, "lora": lora, "base": base, "text": test}
    results = lora_minus_base(Features(clip, {}, prompt), conf_group("evaluate", permutations=200))
    gap = "cmmd_vs_test_lora_minus_base"
    assert (gap + "_ci_low" in results) == (n >= paired.MIN_INTERVAL_PROMPTS)
    assert results[gap + "_pvalue"] >= 2 / 2**n
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
