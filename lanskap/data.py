"""Images in, manifests out: reading sources, validating images, and the manifest tables stages share.

Every table is a CSV whose `path` column is relative to the project root. The user's source files are
only ever read: ingest copies accepted images into its own output folder under content-addressed names.
"""

import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from lanskap.errors import UserError
from lanskap.io import sha256_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_PIXELS = 64_000_000  # above this an image is treated as a decompression bomb
MANIFEST_COLUMNS = ["path", "sha256", "width", "height", "source", "source_caption", "licence", "attribution", "group",
                    "phash"]


class ItemRejected(Exception):
    """One offered item cannot be used; the message is the reason written to the rejected report."""


@dataclass
class Candidate:
    """One image offered by a source, before its bytes are read and validated."""

    source: str  # where it came from, for the report
    caption: str = ""
    licence: str = ""
    attribution: str = ""
    group: str = ""  # a category to stratify the split by: the top-level sub-folder, or a manifest column


@dataclass
class IngestResult:
    accepted: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)

    def reject(self, source: str, reason: str) -> None:
        """Record a rejected item (returns None, so callers can `return result.reject(...)`)."""
        self.rejected.append({"source": source, "reason": reason})


def open_rgb(data_or_path) -> Image.Image:
    """Decode an image fully, apply its EXIF orientation, and convert any mode (CMYK, P, LA, I;16) to RGB."""
    source = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as image:
            if image.width * image.height > MAX_PIXELS:
                raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels")
            image.seek(0)  # first frame of an animated GIF
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                image = image.point(lambda value: value / 256).convert("L")
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                image = composite_on_white(image.convert("RGBA"))
            return image.convert("RGB")


def composite_on_white(image: Image.Image) -> Image.Image:
    """Transparent pixels become white rather than whatever colour the encoder stored under them."""
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image)


def validate_image(data: bytes, min_size: int) -> tuple[Image.Image | None, str]:
    """Return (RGB image, "") for a usable image or (None, reason) for one to reject."""
    try:
        image = open_rgb(data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return None, f"decompression bomb: {error}"
    except UnidentifiedImageError:
        return None, "not an image (content not recognised by Pillow)"
    except (OSError, ValueError, SyntaxError) as error:
        return None, f"corrupt or truncated image: {error}"
    if min(image.size) < min_size:
        return None, f"too small: {image.width}x{image.height}, shorter side below ingest.min_size={min_size}"
    return image, ""


def image_files(folder: Path) -> list[Path]:
    """Image files below `folder`, by suffix, sorted so runs are reproducible."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def folder_candidates(folder: Path):
    """Image files below `folder`: path, sidecar `.txt` caption, and group (the top-level sub-folder, empty
    for files directly in `folder`)."""
    for path in image_files(folder):
        sidecar = path.with_suffix(".txt")
        caption = sidecar.read_text(errors="replace").strip() if sidecar.is_file() else ""
        parts = path.relative_to(folder).parts
        yield path, caption, parts[0] if len(parts) > 1 else ""


def manifest_rows(manifest: Path) -> list[dict]:
    """Rows of a CSV or JSONL manifest with at least a `path` column (local path relative to the manifest)."""
    try:
        if manifest.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        else:
            rows = pd.read_csv(manifest, dtype=str, keep_default_na=False).to_dict("records")
    except (ValueError, pd.errors.ParserError) as error:
        raise UserError(f"{manifest}: cannot parse manifest: {error}") from None
    if rows and "path" not in rows[0]:
        raise UserError(f"{manifest}: manifest needs a 'path' column; found {sorted(rows[0])}")
    return rows


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
        distances = np.bitwise_count(values[i + 1:] ^ values[i])
        for offset in np.flatnonzero(distances <= max_distance):
            pairs.append((i, i + 1 + int(offset), int(distances[offset])))
    return pairs


def image_record(path: Path, image: Image.Image, candidate: Candidate) -> dict:
    return {
        "path": path.as_posix(), "sha256": sha256_file(path), "width": image.width, "height": image.height,
        "source": candidate.source, "source_caption": candidate.caption,
        "licence": candidate.licence, "attribution": candidate.attribution, "group": candidate.group,
        "phash": f"{perceptual_hash(image):016x}",
    }
