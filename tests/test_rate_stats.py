"""The blind rating's statistics do what they claim, by simulation: the Wilson interval covers, a coin-flip panel
is called significant at most 5% of the time (and a real preference is found: the test has teeth), an always-left
rater is flagged for position bias, votes on replaced images are stale, and no votes gives no NaN."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from lanskap.rate.items import Item, rater_plan
from lanskap.rate.stats import krippendorff_alpha_nominal, sign_test, wilson_interval
from lanskap.rate.summary import SIGNIFICANCE, summarise, summary_markdown, win_rate_table
from lanskap.rate.votes import Vote

CRITERIA = ["detail", "overall"]


def fake_items(n: int, version: str = "v1") -> list[Item]:
    digest = lambda text: f"{text:0>64}"[-64:]  # noqa: E731 - a stand-in sha256 of the right length
    return [
        Item(i, 0, f"caption {i}", "ref.png", "b.png", "l.png", digest(f"{version}b{i}"), digest(f"{version}l{i}"))
        for i in range(n)
    ]


def panel_votes(items, raters: int, choose, rng, criteria=("overall",)) -> list[Vote]:
    """Each rater answers every item as the real page would present it: sides from rater_plan.
    choose(rng, lora_side) -> "A" | "B" | "tie"."""
    votes = []
    for r in range(raters):
        rater = f"rater{r}"
        _, sides = rater_plan(items, rater, seed=0)
        for item, side in zip(items, sides, strict=True):
            for criterion in criteria:
                votes.append(
                    Vote(rater, item.prompt_index, 0, item.caption, item.base_sha256, item.lora_sha256, side,
                         criterion, choose(rng, side))
                )  # fmt: skip
    return votes


def coin_flip(rng, side):
    return ("A", "B", "tie")[rng.integers(3)]


def prefers_lora(probability):
    def choose(rng, side):
        lora = "A" if side == "left" else "B"
        return lora if rng.random() < probability else ("B" if lora == "A" else "A")

    return choose


def always_left(rng, side):
    return "A"


def test_krippendorff_alpha_matches_the_published_example():
    """Krippendorff (2011), 'Computing Krippendorff's alpha-reliability': 4 coders, 12 units, missing values;
    nominal alpha = 0.743."""
    table = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = {u: {c: row[u] for c, row in enumerate(table) if row[u] is not None} for u in range(12)}
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)


def test_krippendorff_alpha_bounds():
    agree = {u: {"x": u % 3, "y": u % 3} for u in range(9)}
    assert krippendorff_alpha_nominal(agree) == pytest.approx(1.0)
    assert krippendorff_alpha_nominal({u: {"x": 1, "y": 1} for u in range(5)}) is None  # no variation: undefined
    rng = np.random.default_rng(0)
    chance = {u: {r: int(rng.integers(3)) for r in range(5)} for u in range(400)}
    assert abs(krippendorff_alpha_nominal(chance)) < 0.05


@pytest.mark.parametrize("p", [0.1, 0.5, 0.85])
def test_wilson_interval_covers_95_percent_where_the_wald_interval_does_not(p):
    rng = np.random.default_rng(1)
    n, draws = 25, 4000
    wins = rng.binomial(n, p, size=draws)
    wilson = np.mean([low <= p <= high for low, high in (wilson_interval(int(w), n) for w in wins)])
    assert wilson >= 0.93
    if p == 0.1:  # negative control: the textbook interval undercovers here, so the check above has teeth
        half = 1.96 * np.sqrt(wins / n * (1 - wins / n) / n)
        wald = np.mean((wins / n - half <= p) & (p <= wins / n + half))
        assert wald < 0.93


def test_sign_test_is_exact():
    assert sign_test(15, 5) == pytest.approx(2 * sum(math.comb(20, k) for k in range(15, 21)) / 2**20)
    assert sign_test(3, 3) == pytest.approx(1.0)
    for wins, losses in [(0, 1), (7, 2), (2, 9), (30, 18), (50, 50)]:
        assert sign_test(wins, losses) == pytest.approx(binomtest(wins, wins + losses, 0.5).pvalue, rel=1e-9)


def detection_rates(choose, panels: int, keys: tuple[str, ...], raters: int = 3, items: int = 20) -> list[float]:
    """The share of simulated panels whose p for each key is <= 0.05."""
    rng = np.random.default_rng(2)
    found = np.zeros(len(keys))
    for _ in range(panels):
        metrics = summarise(panel_votes(fake_items(items), raters, choose, rng), fake_items(items), ["overall"])
        found += [metrics.get(key, 1.0) <= SIGNIFICANCE for key in keys]
    return list(found / panels)


def test_coin_flip_raters_give_at_most_5_percent_false_positives():
    """Nor a position bias. (The exact test is conservative: its size here is 3.5%, so 2000 panels keep the estimate
    3 standard errors below 5%.)"""
    lora, left = detection_rates(coin_flip, 2000, ("overall_sign_pvalue", "overall_left_pvalue"))
    assert lora <= 0.05 and left <= 0.05


def test_a_real_preference_is_found():
    """Negative control for the false-positive test: raters who pick the LoRA 80% of the time are detected."""
    assert detection_rates(prefers_lora(0.8), 100, ("overall_sign_pvalue",))[0] >= 0.9


def test_raters_who_agree_on_items_without_a_real_effect_fool_the_pooled_test_not_the_item_test():
    """Five raters who all see the same thing in each item, with no preference for either model overall: their
    votes are one vote per item five times over. The pooled test treats them as 5x the evidence and cries wolf;
    the item-level test stays at its level."""
    rng = np.random.default_rng(6)
    pooled = by_item = 0
    panels = 400
    for _ in range(panels):
        items = fake_items(20)
        prefers = {item.lora_sha256: rng.random() < 0.5 for item in items}  # the item's look, not the model
        votes = []
        for r in range(5):
            _, sides = rater_plan(items, f"rater{r}", seed=0)
            for item, side in zip(items, sides, strict=True):
                lora_wins = prefers[item.lora_sha256]
                answer = "A" if lora_wins == (side == "left") else "B"
                votes.append(Vote(f"rater{r}", item.prompt_index, 0, "", item.base_sha256, item.lora_sha256, side,
                                  "overall", answer))  # fmt: skip
        metrics = summarise(votes, items, ["overall"])
        pooled += metrics["overall_sign_pvalue"] <= SIGNIFICANCE
        by_item += metrics["overall_item_sign_pvalue"] <= SIGNIFICANCE
    assert by_item / panels <= 0.05
    assert (
        pooled / panels > 0.15
    )  # about 26%: the negative control: the pooled p is wrong here, which is why item p exists


def test_an_always_left_rater_is_flagged_for_position_bias_not_for_the_lora():
    items = fake_items(20)
    metrics = summarise(panel_votes(items, 1, always_left, np.random.default_rng(3), CRITERIA), items, CRITERIA)
    assert metrics["overall_left_share"] == 1.0
    assert metrics["overall_left_pvalue"] <= SIGNIFICANCE
    assert metrics["overall_lora_win_rate"] == 0.5  # the sides are balanced over the items
    assert metrics["overall_sign_pvalue"] == 1.0
    assert "Position bias" in summary_markdown(metrics, CRITERIA)


def test_agreement_is_reported_from_two_raters():
    items = fake_items(20)
    rng = np.random.default_rng(4)
    one = summarise(panel_votes(items, 1, prefers_lora(0.9), rng), items, ["overall"])
    two = summarise(panel_votes(items, 2, prefers_lora(1.0), rng), items, ["overall"])
    assert "overall_krippendorff_alpha" not in one
    assert two["overall_n_raters"] == 2
    assert "overall_krippendorff_alpha" not in two  # all answers "lora": no variation, alpha undefined, no NaN
    mixed = summarise(panel_votes(items, 3, coin_flip, rng), items, ["overall"])
    assert -0.3 < mixed["overall_krippendorff_alpha"] < 0.3


def test_votes_on_replaced_images_are_stale_not_counted():
    old, new = fake_items(10, "v1"), fake_items(10, "v2")
    rng = np.random.default_rng(5)
    votes = panel_votes(old, 2, prefers_lora(1.0), rng) + panel_votes(new, 1, coin_flip, rng)
    metrics = summarise(votes, new, ["overall"])
    assert metrics["n_stale_votes"] == 20
    assert metrics["overall_n_votes"] == 10
    assert "20 stale votes" in summary_markdown(metrics, ["overall"])


def test_no_votes_says_so_and_writes_no_nan():
    metrics = summarise([], fake_items(5), CRITERIA)
    assert metrics["n_votes"] == 0 and metrics["overall_n_votes"] == 0
    assert all(math.isfinite(value) for value in metrics.values())
    assert "No ratings yet" in summary_markdown(metrics, CRITERIA)
    assert win_rate_table(metrics, CRITERIA).empty


def test_sides_are_balanced_and_differ_between_raters():
    items = fake_items(21)
    order, sides = rater_plan(items, "alice", seed=0)
    assert sorted(order) == list(range(21)) and sides.count("left") == 11
    assert rater_plan(items, "alice", seed=0) == (order, sides)  # resumable: the same after a restart
    assert rater_plan(items, "bob", seed=0)[1] != sides
