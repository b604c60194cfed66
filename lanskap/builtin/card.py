"""Each built-in model's card (README.md beside its weights): what it is, what it learnt from, for how long, its
final losses and scores, the build time, the commit that built it and the digest of the sources that decide its
weights (lanskap/builtin/sources.py); plus its loss log and loss curves."""

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from lanskap.builtin import BUILTIN_FOLDERS
from lanskap.builtin.sources import MODEL_SOURCES, ROOT, model_digest, source_files
from lanskap.builtin.training import LossLog
from lanskap.core.figures import save_loss_curves


def commit(model: str) -> str:
    """The commit the builder ran from, and whether the sources of `model` differed from that commit's."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head, changed = git("rev-parse", "--short=12", "HEAD"), git("status", "--porcelain", "--", *source_files(model))
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} (builder sources {'with uncommitted changes' if changed else 'as committed'})"


# The commit and digests as this process found them on starting (build.py imports this module before training):
# a card describes the code that ran, even if the sources are edited or committed while it trains.
AT_START = {model: (commit(model), model_digest(model)) for model in MODEL_SOURCES}


def provenance(model: str) -> list[str]:
    """The card's lines on the code that built `model`, with a warning if its sources changed during the build."""
    started_commit, digest = AT_START[model]
    sources = ", ".join(f"`{source}`" for source in MODEL_SOURCES[model])
    lines = [
        f"- commit: {started_commit}; builder sources sha256 `{digest}` (code, formatting and comments aside; "
        f"lanskap/builtin/sources.py) of: {sources}"
    ]
    if model_digest(model) != digest:
        lines.append(
            f"- warning: these sources changed during the build (sha256 now `{model_digest(model)}`): the weights "
            "may match neither version; rebuild from an unchanged checkout before committing them"
        )
    return lines


def parameter_count(*modules: torch.nn.Module) -> int:
    return sum(parameter.numel() for module in modules for parameter in module.parameters())


@dataclass
class Card:
    name: str
    summary: str
    data: list[str]
    training: list[str]
    results: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def write(self, folder: Path, log: LossLog, threads: int) -> None:
        model = BUILTIN_FOLDERS[self.name]
        log.write(folder / "training_log.tsv")
        write_loss_plot(log, folder / "loss.png", self.name)
        lines = [
            f"# {self.name}",
            "",
            self.summary,
            "",
            "## Data",
            "",
            *[f"- {line}" for line in self.data],
            "",
            "## Training",
            "",
            *[f"- {line}" for line in self.training],
            "",
            "## Results",
            "",
            "| measure | value |",
            "|---|---|",
            *[f"| {name} | {value:.4g} |" for name, value in self.results.items()],
            "",
            "Loss curves: `loss.png`; every logged value: `training_log.tsv`.",
            "",
            "## Build",
            "",
            f"- build time: {self.seconds / 60:.1f} min on the CPU with {threads} torch thread(s) "
            f"(torch {torch.__version__})",
            *provenance(model),
            f"- rebuild: `python -m lanskap.builtin {model}`, or all three with `make builtins` (see "
            "lanskap/builtin/__init__.py)",
            "",
        ]
        (folder / "README.md").write_text("\n".join(lines))


def write_loss_plot(log: LossLog, path: Path, title: str) -> None:
    rows = pd.DataFrame(log.rows, columns=["step", "name", "value"])
    losses = rows[rows["name"].str.endswith("_loss")]
    curves = {name: table.rename(columns={"value": "loss"}) for name, table in losses.groupby("name", sort=False)}
    save_loss_curves(curves, path, title=f"{title}: training and held-out loss")
