"""The votes database: one SQLite file, one row per answer, committed to git with the experiment.

Why git and not DVC: the file is small (about 150 bytes a vote, so 10,000 votes are about 1.5 MB) and it is
the experiment's record, so `git checkout` of a branch must bring that branch's votes, as it brings its
params and metrics. The server runs SQLite in WAL mode and checkpoints on close, so the committed file holds
every vote and the WAL side files (`-wal`, `-shm`, ignored by git) are gone once it stops.

A vote records the sha256 of both images it was cast on, so it stays attached to those images: when generate
makes new ones, old votes are kept but no longer count (the summary says how many are stale). Each answer is
one transaction, and a (rater, images, criterion) answered again replaces the earlier answer.
"""

import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from lanskap.core.errors import UserError

DEFAULT_VOTES = Path("ratings/votes.sqlite")
ANSWERS = ("A", "B", "tie")  # A: the left image, B: the right one
SIDES = ("left", "right")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY,
    rater TEXT NOT NULL,
    prompt_index INTEGER NOT NULL,
    sample INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    base_sha256 TEXT NOT NULL CHECK (length(base_sha256) = 64),
    lora_sha256 TEXT NOT NULL CHECK (length(lora_sha256) = 64),
    lora_side TEXT NOT NULL CHECK (lora_side IN ('left', 'right')),
    criterion TEXT NOT NULL,
    answer TEXT NOT NULL CHECK (answer IN ('A', 'B', 'tie')),
    voted_at TEXT NOT NULL,
    UNIQUE (rater, base_sha256, lora_sha256, prompt_index, sample, criterion)
);
"""


@dataclass(frozen=True)
class Vote:
    rater: str
    prompt_index: int
    sample: int
    prompt: str
    base_sha256: str
    lora_sha256: str
    lora_side: str
    criterion: str
    answer: str


def connect(path: Path, create: bool = False) -> sqlite3.Connection:
    """A connection in WAL mode with full sync (a vote is a person's work: it survives a power cut once answered).
    `create`: make the file and its per-database secret if missing; otherwise a missing file is an error."""
    if not path.is_file() and not create:
        raise UserError(f"{path}: no votes database; `python -m lanskap.rate` creates it (it is committed to git)")
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    connection.executescript(SCHEMA)
    connection.execute("INSERT OR IGNORE INTO meta VALUES ('secret', ?)", (secrets.token_hex(32),))
    return connection


def open_existing(path: Path) -> sqlite3.Connection:
    """For the summary: the votes (those still in a WAL a killed server left too), creating nothing. Closed with
    `close`, it folds any WAL into the file and leaves no side file behind (a read-only connection would)."""
    if not path.is_file():
        raise UserError(f"{path}: no votes database; `python -m lanskap.rate` creates it (it is committed to git)")
    return sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=30)


def secret(connection: sqlite3.Connection) -> bytes:
    """The per-database key of the opaque image and item ids and the CSRF tokens."""
    return bytes.fromhex(connection.execute("SELECT value FROM meta WHERE key = 'secret'").fetchone()[0])


def record(connection: sqlite3.Connection, vote: Vote) -> None:
    """One answer in one transaction; the same rater, images and criterion answered again replace it."""
    if vote.answer not in ANSWERS or vote.lora_side not in SIDES:
        raise ValueError(f"bad vote {vote}")
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    with connection:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(
            "INSERT INTO votes (rater, prompt_index, sample, prompt, base_sha256, lora_sha256, lora_side, criterion,"
            " answer, voted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (rater, base_sha256, lora_sha256, prompt_index, sample, criterion)"
            " DO UPDATE SET answer = excluded.answer, lora_side = excluded.lora_side, voted_at = excluded.voted_at",
            (*vars(vote).values(), now),
        )


def rater_answers(connection: sqlite3.Connection, rater: str) -> list[tuple]:
    """(prompt_index, sample, base_sha256, lora_sha256, criterion, answer, lora_side) of the rater's answers."""
    return connection.execute(
        "SELECT prompt_index, sample, base_sha256, lora_sha256, criterion, answer, lora_side FROM votes"
        " WHERE rater = ?",
        (rater,),
    ).fetchall()


def all_votes(connection: sqlite3.Connection) -> list[Vote]:
    rows = connection.execute(
        "SELECT rater, prompt_index, sample, prompt, base_sha256, lora_sha256, lora_side, criterion, answer"
        " FROM votes ORDER BY id"
    ).fetchall()
    return [Vote(*row) for row in rows]


def close(connection: sqlite3.Connection) -> None:
    """Fold the WAL into the database file, so that the file git commits holds every vote."""
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()
