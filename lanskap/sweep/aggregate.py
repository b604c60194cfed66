"""Aggregate a seed sweep: mean, sd and t-interval of each metric across training seeds, per setting, and the
difference between settings. Reads the finished experiments from `dvc exp show --json`; reruns nothing.

    dvc exp run --queue -S 'train.seed=range(0,5)' -S 'lora.rank=4,16'   # 2 settings x 5 seeds = 10 experiments
    dvc exp run --run-all
    python -m lanskap.sweep        # -> reports/sweep/summary.json, summary.csv, comparison.csv, summary.md

A setting is the values of the params that differ between the experiments, the seed key aside: the sweep
above gives the groups `lora.rank=4` and `lora.rank=16`. Each group needs at least two seeds, each seed once.
Every other group is compared with the first (`--reference`), paired by seed when both ran the same seeds,
Welch otherwise (lanskap/sweep/seed_stats.py says why). Not a DVC stage: a stage runs inside one experiment and cannot
read the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lanskap.core.errors import UserError
from lanskap.sweep.exp_show import read_exp_show

if TYPE_CHECKING:  # numpy, scipy and pandas load where the statistics start, so that --help is instant
    from lanskap.sweep.seed_stats import Difference

# the CMMD gap (LoRA minus base, distance to the test images), the distances to the test images, the gap in mean
# CLIP cosine to the captions (unclamped: a clamped CLIP score's gap cannot go negative), and the final held-out
# training loss
DEFAULT_METRICS = [
    "cmmd_vs_test_lora_minus_base",
    "cmmd_test_vs_lora",
    "fid_test_vs_lora",
    "kid_test_vs_lora",
    "clip_cosine_lora_minus_base",
    "validation_loss_final",
]
METRIC_FILES = ["metrics/eval.json", "dvclive/train/metrics.json"]


@dataclass(frozen=True)
class Experiment:
    name: str
    params: dict  # flat: {"lora.rank": 4, ...}; keys of a params file other than params.yaml are "FILE:key"
    metrics: dict  # flat: {"fid_test_vs_lora": 167.6, "validation.loss": 0.23, ...}


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _experiment(name: str, data: dict, metric_files: list[str]) -> Experiment:
    params = {}
    for file, content in (data.get("params") or {}).items():
        prefix = "" if file == "params.yaml" else f"{file}:"
        params.update(flatten(content.get("data") or {}, prefix))
    metrics = {}
    for file in metric_files:
        for key, value in flatten((data.get("metrics") or {}).get(file, {}).get("data") or {}).items():
            if key in metrics:
                raise UserError(f"metric {key} is in more than one of --metrics {metric_files}: keep one file")
            metrics[key] = value
    return Experiment(name, params, metrics)


def finished_experiments(shown: list, metric_files: list[str]) -> tuple[list[Experiment], list[str]]:
    """The experiments that ran to the end (baselines and the workspace are not seeds of a sweep), and a note for
    each one left out: queued, running or failed ones show the workspace's or no metrics."""
    finished, skipped = [], []
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            head = experiment["revs"][0]
            name = experiment.get("name") or head.get("name") or head["rev"][:7]
            state = (experiment.get("executor") or {}).get("state", "success")
            if state != "success" or head.get("error") or not (head.get("data") or {}).get("metrics"):
                skipped.append(f"{name} ({state if state != 'success' else 'no metrics'})")
                continue
            finished.append(_experiment(name, head["data"], metric_files))
    return finished, skipped


def differing_keys(experiments: list[Experiment], seed_key: str) -> list[str]:
    """The params whose values are not the same in every experiment, the seed key aside."""
    keys = sorted({key for experiment in experiments for key in experiment.params} - {seed_key})
    return [
        key
        for key in keys
        if len({json.dumps(experiment.params.get(key), sort_keys=True) for experiment in experiments}) > 1
    ]


def _sort_key(value) -> tuple:
    return (0, value, "") if isinstance(value, int | float) and not isinstance(value, bool) else (1, 0, str(value))


def group_by_setting(experiments: list[Experiment], seed_key: str) -> dict[str, list[Experiment]]:
    """{"lora.rank=4": [its experiments, by seed], ...}, settings in the order of their values; one group "all"
    when only the seed differs. A setting with fewer than two seeds beside others is skipped and named on stderr
    (a one-off experiment); raises when none has two, or a group has a seed twice."""
    if not experiments:
        raise UserError("no finished experiment to aggregate: queue a sweep and run it first (README, Experiments)")
    missing = [experiment.name for experiment in experiments if seed_key not in experiment.params]
    if missing:
        raise UserError(f"experiments {missing} have no param {seed_key} (--seed-key)")
    keys = differing_keys(experiments, seed_key)
    settings = sorted(
        {tuple(experiment.params.get(key) for key in keys) for experiment in experiments},
        key=lambda values: [_sort_key(value) for value in values],
    )
    from lanskap.sweep.seed_stats import MIN_SEEDS

    groups, strays = {}, {}
    for values in settings:
        label = " ".join(f"{key}={json.dumps(value)}" for key, value in zip(keys, values)) or "all"
        members = [
            experiment for experiment in experiments if tuple(experiment.params.get(key) for key in keys) == values
        ]
        members = sorted(members, key=lambda experiment: _sort_key(experiment.params[seed_key]))
        # a one-off experiment beside a sweep (`dvc exp run -S lora.rank=8`) is no setting of it: set aside, named
        (strays if len(members) < MIN_SEEDS and len(settings) > 1 else groups)[label] = members
    if not groups:
        check_group(*next(iter(strays.items())), seed_key)
    for label, members in groups.items():
        check_group(label, members, seed_key)
    for label, members in strays.items():
        names = [member.name for member in members]
        print(f"sweep: skipped setting {label}: {len(members)} experiment(s) {names}, fewer than {MIN_SEEDS} seeds "
              "(pick the sweep's experiments with --exp)", file=sys.stderr)  # fmt: skip
    return groups


