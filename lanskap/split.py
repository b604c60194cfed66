"""A deterministic train/test split that stays put when images are added or removed.

Each image's side is decided by a hash of its content (sha256) salted with the seed alone, so adding
an image never moves another one across the split.
"""

import hashlib

import pandas as pd

from lanskap.errors import UserError


def test_score(sha256: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the image content and the seed."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_table(table: pd.DataFrame, test_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    is_test = table["sha256"].map(lambda sha: test_score(sha, seed) < test_fraction)
    train, test = table[~is_test].reset_index(drop=True), table[is_test].reset_index(drop=True)
    if train.empty or test.empty:
        raise UserError(f"split: {len(train)} train / {len(test)} test images from {len(table)}; both sides "
                        "need at least one: add images or change split.test_fraction / split.seed")
    shared = set(train["sha256"]) & set(test["sha256"])
    if shared:
        raise UserError(f"split: {len(shared)} image(s) are on both sides (duplicate sha256): {sorted(shared)[:3]}")
    return train, test
