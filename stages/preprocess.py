"""preprocess: canonical training images, a preview of the paper's augmentation, and a data card.

Inputs:  SPLIT/train.csv, SPLIT/test.csv (from split); the images they list; INGESTED/ reports for the card
Outputs: OUT/images/<sha256 prefix>.png  RGB, shorter side resized to preprocess.resolution, centre-cropped
                                         unless preprocess.center_crop is false; with preprocess.buckets, at
                                         the size of the image's aspect-ratio bucket instead
         OUT/train.csv, OUT/test.csv     the split tables pointing at the canonical images, with each image's
                                         training size (bucket_width, bucket_height: square unless bucketed)
         REPORTS/preview.png             original | augmented samples (git-tracked; the paper's Figure 4)
         REPORTS/data_card.md            counts, sizes, caption statistics, rejected items, ingest notes, buckets
Params:  preprocess, augment, train.batch_size (the buckets' batches per epoch)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from lanskap.core.errors import run_stage

if TYPE_CHECKING:  # the libraries load where the work starts, so that --help is instant
    import pandas as pd

    from lanskap.core.params import AugmentParams, PreprocessParams


def with_training_sizes(table: pd.DataFrame, params: PreprocessParams) -> pd.DataFrame:
    """The table with each image's training size: the square resolution, or its aspect-ratio bucket."""
    from lanskap.data.buckets import bucket_sizes, nearest_bucket

    if not params.buckets:
        return table.assign(bucket_width=params.resolution, bucket_height=params.resolution)
    sizes = bucket_sizes(params.resolution, params.bucket_reso_steps, params.bucket_max_aspect_ratio)
    chosen = [nearest_bucket(width, height, sizes) for width, height in zip(table["width"], table["height"])]
    return table.assign(bucket_width=[width for width, _ in chosen], bucket_height=[height for _, height in chosen])


def write_canonical(table: pd.DataFrame, params: PreprocessParams, staging: Path, out: Path) -> pd.DataFrame:
    """Write each listed image at its training size; return the table pointing at the new files."""
    from lanskap.core.console import progress
    from lanskap.data.augment import canonical_image, fit_to_size
    from lanskap.data.manifest import open_rgb

    paths = []
    for row in progress(table.itertuples(), total=len(table), desc="preprocess", unit="img"):
        name = f"{row.sha256[:16]}.png"
        if params.buckets:  # the bucket's shape: only the excess beyond its aspect ratio is cropped
            image = fit_to_size(open_rgb(row.path), row.bucket_width, row.bucket_height)
        else:
            image = canonical_image(open_rgb(row.path), params.resolution, params.center_crop)
        image.save(staging / "images" / name, compress_level=1)  # DVC-cached: speed over size
        paths.append((out / "images" / name).as_posix())
    return table.assign(source_path=table["path"], path=paths)


def augmentation_preview(train: pd.DataFrame, params: PreprocessParams, augment: AugmentParams, staging: Path):
    """Each sampled canonical image beside three random augmentations of it."""
    import torch
    from PIL import Image

    from lanskap.core.figures import image_grid
    from lanskap.data.augment import to_pil, train_transform
    from lanskap.data.buckets import table_sizes

    torch.manual_seed(params.seed)
    rows = []
    sampled = train.head(params.preview_samples)
    for path, size in zip(sampled["path"], table_sizes(sampled)):
        transform = train_transform(augment, size)
        original = Image.open(staging / "images" / Path(path).name).convert("RGB")
        rows.append([original] + [to_pil(transform(original)) for _ in range(3)])
    return image_grid(rows, ["original", "augmented", "augmented", "augmented"])


def histogram_rows(values: pd.Series, edges: list[int], unit: str) -> list[str]:
    import pandas as pd

    counts = pd.cut(values, bins=[*edges, float("inf")], right=False).value_counts(sort=False)
    return [f"| {interval.left:g}-{interval.right:g} {unit} | {count} |" for interval, count in counts.items() if count]


