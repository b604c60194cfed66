"""The items to rate: one per generated (prompt, sample), read from generate's index, with the sha256 of each image.

An item pairs the base and LoRA images of one prompt and seed with the reference test image. What the page sees
of it is opaque: the item and its images are named by an HMAC (the votes database's secret) of their sha256, and
which image is A (left) is drawn per rater from `rate.seed`, balanced: half the items (one more when odd) show
the LoRA on the left.
"""

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lanskap.core.errors import UserError
from lanskap.core.io import sha256_file
from lanskap.data.manifest import read_table

INDEX_COLUMNS = ["prompt_index", "sample", "caption", "model", "path", "reference_path"]


@dataclass(frozen=True)
class Item:
    prompt_index: int
    sample: int
    caption: str
    reference: Path
    base: Path
    lora: Path
    base_sha256: str
    lora_sha256: str


def read_items(index: Path, root: Path = Path(".")) -> list[Item]:
    """The index's base/LoRA pairs, in (prompt, sample) order; image paths are relative to `root`."""
    table = read_table(index, INDEX_COLUMNS)
    pairs = table.pivot_table(index=["prompt_index", "sample"], columns="model", values="path", aggfunc="first")
    if set(pairs.columns) != {"base", "lora"} or pairs.isna().any().any():
        raise UserError(f"{index}: every prompt and sample needs one base and one LoRA image; rerun generate")
    first = table.drop_duplicates(["prompt_index", "sample"]).set_index(["prompt_index", "sample"])
    items = []
    for (prompt_index, sample), row in pairs.iterrows():
        base, lora = root / row["base"], root / row["lora"]
        for path in (base, lora):  # the references only the page shows: `check_references`
            if not path.is_file():
                raise UserError(f"{index}: image {path} not found; rerun generate (dvc repro generate)")
        items.append(
            Item(
                int(prompt_index),
                int(sample),
                str(first.loc[(prompt_index, sample), "caption"]),
                root / first.loc[(prompt_index, sample), "reference_path"],
                base,
                lora,
                sha256_file(base),
                sha256_file(lora),
            )
        )
    return items


def check_references(items: list[Item], index: Path) -> None:
    missing = [str(item.reference) for item in items if not item.reference.is_file()]
    if missing:
        raise UserError(
            f"{index}: reference image(s) {', '.join(missing[:3])} not found; rerun preprocess and generate "
            "(dvc repro generate)"
        )


def opaque_id(key: bytes, text: str) -> str:
    """20 hex digits of HMAC-SHA256: names an image or item without saying which it is."""
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:20]


def item_id(key: bytes, item: Item) -> str:
    return opaque_id(key, f"item:{item.prompt_index}:{item.sample}:{item.base_sha256}:{item.lora_sha256}")


def rater_plan(items: list[Item], rater: str, seed: int) -> tuple[list[int], list[str]]:
    """The rater's order of the items and the LoRA's side per item (by item position), both drawn from `seed`
    and the rater id: the same after a restart, different between raters, and the sides balanced."""
    rater_key = int.from_bytes(hashlib.sha256(rater.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, rater_key])
    sides = ["left"] * ((len(items) + 1) // 2) + ["right"] * (len(items) // 2)
    sides = [sides[i] for i in rng.permutation(len(items))]
    return [int(i) for i in rng.permutation(len(items))], sides
