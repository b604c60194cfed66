"""How much of each source image preprocess keeps, with and without aspect-ratio buckets (preprocess.buckets).

Exact geometry of lanskap.data.augment.fit_to_size: the image is resized to cover the target and the excess cropped, so
the kept fraction is target area / resized area. Without buckets the target is the square resolution^2; with them,
the bucket nearest the image's aspect ratio. (train_lora's random resized crop then keeps augment.crop_scale of
that in both cases.)

    .venv/bin/python bench/bucket_coverage.py --resolution 768 --step 64 --max-aspect-ratio 4
"""

import argparse

from lanskap.data.buckets import bucket_sizes, nearest_bucket

SOURCES = [
    (1024, 1024),
    (1024, 768),
    (1200, 800),
    (1920, 1080),
    (2000, 1000),
    (2350, 1000),
    (3000, 1000),
    (4000, 1000),
    (1000, 1500),
    (1080, 1920),
]


def kept_fraction(width: int, height: int, target_width: int, target_height: int) -> float:
    scale = max(target_width / width, target_height / height)
    resized = max(target_width, round(width * scale)) * max(target_height, round(height * scale))
    return target_width * target_height / resized


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=768)
    parser.add_argument("--step", type=int, default=64)
    parser.add_argument("--max-aspect-ratio", type=float, default=4.0)
    args = parser.parse_args()
    sizes = bucket_sizes(args.resolution, args.step, args.max_aspect_ratio)
    print(f"{len(sizes)} buckets at {args.resolution} px, step {args.step}, up to {args.max_aspect_ratio:g}:1")
    print("| source | aspect | bucket | bucket pixels / resolution^2 | kept, square crop | kept, bucket |")
    print("|---|---|---|---|---|---|")
    for width, height in SOURCES:
        bucket = nearest_bucket(width, height, sizes)
        print(
            f"| {width}x{height} | {width / height:.2f} | {bucket[0]}x{bucket[1]} | "
            f"{bucket[0] * bucket[1] / args.resolution**2:.2f} | "
            f"{kept_fraction(width, height, args.resolution, args.resolution):.0%} | "
            f"{kept_fraction(width, height, *bucket):.0%} |"
        )


if __name__ == "__main__":
    main()
