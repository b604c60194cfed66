"""split: divide the captioned images into train and test sets.

Inputs:  CAPTIONS  (from caption)
Outputs: OUT/train.csv, OUT/test.csv  (same columns as the input)
Params:  split
"""

import argparse
from pathlib import Path

from lanskap.core.errors import run_stage


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from lanskap.core.io import atomic_dir, write_csv  # here, not above: --help needs none of them
    from lanskap.core.params import load_params
    from lanskap.data.manifest import read_table
    from lanskap.data.split import split_table

    params = load_params("split")["split"]

    table = read_table(args.captions, ["path", "sha256", "caption"])
    train, test = split_table(table, params.test_fraction, params.seed, params.stratify)
    with atomic_dir(args.out) as staging:
        write_csv(staging / "train.csv", train)
        write_csv(staging / "test.csv", test)
    print(
        f"split: {len(train)} train / {len(test)} test (test_fraction={params.test_fraction}, "
        f"seed={params.seed}) -> {args.out}"
    )


if __name__ == "__main__":
    run_stage(main)
