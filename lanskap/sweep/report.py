"""The files `python -m lanskap.sweep` writes: summary.csv (one row per setting and metric, read by the grouped
bar chart in dvc.yaml's `plots`), comparison.csv, summary.json (both, and every experiment's per-seed values) and
summary.md (the tables, also printed)."""

import math
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from lanskap.core.io import atomic_dir, write_csv, write_json, write_text
from lanskap.evaluate.report import format_value, markdown_table
from lanskap.sweep.seed_stats import Difference, SeedSummary

METHOD_NAMES = {"paired": "paired by seed", "welch": "Welch"}


def summary_table(groups: dict, summaries: dict[tuple[str, str], SeedSummary], seed_key: str) -> pd.DataFrame:
    rows = [
        {
            "setting": label,
            "metric": metric,
            **asdict(summary),
            "seeds": " ".join(str(member.params[seed_key]) for member in groups[label]),
            "experiments": " ".join(member.name for member in groups[label]),
        }
        for (label, metric), summary in summaries.items()
    ]
    return pd.DataFrame(rows)


def comparison_table(reference: str, differences: dict[tuple[str, str], Difference]) -> pd.DataFrame:
    rows = [
        {"setting": label, "reference": reference, "metric": metric, **asdict(difference)}
        for (label, metric), difference in differences.items()
    ]
    columns = ["setting", "reference", "metric", "method", "difference", "ci_low", "ci_high", "dof", "pvalue"]
    return pd.DataFrame(rows, columns=columns)


def _interval(mean: float, low: float, high: float) -> str:
    return f"{format_value(mean)} [{format_value(low)}, {format_value(high)}]"


def summary_markdown(summary: pd.DataFrame, confidence: float, seed_key: str) -> str:
    settings = list(dict.fromkeys(summary["setting"]))
    cells = {
        (row.setting, row.metric): f"{_interval(row.mean, row.ci_low, row.ci_high)}, sd {format_value(row.sd)}"
        for row in summary.itertuples()
    }
    rows = [[metric] + [cells[setting, metric] for setting in settings] for metric in dict.fromkeys(summary["metric"])]
    seeds_by_setting = summary.groupby("setting", sort=False)["seeds"].first()
    seeds = ", ".join(f"{setting}: {seeds}" for setting, seeds in seeds_by_setting.items())
    return (
        f"Mean [{confidence:.0%} t-interval of the mean, n - 1 dof] and sd across {seed_key} ({seeds}).\n\n"
        + markdown_table(["metric", *settings], rows)
    )


def comparison_markdown(comparisons: pd.DataFrame, confidence: float) -> str:
    rows = [
        [
            f"{row.setting} - {row.reference}",
            row.metric,
            METHOD_NAMES[row.method],
            _interval(row.difference, row.ci_low, row.ci_high),
            format_value(row.dof),
            "n/a (no spread)" if math.isnan(row.pvalue) else format_value(row.pvalue),
        ]
        for row in comparisons.itertuples()
    ]
    return (
        f"Difference of the means with its {confidence:.0%} t-interval and the two-sided p-value of no "
        "difference (paired by seed when both settings ran the same seeds, Welch otherwise; no correction for "
        "comparing several metrics or settings).\n\n"
        + markdown_table(["settings", "metric", "test", "difference", "dof", "p"], rows)
    )


def _finite_or_none(records: list[dict]) -> list[dict]:
    return [
        {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in row.items()}
        for row in records
    ]


def write_report(
    out: Path, groups: dict, reference: str, summaries: dict, differences: dict, seed_key: str, confidence: float
) -> str:
    """Write the four files into `out` (replaced as a whole) and return the markdown."""
    summary, comparisons = summary_table(groups, summaries, seed_key), comparison_table(reference, differences)
    text = "# Seed sweep\n\n" + summary_markdown(summary, confidence, seed_key) + "\n"
    if len(comparisons):
        text += "\n" + comparison_markdown(comparisons, confidence) + "\n"
    experiments = {
        label: [
            {
                "name": member.name,
                "seed": member.params[seed_key],
                "metrics": {metric: member.metrics[metric] for metric in dict.fromkeys(summary["metric"])},
            }
            for member in members
        ]
        for label, members in groups.items()
    }
    with atomic_dir(out) as staging:
        write_csv(staging / "summary.csv", summary)
        write_csv(staging / "comparison.csv", comparisons)
        write_json(
            staging / "summary.json",
            {
                "seed_key": seed_key,
                "confidence": confidence,
                "reference": reference,
                "settings": experiments,
                "summary": _finite_or_none(summary.to_dict("records")),
                "comparisons": _finite_or_none(comparisons.to_dict("records")),
            },
        )
        write_text(staging / "summary.md", text)
    return text
