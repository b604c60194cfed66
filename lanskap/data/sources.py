"""What a user's folder or manifest offers ingest: image files, their sidecar captions, manifest rows.

A folder is walked recursively. Hidden files and folders (a name starting with a dot: `.thumbnails/`, `._IMG.jpg`,
`.DS_Store`) are skipped and counted. A file is an image candidate when its extension names an image format or its
first bytes do (`IMG_0001` with no extension, JPEG bytes named `.dat`); everything else is counted as ignored. A
caption is the sidecar `<stem>.txt`, `<name>.txt` (`photo.jpg.txt`) or `<stem>.caption` beside the image, matched
ignoring case and Unicode normalisation (macOS writes NFD names), decoded from UTF-8 or UTF-16 (with or without a
byte-order mark) and cleaned (control characters removed, whitespace collapsed); an empty one counts as missing.
Bytes that are neither are decoded as Windows-1252 (a superset of Latin-1's printable characters, what Windows
editors save) when that gives printable text, with a note; otherwise the item is refused. Never U+FFFD.
"""

import codecs
import io
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from lanskap.core.errors import UserError
from lanskap.data.images import UNDECODABLE_SUFFIXES, ItemRejected, sniff_image_format

IMAGE_SUFFIXES = {
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".apng",
    ".webp",
    ".bmp",
    ".dib",
    ".gif",
    ".tif",
    ".tiff",
    ".avif",
    ".ico",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
    ".tga",
    ".qoi",
    ".psd",
    ".jp2",
    ".j2k",
    ".jpx",
    *UNDECODABLE_SUFFIXES,
}
CAPTION_SUFFIXES = (".txt", ".caption")


@dataclass
class FolderScan:
    images: list[Path] = field(default_factory=list)
    hidden: int = 0  # files skipped because they, or a folder above them, are hidden
    ignored: list[Path] = field(default_factory=list)  # neither an image nor a caption
    captions: dict[tuple[Path, str], Path] = field(default_factory=dict)  # (folder, caption_key(name)) -> file

    def sidecar(self, image: Path) -> Path | None:
        return next(
            (
                self.captions[image.parent, caption_key(name)]
                for name in sidecar_names(image)
                if (image.parent, caption_key(name)) in self.captions
            ),
            None,
        )


def caption_key(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()


def sidecar_names(image: Path) -> list[str]:
    """The caption file names looked for beside `image`, most specific first."""
    return [f"{image.name}.txt", f"{image.stem}.txt", f"{image.stem}.caption"]


def looks_like_image(path: Path) -> bool:
    with open(path, "rb") as stream:
        return sniff_image_format(stream.read(32)) is not None


def scan_folder(folder: Path) -> FolderScan:
    """Sort every file below `folder` into images, captions, hidden and ignored, in a reproducible order."""
    scan = FolderScan()
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            scan.hidden += 1
        elif path.suffix.lower() in CAPTION_SUFFIXES:
            scan.captions[path.parent, caption_key(path.name)] = path
        elif path.suffix.lower() in IMAGE_SUFFIXES or looks_like_image(path):
            scan.images.append(path)
        else:
            scan.ignored.append(path)
    return scan


class Caption(NamedTuple):
    text: str
    note: str = ""  # how it was read when not as UTF-8 or UTF-16, for the report


def decode_caption(data: bytes) -> Caption:
    """Caption text from a sidecar's bytes: UTF-8 or UTF-16 by their byte-order marks, UTF-16 without one by its
    NUL bytes, else UTF-8, else Windows-1252 when that gives printable text; ItemRejected otherwise."""
    try:
        return Caption(clean_caption(data.decode(unicode_encoding(data))))
    except UnicodeDecodeError as error:
        utf_error = error
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        text = ""
    if text and all(char.isprintable() or char in "\t\r\n" for char in text):
        return Caption(clean_caption(text), "caption decoded as Windows-1252 (not UTF-8 or UTF-16)")
    raise ItemRejected(
        f"caption file is not text in UTF-8, UTF-16 or Windows-1252 ({utf_error.encoding}: "
        f"{utf_error.reason} at byte {utf_error.start}); save it as UTF-8"
    )


def unicode_encoding(data: bytes) -> str:
    """UTF-16 by a byte-order mark or by NUL bytes (byte order from where they fall), else UTF-8 (BOM or not)."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if looks_like_utf16(data[:4096]):
        return "utf-16-le" if data[1:4096:2].count(0) > data[0:4096:2].count(0) else "utf-16-be"
    return "utf-8-sig"


def looks_like_utf16(data: bytes) -> bool:
    """Latin text in UTF-16 has a NUL in (nearly) every other byte; a stray NUL in UTF-8 text is no sign of it."""
    if len(data) < 2 or len(data) % 2:
        return False
    half = len(data) // 2
    return max(data[0::2].count(0), data[1::2].count(0)) >= 0.4 * half


def clean_caption(text: str) -> str:
    """NFC-normalised, control characters and byte-order marks removed, runs of whitespace (line breaks and tabs
    too) collapsed to one space; "" when nothing is left."""
    text = unicodedata.normalize("NFC", text).replace("\ufeff", "")
    text = "".join(" " if unicodedata.category(char) == "Cc" else char for char in text)
    return " ".join(text.split())


def manifest_rows(manifest: Path) -> list[dict[str, str]]:
    """Rows of a CSV or JSONL manifest (UTF-8 or UTF-16 as Excel and Notepad save them, a byte-order mark allowed),
    values as text ("" for empty or null);
    every row needs a `path` (a local path relative to the manifest, or a URL). A malformed row is a UserError
    naming its line."""
    rows = jsonl_rows(manifest) if manifest.suffix.lower() == ".jsonl" else csv_rows(manifest)
    for line, row in rows:
        if not row.get("path", "").strip():
            raise UserError(
                f"{manifest}, line {line}: no 'path' (each row needs the image's path or URL); "
                f"found {sorted(row) or 'nothing'}"
            )
    return [row for _, row in rows]


def manifest_text(manifest: Path) -> str:
    """The manifest's text: UTF-16 by its byte-order mark or NUL bytes (Excel's "Unicode Text"), else UTF-8."""
    data = manifest.read_bytes()
    try:
        return data.decode(unicode_encoding(data))
    except UnicodeDecodeError as error:
        raise UserError(
            f"{manifest}: cannot parse manifest: not UTF-8 or UTF-16 text ({error}); save it as UTF-8 "
            "(Excel: CSV UTF-8)"
        ) from None


def csv_rows(manifest: Path) -> list[tuple[int, dict[str, str]]]:
    text = manifest_text(manifest)
    try:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as error:
        raise UserError(f"{manifest}: cannot parse manifest: {error}") from None
    if "path" not in table.columns:
        raise UserError(f"{manifest}: manifest needs a 'path' column; found {sorted(table.columns)}")
    return [(index + 2, row) for index, row in enumerate(table.to_dict("records"))]  # line 1 is the header


def jsonl_rows(manifest: Path) -> list[tuple[int, dict[str, str]]]:
    lines = manifest_text(manifest).splitlines()
    rows = []
    for line, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError as error:
            raise UserError(f"{manifest}, line {line}: cannot parse manifest: not valid JSON ({error})") from None
        if not isinstance(row, dict):
            raise UserError(
                f"{manifest}, line {line}: each line must be a JSON object such as "
                f'{{"path": "a.jpg", "caption": "..."}}; got a {type(row).__name__}: {text[:60]}'
            )
        rows.append((line, {str(key): "" if value is None else str(value) for key, value in row.items()}))
    return rows
