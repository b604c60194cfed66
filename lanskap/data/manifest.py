"""Manifests out: the tables stages share, image records and near-duplicate hashes. (Decoding and validating
images: lanskap/data/images.py; reading a source folder or manifest: lanskap/data/sources.py.)

Every table is a CSV whose `path` column is relative to the project root. The user's source files are
only ever read: ingest copies accepted images into its own output folder under content-addressed names.
"""

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from lanskap.core.errors import UserError
from lanskap.core.io import sha256_file
from lanskap.data.images import ItemRejected, open_rgb  # noqa: F401 - where stages and download import them from

MANIFEST_COLUMNS = [
    "path",
    "sha256",
    "width",
    "height",
    "source",
    "source_caption",
    "licence",
    "attribution",
    "group",
    "phash",
]


@dataclass
class Candidate:
    """One image offered by a source, before its bytes are read and validated."""

    source: str  # where it came from, for the report
    caption: str = ""
    licence: str = ""
    attribution: str = ""
    group: str = ""  # a category to stratify the split by: the top-level sub-folder, or a manifest column
    note: str = ""  # how its caption was read when not as UTF-8 or UTF-16


@dataclass
class IngestResult:
    accepted: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    hidden: int = 0  # hidden files skipped in a source folder
    ignored: list[Path] = field(default_factory=list)  # files in a source folder that are no images
    notes: list[dict] = field(default_factory=list)  # accepted items read by a documented rule (source, note)

    def reject(self, source: str, reason: str) -> None:
        """Record a rejected item (returns None, so callers can `return result.reject(...)`)."""
        self.rejected.append({"source": source, "reason": reason})


def require_sha256(data: bytes, expected: str) -> None:
    """ItemRejected unless the bytes have the sha256 a manifest gave (nothing to check when it gave none)."""
    expected = expected.strip().lower()
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise ItemRejected(
            f"sha256 differs from the manifest's sha256 column: expected {expected[:16]}..., "
            f"the file has {hashlib.sha256(data).hexdigest()[:16]}..."
        )


def read_table(path: str | Path, required: list[str]) -> pd.DataFrame:
    """Read a stage's CSV table and check the columns the reader needs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: run the stage that writes it first (`dvc repro`)")
    table = pd.read_csv(path, dtype={"sha256": str}, keep_default_na=False)
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise UserError(f"{path}: missing columns {missing}; rerun the stage that writes it")
    return table


def perceptual_hash(image: Image.Image) -> int:
    """64-bit DCT hash (pHash): low frequencies of a 32x32 greyscale thumbnail against their median.
    Resizing, re-encoding and small edits move few bits; different pictures differ in about half."""
    from scipy.fft import dctn

    thumbnail = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(thumbnail, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])  # the DC term only measures brightness
    return int("".join("1" if bit else "0" for bit in bits), 2)


def near_duplicate_pairs(hashes: list[int], max_distance: int) -> list[tuple[int, int, int]]:
    """(i, j, Hamming distance) for every pair of hashes within max_distance bits, i < j."""
    values = np.array(hashes, dtype=np.uint64)
    pairs = []
    for i in range(len(values) - 1):
        distances = np.bitwise_count(values[i + 1 :] ^ values[i])
        for offset in np.flatnonzero(distances <= max_distance):
            pairs.append((i, i + 1 + int(offset), int(distances[offset])))
    return pairs


def image_record(path: Path, image: Image.Image, candidate: Candidate) -> dict:
    return {
        "path": path.as_posix(),
        "sha256": sha256_file(path),
        "width": image.width,
        "height": image.height,
        "source": candidate.source,
        "source_caption": candidate.caption,
        "licence": candidate.licence,
        "attribution": candidate.attribution,
        "group": candidate.group,
        "phash": f"{perceptual_hash(image):016x}",
    }
