"""Which run a report describes: the code's commit, the preset, and what the LoRA's model card records (base
model and revision, LoRA shape, steps, training-data hash).

The card (models/lora/README.md, written by train_lora) and params.yaml are declared deps of evaluate, so DVC
reruns the report when they change. The commit is read from git when there is one and is not a dep: a new commit
that changes no input must not rerun the pipeline. It is the commit checked out when evaluate ran; the report
carries its date, not the wall clock, so rerunning the same commit gives the same bytes.
"""

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from lanskap.core.errors import UserError

CODE_PATHS = ("lanskap", "stages", "dvc.yaml")  # uncommitted changes here mean the commit is not the whole story


@dataclass(frozen=True)
class Commit:
    sha: str
    date: str  # the commit's date (YYYY-MM-DD)
    code_modified: bool  # CODE_PATHS differed from the commit when evaluate ran


@dataclass(frozen=True)
class Provenance:
    commit: Commit | None  # None outside a git checkout (an exported copy, an archive)
    preset: str | None  # params.yaml's `preset`, None when params.yaml was written without one
    base_model: str
    base_revision: str  # as resolved at training time (a built-in model's weight digest, a hub commit)
    adapters: str  # "UNet" or "UNet and text encoder"
    data_sha256: str  # sha256 of the training table (processed/train.csv)
    params: dict  # the model, lora, train and augment groups the LoRA was trained with


def git_commit(root: Path = Path(".")) -> Commit | None:
    """HEAD of the git checkout at `root`, or None when there is none (or no git)."""

    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        date = git("log", "-1", "--format=%cs", "HEAD")
        modified = git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
    except (OSError, subprocess.CalledProcessError):
        return None
    return Commit(sha, date, bool(modified))


def read_preset(params_file: Path) -> str | None:
    return (yaml.safe_load(params_file.read_text()) or {}).get("preset")


def card_field(card: str, pattern: str, what: str, source: Path) -> str:
    match = re.search(pattern, card, re.MULTILINE)
    if match is None:
        raise UserError(
            f"{source}: the model card has no {what}; it was written by another version of "
            "train_lora. Retrain: dvc repro -f train_lora"
        )
    return match.group(1)


def read_model_card(card_file: Path, params_file: Path, commit: Commit | None) -> Provenance:
    """Provenance from the LoRA's model card (the format `stages.train_lora.model_card` writes) and params.yaml."""
    if not card_file.is_file():
        raise UserError(
            f"{card_file} not found: the report names the LoRA it evaluates from its model card. "
            "Run train_lora first (dvc repro train_lora)"
        )
    card = card_file.read_text()
    params = card_field(card, r"(?s)^## Params\n\n```json\n(.*?)\n```", "params block", card_file)
    return Provenance(
        commit=commit,
        preset=read_preset(params_file),
        base_model=card_field(card, r"^- base model: `([^`]*)`", "base model", card_file),
        base_revision=card_field(card, r"^- base model: `[^`]*` revision `([^`]*)`", "base revision", card_file),
        adapters=card_field(card, r"^- adapters: (.+)$", "adapters line", card_file),
        data_sha256=card_field(card, r"data sha256 `([0-9a-f]{64})`", "data hash", card_file),
        params=json.loads(params),
    )
