"""A deterministic train/test split that stays put when images are added or removed.

Each image's side is decided by a hash of its content (sha256) salted with the seed alone, so adding
an image never moves another one across the split. A split leaving evaluate fewer than its minimum of test
prompts is refused here, before preprocessing and training.
"""

import hashlib

import pandas as pd

from lanskap.core.errors import UserError

# evaluate's minimum: KID's jackknife leaves one test prompt out and still needs 2 images per set. Split and the
# ingest preflight refuse data that would give fewer (evaluate's interval needs more: paired.MIN_INTERVAL_PROMPTS).
MIN_TEST_PROMPTS = 3


def test_score(sha256: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the image content and the seed."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def stratified_test_mask(table: pd.DataFrame, test_fraction: float, seed: int, column: str) -> pd.Series:
    """Per value of `column`, the round(fraction x count) images with the lowest scores go to test, so every
    stratum keeps its share exactly; an added image can move at most one boundary image of its stratum."""
    if column not in table.columns:
        raise UserError(f"split.stratify: no column {column!r} in the captions table; columns are {list(table.columns)}")
    scores = table["sha256"].map(lambda sha: test_score(sha, seed))
    ranks = scores.groupby(table[column].astype(str)).rank(method="first")
    sizes = table.groupby(table[column].astype(str))["sha256"].transform("size")
    return ranks <= (sizes * test_fraction).round()


def split_table(table: pd.DataFrame, test_fraction: float, seed: int,
                stratify: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    if stratify:
        is_test = stratified_test_mask(table, test_fraction, seed, stratify)
    else:  # a fixed threshold: adding or removing images never moves another one
        is_test = table["sha256"].map(lambda sha: test_score(sha, seed) < test_fraction)
    train, test = table[~is_test].reset_index(drop=True), table[is_test].reset_index(drop=True)
    if train.empty or test.empty:
        raise UserError(f"split: {len(train)} train / {len(test)} test images from {len(table)}; both sides "
                        "need at least one: add images or change split.test_fraction / split.seed")
    if len(test) < MIN_TEST_PROMPTS:
        raise UserError(f"split: {len(test)} test image(s) from {len(table)} with split.test_fraction={test_fraction}; "
                        f"evaluate needs at least {MIN_TEST_PROMPTS} test prompts (one per test image): raise "
                        "split.test_fraction, add images, or try another split.seed")
    shared = set(train["sha256"]) & set(test["sha256"])
    if shared:
        raise UserError(f"split: {len(shared)} image(s) are on both sides (duplicate sha256): {sorted(shared)[:3]}")
    return train, test