def check_group(label: str, members: list[Experiment], seed_key: str) -> None:
    from lanskap.sweep.seed_stats import MIN_SEEDS

    seeds = [member.params[seed_key] for member in members]
    names = [member.name for member in members]
    if len(members) < MIN_SEEDS:
        raise UserError(
            f"setting {label} has {len(members)} finished experiment(s) ({names}): an interval across "
            f"seeds needs at least {MIN_SEEDS} seeds of {seed_key}. Run more seeds, or pick the "
            "sweep's experiments with --exp (or remove strays: dvc exp remove NAME)"
        )
    repeated = sorted({str(seed) for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise UserError(
            f"setting {label}: {seed_key} {repeated} ran more than once ({names}); one run per seed, or "
            "the repeats would count as independent draws: pick one with --exp or remove the others"
        )


def metric_values(members: list[Experiment], metric: str) -> list[float]:
    for member in members:
        if not isinstance(member.metrics.get(metric), int | float):
            raise UserError(
                f"experiment {member.name} has no numeric metric {metric} in the --metrics files; "
                f"it has {sorted(member.metrics)}"
            )
    return [float(member.metrics[metric]) for member in members]


def compare(
    reference: list[Experiment], other: list[Experiment], metric: str, seed_key: str, confidence: float
) -> Difference:
    """other - reference: paired by seed when both ran the same seeds (members are sorted by seed), else Welch."""
    from lanskap.sweep import seed_stats

    same_seeds = [m.params[seed_key] for m in reference] == [m.params[seed_key] for m in other]
    difference = seed_stats.paired_difference if same_seeds else seed_stats.welch_difference
    return difference(metric_values(reference, metric), metric_values(other, metric), confidence, metric)


def select(experiments: list[Experiment], names: list[str] | None) -> list[Experiment]:
    if not names:
        return experiments
    unknown = sorted(set(names) - {experiment.name for experiment in experiments})
    if unknown:
        raise UserError(
            f"--exp {unknown}: no finished experiment of that name; finished: "
            f"{sorted(experiment.name for experiment in experiments)}"
        )
    return [experiment for experiment in experiments if experiment.name in names]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lanskap.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--metric", action="append", help=f"metric to aggregate, repeatable (default: {DEFAULT_METRICS})"
    )
    parser.add_argument(
        "--metrics", action="append", help=f"metrics file to read them from, repeatable (default: {METRIC_FILES})"
    )
    parser.add_argument("--seed-key", default="train.seed", help="the param the sweep varies (default: train.seed)")
    parser.add_argument(
        "--exp", action="append", help="aggregate only these experiments, repeatable (default: all finished)"
    )
    parser.add_argument("--reference", help="the setting the others are compared with (default: the first)")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level (default: 0.95)")
    parser.add_argument("--from-json", help="a saved `dvc exp show --json` instead of running it")
    parser.add_argument("--out", default="reports/sweep", help="output folder (default: reports/sweep)")
    args = parser.parse_args(argv)
    if not 0 < args.confidence < 1:
        raise UserError(f"--confidence {args.confidence}: must be between 0 and 1, e.g. 0.95")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from lanskap.sweep import seed_stats
    from lanskap.sweep.report import write_report

    finished, skipped = finished_experiments(read_exp_show(args.from_json), args.metrics or METRIC_FILES)
    for note in skipped:
        print(f"sweep: skipped {note}", file=sys.stderr)
    groups = group_by_setting(select(finished, args.exp), args.seed_key)
    reference = args.reference or next(iter(groups))
    if reference not in groups:
        raise UserError(f"--reference {reference!r}: no such setting; the settings are {list(groups)}")
    metrics = args.metric or DEFAULT_METRICS
    summaries = {
        (label, metric): seed_stats.summarise(metric_values(members, metric), args.confidence, f"{label} {metric}")
        for label, members in groups.items()
        for metric in metrics
    }
    differences = {
        (label, metric): compare(groups[reference], members, metric, args.seed_key, args.confidence)
        for label, members in groups.items()
        if label != reference
        for metric in metrics
    }
    print(write_report(Path(args.out), groups, reference, summaries, differences, args.seed_key, args.confidence))
