"""The panel's result per criterion, from the votes cast on the current images: flat metrics for `dvc metrics
diff`, a table for `dvc plots` and a report section.

Only votes whose two image hashes are those of a current (prompt, sample) count; the others are stale (cast on
images generate has since replaced) and only counted. With no current votes every criterion has n = 0 and no
rate (no NaN: DVC's metrics would break on it).
"""

from collections import defaultdict

import pandas as pd

from lanskap.rate.items import Item
from lanskap.rate.stats import krippendorff_alpha_nominal, sign_test, wilson_interval
from lanskap.rate.votes import Vote

SIGNIFICANCE = 0.05


def winner(vote: Vote) -> str:
    """lora, base or tie: what the A/B answer means once the side is known."""
    if vote.answer == "tie":
        return "tie"
    return "lora" if (vote.answer == "A") == (vote.lora_side == "left") else "base"


def current_votes(votes: list[Vote], items: list[Item]) -> tuple[list[Vote], int]:
    """The votes cast on the current images, and how many were cast on images since replaced."""
    current = {(i.prompt_index, i.sample, i.base_sha256, i.lora_sha256) for i in items}
    kept = [v for v in votes if (v.prompt_index, v.sample, v.base_sha256, v.lora_sha256) in current]
    return kept, len(votes) - len(kept)


def criterion_metrics(name: str, votes: list[Vote]) -> dict[str, float]:
    """Win rate with its Wilson interval and sign test, ties, raters, agreement and the left side's share."""
    wins = defaultdict(int, dict.fromkeys(("lora", "base", "tie"), 0))
    for vote in votes:
        wins[winner(vote)] += 1
    left = sum(v.answer == "A" for v in votes)
    right = sum(v.answer == "B" for v in votes)
    m = {f"{name}_n_votes": len(votes), f"{name}_n_raters": len({v.rater for v in votes})}
    m[f"{name}_lora_wins"], m[f"{name}_base_wins"], m[f"{name}_ties"] = wins["lora"], wins["base"], wins["tie"]
    if votes:
        m[f"{name}_tie_rate"] = wins["tie"] / len(votes)
    decided = wins["lora"] + wins["base"]
    if decided:
        m[f"{name}_lora_win_rate"] = wins["lora"] / decided
        m[f"{name}_lora_win_rate_low"], m[f"{name}_lora_win_rate_high"] = wilson_interval(wins["lora"], decided)
        m[f"{name}_sign_pvalue"] = sign_test(wins["lora"], wins["base"])
        m[f"{name}_left_share"] = left / (left + right)
        m[f"{name}_left_pvalue"] = sign_test(left, right)  # position bias: does the left side win more than half?
        m.update(item_level(name, votes))
    return m


def item_level(name: str, votes: list[Vote]) -> dict[str, float]:
    """Each item's majority (LoRA or base; an even split is dropped) and a sign test over items: votes of several
    raters on one item are not independent, so with close agreement the pooled test overstates the evidence and
    this one does not. Krippendorff's alpha from two raters up."""
    units = defaultdict(dict)
    for vote in votes:
        units[vote.prompt_index, vote.sample][vote.rater] = winner(vote)
    margins = [sum((w == "lora") - (w == "base") for w in unit.values()) for unit in units.values()]
    lora_items, base_items = sum(d > 0 for d in margins), sum(d < 0 for d in margins)
    m = {f"{name}_lora_items": lora_items, f"{name}_base_items": base_items}
    if lora_items + base_items:
        m[f"{name}_item_sign_pvalue"] = sign_test(lora_items, base_items)
    alpha = krippendorff_alpha_nominal(units) if len({v.rater for v in votes}) >= 2 else None
    if alpha is not None:
        m[f"{name}_krippendorff_alpha"] = alpha
    return m


