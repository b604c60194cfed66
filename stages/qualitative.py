"""qualitative: the blind side-by-side rating's result per criterion (python -m lanskap.rate collects the votes).

Inputs:  VOTES (the votes database, in git: ratings/votes.sqlite), GENERATED/index.csv and its images (from
         generate: which votes were cast on the current images, by sha256)
Outputs: OUT      metrics JSON with flat numeric keys (for `dvc metrics diff`): per criterion n votes and raters,
                  LoRA / base wins and ties, LoRA win rate (ties apart) with its 95% Wilson interval, exact sign-test
                  p over votes (`_sign_pvalue`) and over items by majority (`_item_sign_pvalue`), Krippendorff's
                  alpha (2 raters or more), the left side's share and its p (position bias); n_stale_votes
         REPORTS/summary.md     the report section ("No ratings yet" without votes)
         REPORTS/win_rates.csv  criterion, lora_win_rate, low, high (`dvc plots`)
Params:  rate.criteria
"""

import argparse
from pathlib import Path

from lanskap.core.errors import run_stage
from lanskap.core.io import write_csv, write_json, write_text
from lanskap.core.params import load_params
from lanskap.rate.items import read_items
from lanskap.rate.summary import summarise, summary_markdown, win_rate_table
from lanskap.rate.votes import DEFAULT_VOTES, all_votes, close, open_existing


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--votes", type=Path, default=DEFAULT_VOTES)
    parser.add_argument("--generated", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reports", type=Path, default=Path("reports/qualitative"))
    args = parser.parse_args(argv)
    criteria = list(load_params("rate")["rate"].criteria)

    items = read_items(args.generated / "index.csv")
    connection = open_existing(args.votes)
    try:
        votes = all_votes(connection)
    finally:
        close(connection)
    metrics = summarise(votes, items, criteria)
    write_json(args.out, metrics)
    write_csv(args.reports / "win_rates.csv", win_rate_table(metrics, criteria))
    write_text(args.reports / "summary.md", summary_markdown(metrics, criteria))

    print(f"qualitative: {metrics['n_votes']:.0f} current votes, {metrics['n_stale_votes']:.0f} stale")
    if not metrics["n_votes"]:
        print("  no ratings yet: `python -m lanskap.rate` (or `make rate`) serves the rating page")
    for name in criteria:
        if f"{name}_lora_win_rate" in metrics:
            print(
                f"  {name:12s} LoRA win rate {metrics[f'{name}_lora_win_rate']:.2f} "
                f"[{metrics[f'{name}_lora_win_rate_low']:.2f}, {metrics[f'{name}_lora_win_rate_high']:.2f}] "
                f"sign p {metrics[f'{name}_sign_pvalue']:.3g}, left share {metrics[f'{name}_left_share']:.2f}"
            )
    print(f"-> {args.out}; report section -> {args.reports / 'summary.md'}")


if __name__ == "__main__":
    run_stage(main)