def data_card(train: pd.DataFrame, test: pd.DataFrame, ingested: Path, resolution: int, bucketed: bool) -> str:
    import pandas as pd

    from lanskap.data.manifest import read_table

    rejected = read_table(ingested / "rejected.csv", ["source", "reason"])
    near = read_table(ingested / "near_duplicates.csv", ["source_a", "source_b", "hash_distance"])
    notes = read_table(ingested / "notes.csv", ["source", "note"])
    both = pd.concat([train.assign(side="train"), test.assign(side="test")])
    words = both["caption"].str.split().str.len()
    lines = [
        "# Data card",
        "",
        f"- images: {len(both)} ({len(train)} train, {len(test)} test), trained at {resolution} px"
        + (" (in aspect-ratio buckets of about that area: see below)" if bucketed else ""),
        f"- rejected at ingest: {len(rejected)}; near-duplicate pairs kept: {len(near)}",
        f"- read by a documented rule at ingest: {len(notes)}"
        + "".join(f"; {count} {note}" for note, count in notes["note"].value_counts().items()),
        f"- caption words: min {words.min()}, median {int(words.median())}, max {words.max()}; "
        f"CLIP tokens max {both['clip_tokens'].max()} ({(both['clip_tokens'] > 77).sum()} over 77, truncated)",
        "",
        "## Source resolution (shorter side)",
        "",
        "| pixels | images |",
        "|---|---|",
        *histogram_rows(both[["width", "height"]].min(axis=1), [0, 256, 512, 768, 1024, 2048], "px"),
        "",
        "## Caption length",
        "",
        "| words | captions |",
        "|---|---|",
        *histogram_rows(words, [0, 5, 10, 20, 40, 60], "words"),
        "",
        "## Rejected items",
        "",
        *([f"- `{row.source}`: {row.reason}" for row in rejected.itertuples()] or ["none"]),
        "",
        "## Near-duplicate pairs (perceptual hash)",
        "",
        *(
            [f"- `{row.source_a}` ~ `{row.source_b}` ({row.hash_distance} bits)" for row in near.itertuples()]
            or ["none"]
        ),
    ]
    return "\n".join(lines) + "\n"


def bucket_section(train: pd.DataFrame, test: pd.DataFrame, batch_size: int) -> list[str]:
    """The data card's bucket histogram: each bucket's size, images and whole micro-batches per epoch."""
    from lanskap.data.buckets import bucket_groups, size_name, table_sizes, untrained_message

    train_groups, test_groups = bucket_groups(table_sizes(train)), bucket_groups(table_sizes(test))
    rows = [
        f"| {size_name(size)} | {size[0] / size[1]:.2f} | {len(train_groups.get(size, []))} | "
        f"{len(test_groups.get(size, []))} | {len(train_groups.get(size, [])) // batch_size} |"
        for size in sorted(train_groups.keys() | test_groups.keys())
    ]
    untrained = untrained_message(train_groups, batch_size)
    return [
        "## Aspect-ratio buckets",
        "",
        f"Each training micro-batch is drawn from one bucket. Batches per epoch at train.batch_size = {batch_size} on "
        "one process (with N processes a micro-batch is N times larger); each epoch a bucket's last partial batch "
        "is dropped (a different remainder each epoch, in a fresh order). Held-out images are evaluated at their "
        "bucket's size.",
        "",
        "| bucket (W x H) | aspect W/H | train images | test images | batches per epoch |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"- {untrained}" if untrained else "- every training image is in a bucket that trains",
        "",
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", type=Path, required=True)
    parser.add_argument("--ingested", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reports", type=Path, required=True)
    args = parser.parse_args(argv)
    import pandas as pd  # here, not above: --help needs none of them

    from lanskap.core.figures import save_png
    from lanskap.core.io import atomic_dir, write_csv, write_text
    from lanskap.core.params import load_params
    from lanskap.data.buckets import bucket_groups, require_trainable_bucket, table_sizes
    from lanskap.data.manifest import read_table
    from lanskap.preflight import preprocess_bytes, require_free_space

    loaded = load_params("preprocess", "augment", "train")
    params, augment, batch_size = loaded["preprocess"], loaded["augment"], loaded["train"].batch_size

    columns = ["path", "sha256", "caption", "width", "height", "clip_tokens"]
    train, test = (
        with_training_sizes(read_table(args.split / f"{side}.csv", columns), params) for side in ("train", "test")
    )
    if params.buckets:  # one process: train_lora checks again at the global micro-batch of its processes
        require_trainable_bucket(bucket_groups(table_sizes(train)), batch_size, "preprocess", "train.batch_size")
    both = pd.concat([train, test])
    planned = preprocess_bytes(
        zip(both["width"], both["height"]),
        params.resolution,
        params.center_crop or params.buckets,
        params.preview_samples,
    )
    require_free_space(args.out, planned, "preprocess", "preprocess.resolution, or fewer images at ingest")
    with atomic_dir(args.out) as staging:
        (staging / "images").mkdir()
        train = write_canonical(train, params, staging, args.out)
        test = write_canonical(test, params, staging, args.out)
        write_csv(staging / "train.csv", train)
        write_csv(staging / "test.csv", test)
        with atomic_dir(args.reports) as reports:
            save_png(augmentation_preview(train, params, augment, staging), reports / "preview.png")
            card = data_card(train, test, args.ingested, params.resolution, params.buckets)
            if params.buckets:
                card += "\n" + "\n".join(bucket_section(train, test, batch_size))
            write_text(reports / "data_card.md", card)
    print(
        f"preprocess: {len(train)} train + {len(test)} test images at {params.resolution} px -> {args.out}; "
        f"preview and data card -> {args.reports}"
    )


if __name__ == "__main__":
    run_stage(main)
