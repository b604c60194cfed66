"""ingest: collect images from the configured source, validate them, and write a manifest.

Inputs:  `ingest.source` - `builtin:procedural`, a folder (recursive, sidecar `.txt` captions), or a
         CSV/JSONL manifest of paths relative to it (columns path, caption, licence, attribution).
Outputs: OUT/images/<sha256 prefix><ext>  accepted images, byte-identical copies of the source files
         OUT/manifest.csv  path, sha256, width, height, source, source_caption, licence, attribution
         OUT/rejected.csv  source, reason - every item not accepted, with why
Params:  ingest
"""

import argparse
import hashlib
import io
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from lanskap.data import MANIFEST_COLUMNS, Candidate, IngestResult, folder_candidates, image_record, manifest_rows, validate_image
from lanskap.errors import UserError, run_stage
from lanskap.io import atomic_dir, write_csv
from lanskap.params import IngestParams, load_params
from lanskap.procedural import generate


def procedural_candidates(params: IngestParams):
    for index, (image, caption) in enumerate(generate(params.num_images, params.image_size, params.seed)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        yield Candidate(buffer.getvalue(), f"builtin:procedural#{index}", caption)


def local_candidates(source: Path):
    if source.is_dir():
        for path, caption in folder_candidates(source):
            yield lambda p=path: p.read_bytes(), Candidate(b"", path.as_posix(), caption)
        return
    for row in manifest_rows(source):
        path = source.parent / str(row["path"])
        candidate = Candidate(b"", path.as_posix(), str(row.get("caption", "") or ""),
                              str(row.get("licence", "") or ""), str(row.get("attribution", "") or ""))
        yield lambda p=path: p.read_bytes(), candidate


def candidates(params: IngestParams):
    """(read_bytes, candidate) pairs; reading is deferred so an unreadable file is one rejected item."""
    if params.source == "builtin:procedural":
        for candidate in procedural_candidates(params):
            yield lambda c=candidate: c.data, candidate
        return
    if params.source.startswith("builtin:"):
        raise UserError(f"ingest.source: unknown built-in {params.source!r}; use builtin:procedural")
    source = Path(params.source)
    if not source.exists():
        raise UserError(f"ingest.source: {source} does not exist; put images (with .txt captions) there, "
                        "or use `builtin:procedural` for the demo data")
    yield from local_candidates(source)


def ingest(params: IngestParams, out: Path) -> IngestResult:
    result, seen = IngestResult(), {}
    with atomic_dir(out) as staging:
        (staging / "images").mkdir()
        for read, candidate in tqdm(candidates(params), desc="ingest", unit="img"):
            try:
                data = read()
            except OSError as error:
                result.reject(candidate.source, f"unreadable: {error.strerror or error}")
                continue
            image, reason = validate_image(data, params.min_size)
            if image is None:
                result.reject(candidate.source, reason)
                continue
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen:
                result.reject(candidate.source, f"exact duplicate of {seen[digest]}")
                continue
            seen[digest] = candidate.source
            name = f"{digest[:16]}{Path(candidate.source).suffix.lower() or '.png'}"
            (staging / "images" / name).write_bytes(data)
            record = image_record(staging / "images" / name, image, candidate)
            record["path"] = (out / "images" / name).as_posix()
            result.accepted.append(record)
        write_csv(staging / "manifest.csv", pd.DataFrame(result.accepted, columns=MANIFEST_COLUMNS))
        write_csv(staging / "rejected.csv", pd.DataFrame(result.rejected, columns=["source", "reason"]))
        if len(result.accepted) < 2:
            print_rejected(result)
            raise UserError(f"ingest: only {len(result.accepted)} usable image(s) from {params.source}; the split "
                            "needs at least 2. Fix the rejected files listed above, or add images (with .txt "
                            "captions) to the source; data/raw/README.md says what goes there.")
    return result


def print_rejected(result: IngestResult, limit: int = 20) -> None:
    for item in result.rejected[:limit]:
        print(f"  rejected {item['source']}: {item['reason']}")
    if len(result.rejected) > limit:
        print(f"  ... and {len(result.rejected) - limit} more in rejected.csv")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params("ingest")["ingest"]
    result = ingest(params, args.out)
    print(f"ingest: {len(result.accepted)} accepted, {len(result.rejected)} rejected -> {args.out}/manifest.csv")
    print_rejected(result)


if __name__ == "__main__":
    run_stage(main)
