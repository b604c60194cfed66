"""ingest: collect images from the configured source, validate them, and write a manifest.

Inputs:  `ingest.source` - `builtin:procedural`, a folder (recursive; hidden files skipped; sidecar `.txt`
         captions, see lanskap/data/sources.py), or a CSV/JSONL manifest whose `path` column holds paths relative to
         it or http(s) URLs (optional columns caption, licence, attribution, group, sha256: checked when given)
Outputs: OUT/images/<sha256 prefix><ext>  accepted images, byte-identical copies of the source files, the
                                  extension naming their real format
         OUT/manifest.csv         path, sha256, width, height, source, source_caption, licence, attribution,
                                  group (sub-folder or manifest column), phash
         OUT/rejected.csv         source, reason - every item not accepted, with why
         OUT/near_duplicates.csv  pairs of accepted images whose perceptual hashes nearly match (kept, reported)
         OUT/notes.csv            source, note - accepted items read by a documented rule: a caption decoded as
                                  Windows-1252, an ICC profile for another colour space ignored
Params:  ingest; and the model, caption, split and evaluate keys the preflight checks (lanskap/preflight.py)
The source is only read. Downloads are cached in .lanskap-cache/downloads/, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING

from lanskap.core.errors import UserError, run_stage

if TYPE_CHECKING:  # the libraries load where the work starts, so that --help is instant
    import pandas as pd

    from lanskap.core.params import IngestParams
    from lanskap.data.manifest import Candidate, IngestResult

DOWNLOAD_CACHE = Path(".lanskap-cache/downloads")
USUAL_SUFFIX = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "TIFF": ".tiff",
    "JPEG2000": ".jp2",
}  # others: the format's name (.png, .webp, .ppm)


def procedural_candidates(params: IngestParams):
    from lanskap.data.manifest import Candidate
    from lanskap.data.procedural import generate_item

    for index in range(params.num_images):
        image, caption = generate_item(index, params.image_size, params.seed, params.world)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        yield (lambda data=data: data), Candidate(f"builtin:procedural#{index}", caption)


def manifest_reader(reference: str, folder: Path, row: dict, params: IngestParams):
    """A deferred read of one manifest entry: a download for URLs, a file read confined to the folder."""
    from lanskap.data.download import DownloadPolicy, download
    from lanskap.data.manifest import ItemRejected, require_sha256

    if "://" in reference:
        policy = DownloadPolicy(
            params.download_timeout, int(params.max_download_mb * 2**20), params.download_retries, backoff=0.5
        )
        return lambda: download(reference, DOWNLOAD_CACHE, policy, str(row.get("sha256", "") or ""))
    path = folder / reference

    def read_local() -> bytes:
        if not path.resolve().is_relative_to(folder.resolve()):
            raise ItemRejected(f"path outside the manifest's folder {folder}: {reference}")
        if "\\" in reference and not path.exists():
            raise ItemRejected(
                f"no such file: {reference}; this looks like a Windows path: write paths with / "
                f"between folders, relative to the manifest ({windows_to_posix(reference)})"
            )
        data = path.read_bytes()
        require_sha256(data, row.get("sha256", ""))
        return data

    return read_local


def windows_to_posix(reference: str) -> str:
    """`photos\\a.jpg` -> `photos/a.jpg`; a drive (`C:\\...`) cannot be made relative, so it is named instead."""
    posix = reference.replace("\\", "/")
    return f"e.g. {posix}" if not re.match(r"[A-Za-z]:/", posix) else "not a drive letter such as C:"


def folder_candidates(folder: Path, result: IngestResult):
    """Each image below `folder` with its sidecar caption and group (the top-level sub-folder, empty for files
    directly in `folder`); hidden and non-image files are counted in `result`."""
    from lanskap.data.manifest import Candidate, ItemRejected
    from lanskap.data.sources import decode_caption, scan_folder

    scan = scan_folder(folder)
    result.hidden, result.ignored = scan.hidden, scan.ignored
    for path in scan.images:
        parts = path.relative_to(folder).parts
        candidate = Candidate(path.as_posix(), group=parts[0] if len(parts) > 1 else "")
        sidecar = scan.sidecar(path)
        try:
            candidate.caption, candidate.note = decode_caption(sidecar.read_bytes()) if sidecar else ("", "")
        except OSError as error:
            yield unreadable(f"caption file {sidecar} unreadable: {error.strerror or error}"), candidate
            continue
        except ItemRejected as error:
            yield unreadable(f"{sidecar.name}: {error}"), candidate
            continue
        yield (lambda p=path: p.read_bytes()), candidate


def unreadable(reason: str):
    from lanskap.data.manifest import ItemRejected

    def read() -> bytes:
        raise ItemRejected(reason)

    return read


def local_candidates(source: Path, params: IngestParams, result: IngestResult):
    from lanskap.data.manifest import Candidate
    from lanskap.data.sources import clean_caption, manifest_rows

    if source.is_dir():
        yield from folder_candidates(source, result)
        return
    for row in manifest_rows(source):
        caption, licence, attribution, group = (
            row.get(key, "") for key in ("caption", "licence", "attribution", "group")
        )
        candidate = Candidate(row["path"], clean_caption(caption), licence, attribution, group)
        yield manifest_reader(row["path"], source.parent, row, params), candidate


def candidates(params: IngestParams, result: IngestResult):
    """(read_bytes, candidate) pairs; reading is deferred so one bad item is one rejected row."""
    if params.source == "builtin:procedural":
        return procedural_candidates(params)
    if params.source.startswith("builtin:"):
        raise UserError(f"ingest.source: unknown built-in {params.source!r}; use builtin:procedural")
    source = Path(params.source)
    if not source.exists():
        raise UserError(
            f"ingest.source: {source} does not exist; put images (with .txt captions) there, "
            "or use `builtin:procedural` for the demo data"
        )
    return local_candidates(source, params, result)


def accept(read, candidate: Candidate, params: IngestParams, seen: dict, result: IngestResult):
    """Validated image and its bytes, or None after recording why the item was rejected."""
    from lanskap.data.images import check_image
    from lanskap.data.manifest import ItemRejected

    try:
        data = read()
        image, file_format, note = check_image(data, candidate.source, params.min_size, params.max_aspect_ratio)
    except ItemRejected as reason:
        return result.reject(candidate.source, str(reason))
    except OSError as error:
        return result.reject(candidate.source, f"unreadable: {error.strerror or error}")
    digest = hashlib.sha256(data).hexdigest()
    if digest in seen:
        return result.reject(candidate.source, f"exact duplicate of {seen[digest]}")
    seen[digest] = candidate.source
    for text in filter(None, (candidate.note, note)):
        result.notes.append({"source": candidate.source, "note": text})
    return image, data, digest, file_format


def planned_bytes(params: IngestParams) -> int:
    """Upper bound of the bytes ingest writes (images and download cache), for the disk preflight."""
    from lanskap.data.download import cache_path
    from lanskap.data.sources import manifest_rows, scan_folder
    from lanskap.preflight import procedural_ingest_bytes, source_ingest_bytes

    if params.source == "builtin:procedural":
        return procedural_ingest_bytes(params.num_images, params.image_size)
    source = Path(params.source)
    if source.is_dir():
        return source_ingest_bytes(scan_folder(source).images, [], 0)
    references = [row["path"] for row in manifest_rows(source)]
    return source_ingest_bytes(
        [source.parent / ref for ref in references if "://" not in ref],
        [cache_path(ref, DOWNLOAD_CACHE) for ref in references if "://" in ref],
        int(params.max_download_mb * 2**20),
    )


def image_suffix(source: str, file_format: str) -> str:
    """The stored file's extension, from the format Pillow decoded: the source's own when it names that format
    (`.jpeg`, `.pgm`), else the format's usual one (JPEG bytes named `.png` are stored as `.jpg`). Nothing else
    of the source's name is kept: a URL's can be any length and hold any character."""
    from PIL import Image

    suffix = Path(source).suffix.lower()
    extensions = Image.registered_extensions()
    if extensions.get(suffix) == file_format:
        return suffix
    usual = USUAL_SUFFIX.get(file_format, f".{file_format.lower()}")
    return (
        usual
        if extensions.get(usual) == file_format
        else min(ext for ext, name in extensions.items() if name == file_format)
    )


def ingest(params: IngestParams, out: Path) -> IngestResult:
    import pandas as pd

    from lanskap.core.console import progress
    from lanskap.core.io import atomic_dir, write_csv
    from lanskap.data.manifest import MANIFEST_COLUMNS, IngestResult, image_record
    from lanskap.preflight import require_free_space

    result, seen = IngestResult(), {}
    items = candidates(params, result)  # checks the source exists before it is measured
    shrink = (
        "ingest.num_images, ingest.image_size"
        if params.source == "builtin:procedural"
        else f"fewer images in {params.source}"
    )
    require_free_space(out, planned_bytes(params), "ingest", shrink)
    with atomic_dir(out) as staging:
        (staging / "images").mkdir()
        for read, candidate in progress(items, desc="ingest", unit="img", mininterval=1.0):
            accepted = accept(read, candidate, params, seen, result)
            if accepted is None:
                continue
            image, data, digest, file_format = accepted
            name = f"{digest[:16]}{image_suffix(candidate.source, file_format)}"
            (staging / "images" / name).write_bytes(data)
            result.accepted.append(
                image_record(staging / "images" / name, image, candidate) | {"path": (out / "images" / name).as_posix()}
            )
        write_csv(staging / "manifest.csv", pd.DataFrame(result.accepted, columns=MANIFEST_COLUMNS))
        write_csv(staging / "rejected.csv", pd.DataFrame(result.rejected, columns=["source", "reason"]))
        write_csv(staging / "near_duplicates.csv", near_duplicates(result.accepted, params.near_duplicate_distance))
        write_csv(staging / "notes.csv", pd.DataFrame(result.notes, columns=["source", "note"]))
        if len(result.accepted) < 2:
            print_rejected(result)
            raise UserError(too_few_images(result, params.source))
    return result


def too_few_images(result: IngestResult, source: str) -> str:
    """Why ingest stops: what the source held, and what to do about it."""
    found = (
        f"{len(result.rejected)} rejected (listed above)"
        if result.rejected
        else "no image files found" + (f" ({skipped_summary(result)})" if skipped_summary(result) else "")
    )
    fix = "Fix the rejected files, or add" if result.rejected else "Add"
    return (
        f"ingest: only {len(result.accepted)} usable image(s) from {source}: {found}; the split needs at least "
        f"2. {fix} images (with .txt captions) to the source; data/raw/README.md says what goes there."
    )


def skipped_summary(result: IngestResult) -> str:
    """ "3 hidden files skipped, 2 non-image files ignored (notes.md, ...)", or "" when there were none."""
    parts = [f"{result.hidden} hidden file(s) skipped"] if result.hidden else []
    if result.ignored:
        names = ", ".join(path.name for path in result.ignored[:3]) + (", ..." if len(result.ignored) > 3 else "")
        parts.append(f"{len(result.ignored)} non-image file(s) ignored ({names})")
    return ", ".join(parts)


def near_duplicates(accepted: list[dict], max_distance: int) -> pd.DataFrame:
    import pandas as pd

    from lanskap.data.manifest import near_duplicate_pairs

    hashes = [int(record["phash"], 16) for record in accepted]
    rows = [
        {"source_a": accepted[i]["source"], "source_b": accepted[j]["source"], "hash_distance": distance}
        for i, j, distance in near_duplicate_pairs(hashes, max_distance)
    ]
    return pd.DataFrame(rows, columns=["source_a", "source_b", "hash_distance"])


def print_rejected(result: IngestResult, limit: int = 20) -> None:
    for item in result.rejected[:limit]:
        print(f"  rejected {item['source']}: {item['reason']}")
    if len(result.rejected) > limit:
        print(f"  ... and {len(result.rejected) - limit} more in rejected.csv")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    import pandas as pd

    from lanskap.core.params import load_params
    from lanskap.preflight import require_pipeline_inputs

    params = load_params("ingest", "model", "caption", "split", "evaluate")
    require_pipeline_inputs(params)  # every later stage's models and enough images, before any work
    result = ingest(params["ingest"], args.out)
    near = pd.read_csv(args.out / "near_duplicates.csv")
    skipped = skipped_summary(result)
    print(
        f"ingest: {len(result.accepted)} accepted, {len(result.rejected)} rejected, {len(near)} near-duplicate "
        f"pair(s) reported{', ' + skipped if skipped else ''} -> {args.out}/manifest.csv"
    )
    for note, count in pd.Series([item["note"] for item in result.notes], dtype=str).value_counts().items():
        print(f"  note: {count} item(s): {note} (listed in {args.out}/notes.csv)")
    print_rejected(result)


if __name__ == "__main__":
    run_stage(main)
