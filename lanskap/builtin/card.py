"""Each built-in model's card (README.md beside its weights): what it is, what it learnt from, for how long, its
final losses and scores, the build time and the commit that built it; plus its loss log and loss curves."""

import hashlib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from lanskap.builtin.training import LossLog
from lanskap.core.figures import save_loss_curves

BUILDER_SOURCES = [
    "lanskap/builtin",
    "lanskap/data/procedural.py",
    "lanskap/data/augment.py",
    "lanskap/evaluate/features.py",
]


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def builder_digest() -> str:
    """sha256 of the builder's source files: a card whose digest differs from today's was built by other code."""
    digest = hashlib.sha256()
    for source in BUILDER_SOURCES:
        path = project_root() / source
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(project_root()).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def commit() -> str:
    """The commit the builder ran from, and whether its sources differed from that commit's."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=project_root(), capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head, changed = git("rev-parse", "--short=12", "HEAD"), git("status", "--porcelain", "--", *BUILDER_SOURCES)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} (builder sources {'with uncommitted changes' if changed else 'as committed'})"


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
            f"- commit: {commit()}; builder sources sha256 `{builder_digest()}`",
            "- rebuild: `make builtins` (see lanskap/builtin/__init__.py)",
            "",
        ]
        (folder / "README.md").write_text("\n".join(lines))


def write_loss_plot(log: LossLog, path: Path, title: str) -> None:
    rows = pd.DataFrame(log.rows, columns=["step", "name", "value"])
    losses = rows[rows["name"].str.endswith("_loss")]
    curves = {name: table.rename(columns={"value": "loss"}) for name, table in losses.groupby("name", sort=False)}
    save_loss_curves(curves, path, title=f"{title}: training and held-out loss")
