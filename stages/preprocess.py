"""preprocess: canonical training images, a preview of the paper's augmentation, and a data card.

Inputs:  SPLIT/train.csv, SPLIT/test.csv (from split); the images they list; INGESTED/ reports for the card
Outputs: OUT/images/<sha256 prefix>.png  RGB, shorter side resized to preprocess.resolution, centre-cropped
                                         unless preprocess.center_crop is false
         OUT/train.csv, OUT/test.csv     the split tables pointing at the canonical images
         REPORTS/preview.png             original | augmented samples (git-tracked; the paper's Figure 4)
         REPORTS/data_card.md            counts, sizes, caption statistics, rejected items
Params:  preprocess, augment
"""

import argparse
from pathlib import Path

import pandas as pd
from PIL import Image

from lanskap.augment import canonical_image, to_pil, train_transform
from lanskap.console import progress
from lanskap.data import open_rgb, read_table
from lanskap.errors import run_stage
from lanskap.io import atomic_dir, write_csv, write_text
from lanskap.params import AugmentParams, PreprocessParams, load_params
from lanskap.preflight import preprocess_bytes, require_free_space
from lanskap.report import image_grid, save_png


def write_canonical(table: pd.DataFrame, params: PreprocessParams, staging: Path, out: Path) -> pd.DataFrame:
    """Write each listed image at training resolution; return the table pointing at the new files."""
    paths = []
    for row in progress(table.itertuples(), total=len(table), desc="preprocess", unit="img"):
        name = f"{row.sha256[:16]}.png"
        image = canonical_image(open_rgb(row.path), params.resolution, params.center_crop)
        image.save(staging / "images" / name, compress_level=1)  # DVC-cached: speed over size
        paths.append((out / "images" / name).as_posix())
    return table.assign(source_path=table["path"], path=paths)


def augmentation_preview(train: pd.DataFrame, params: PreprocessParams, augment: AugmentParams, staging: Path):
    """Each sampled canonical image beside three random augmentations of it."""
    import torch

    torch.manual_seed(params.seed)
    transform = train_transform(augment, params.resolution)
    rows = []
    for path in train["path"].head(params.preview_samples):
        original = Image.open(staging / "images" / Path(path).name).convert("RGB")
        rows.append([original] + [to_pil(transform(original)) for _ in range(3)])
    return image_grid(rows, ["original", "augmented", "augmented", "augmented"])


def histogram_rows(values: pd.Series, edges: list[int], unit: str) -> list[str]:
    counts = pd.cut(values, bins=[*edges, float("inf")], right=False).value_counts(sort=False)
    return [f"| {interval.left:g}-{interval.right:g} {unit} | {count} |" for interval, count in counts.items() if count]


def data_card(train: pd.DataFrame, test: pd.DataFrame, ingested: Path, resolution: int) -> str:
    rejected = read_table(ingested / "rejected.csv", ["source", "reason"])
    near = read_table(ingested / "near_duplicates.csv", ["source_a", "source_b", "hash_distance"])
    both = pd.concat([train.assign(side="train"), test.assign(side="test")])
    words = both["caption"].str.split().str.len()
    lines = [
        "# Data card", "",
        f"- images: {len(both)} ({len(train)} train, {len(test)} test), trained at {resolution} px",
        f"- rejected at ingest: {len(rejected)}; near-duplicate pairs kept: {len(near)}",
        f"- caption words: min {words.min()}, median {int(words.median())}, max {words.max()}; "
        f"CLIP tokens max {both['clip_tokens'].max()} ({(both['clip_tokens'] > 77).sum()} over 77, truncated)", "",
        "## Source resolution (shorter side)", "", "| pixels | images |", "|---|---|",
        *histogram_rows(both[["width", "height"]].min(axis=1), [0, 256, 512, 768, 1024, 2048], "px"), "",
        "## Caption length", "", "| words | captions |", "|---|---|",
        *histogram_rows(words, [0, 5, 10, 20, 40, 60], "words"), "",
        "## Rejected items", "",
        *([f"- `{row.source}`: {row.reason}" for row in rejected.itertuples()] or ["none"]), "",
        "## Near-duplicate pairs (perceptual hash)", "",
        *([f"- `{row.source_a}` ~ `{row.source_b}` ({row.hash_distance} bits)" for row in near.itertuples()] or ["none"]),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", type=Path, required=True)
    parser.add_argument("--ingested", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reports", type=Path, required=True)
    args = parser.parse_args(argv)
    loaded = load_params("preprocess", "augment")
    params, augment = loaded["preprocess"], loaded["augment"]

    columns = ["path", "sha256", "caption", "width", "height", "clip_tokens"]
    train, test = (read_table(args.split / f"{side}.csv", columns) for side in ("train", "test"))
    both = pd.concat([train, test])
    planned = preprocess_bytes(zip(both["width"], both["height"]), params.resolution, params.center_crop,
                               params.preview_samples)
    require_free_space(args.out, planned, "preprocess", "preprocess.resolution, or fewer images at ingest")
    with atomic_dir(args.out) as staging:
        (staging / "images").mkdir()
        train = write_canonical(train, params, staging, args.out)
        test = write_canonical(test, params, staging, args.out)
        write_csv(staging / "train.csv", train)
        write_csv(staging / "test.csv", test)
        with atomic_dir(args.reports) as reports:
            save_png(augmentation_preview(train, params, augment, staging), reports / "preview.png")
            write_text(reports / "data_card.md", data_card(train, test, args.ingested, params.resolution))
    print(f"preprocess: {len(train)} train + {len(test)} test images at {params.resolution} px -> {args.out}; "
          f"preview and data card -> {args.reports}")


if __name__ == "__main__":
    run_stage(main)