def summarise(votes: list[Vote], items: list[Item], criteria: list[str]) -> dict[str, float]:
    kept, stale = current_votes(votes, items)
    metrics = {"n_items": len(items), "n_votes": len(kept), "n_stale_votes": stale}
    metrics["n_raters"] = len({v.rater for v in kept})
    for name in criteria:
        metrics.update(criterion_metrics(name, [v for v in kept if v.criterion == name]))
    return {key: round(float(value), 6) for key, value in metrics.items()}


def win_rate_table(metrics: dict[str, float], criteria: list[str]) -> pd.DataFrame:
    """criterion, LoRA win rate and its interval, for `dvc plots` (criteria with decided votes only)."""
    rows = [
        {
            "criterion": name,
            "lora_win_rate": metrics[f"{name}_lora_win_rate"],
            "low": metrics[f"{name}_lora_win_rate_low"],
            "high": metrics[f"{name}_lora_win_rate_high"],
        }
        for name in criteria
        if f"{name}_lora_win_rate" in metrics
    ]
    return pd.DataFrame(rows, columns=["criterion", "lora_win_rate", "low", "high"])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def optional(metrics: dict[str, float], key: str, form: str = "{:.2f}") -> str:
    return form.format(metrics[key]) if key in metrics else "-"


def criterion_row(metrics: dict[str, float], name: str) -> list[str]:
    def count(key: str) -> str:
        return f"{metrics[f'{name}_{key}']:.0f}"

    low, high = (optional(metrics, f"{name}_lora_win_rate_{end}") for end in ("low", "high"))
    return [
        name,
        count("n_votes"),
        count("n_raters"),
        f"{count('lora_wins')} / {count('base_wins')} / {count('ties')}",
        optional(metrics, f"{name}_lora_win_rate"),
        f"[{low}, {high}]",
        optional(metrics, f"{name}_sign_pvalue", "{:.2g}"),
        optional(metrics, f"{name}_item_sign_pvalue", "{:.2g}"),
        optional(metrics, f"{name}_krippendorff_alpha"),
        optional(metrics, f"{name}_left_share"),
    ]


def summary_markdown(metrics: dict[str, float], criteria: list[str]) -> str:
    """The report section: one row per criterion, what it shows, and what to read into it."""
    lines = ["## Blind side-by-side rating (qualitative)", ""]
    stale = f" ({metrics['n_stale_votes']:.0f} stale votes, cast on earlier images, not counted)"
    if not metrics["n_votes"]:
        lines += [f"No ratings yet{stale if metrics['n_stale_votes'] else ''}: `python -m lanskap.rate` to rate.", ""]
        return "\n".join(lines)
    lines += [
        f"{metrics['n_votes']:.0f} answers from {metrics['n_raters']:.0f} rater(s) on {metrics['n_items']:.0f} "
        f"items{stale}. Win rate: LoRA wins / (LoRA + base wins), ties apart; 95% Wilson interval; p: exact "
        "two-sided sign test (ties excluded) over all votes as if independent; item p: the same test over items, "
        "each counted once by its raters' majority (the one to trust when several raters rated the same items).",
        "",
    ]
    rows = [criterion_row(metrics, name) for name in criteria]
    biased = [name for name in criteria if metrics.get(f"{name}_left_pvalue", 1.0) <= SIGNIFICANCE]
    header = ["criterion", "n", "raters", "LoRA / base / tie", "LoRA win rate", "95% interval", "sign p"]
    lines.append(markdown_table([*header, "item p", "alpha", "left share"], rows))
    lines.append("")
    lines.append("alpha: Krippendorff's (nominal) agreement between raters (1 perfect, 0 chance), from 2 raters.")
    if biased:
        lines.append(
            f"\n**Position bias**: the left image won more often than a fair coin allows (p <= {SIGNIFICANCE}) for "
            f"{', '.join(biased)}: the sides are balanced, so the win rates stand, but check how the raters worked."
        )
    return "\n".join(lines) + "\n"
