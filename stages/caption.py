"""caption: give every ingested image its training caption.

Inputs:  INGESTED/manifest.csv (from ingest); caption.overrides, a CSV of per-image captions that win
Outputs: OUT  the manifest plus `caption` and `clip_tokens` columns
Params:  caption
Captions longer than 77 CLIP tokens are reported: training truncates them.
"""

import argparse
from pathlib import Path

from lanskap.core.errors import run_stage


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from lanskap.core.console import quiet_libraries  # here, not above: --help needs none of them
    from lanskap.core.io import write_csv
    from lanskap.core.params import load_params
    from lanskap.data.captions import CLIP_MAX_TOKENS, choose_captions, token_counts
    from lanskap.data.manifest import MANIFEST_COLUMNS, read_table

    params = load_params("caption")["caption"]
    if params.method == "model":
        quiet_libraries()

    table = read_table(args.manifest, MANIFEST_COLUMNS)
    table["caption"] = choose_captions(table, params)
    table["clip_tokens"] = token_counts(table["caption"])
    write_csv(args.out, table)

    too_long = table[table["clip_tokens"] > CLIP_MAX_TOKENS]
    for row in too_long.itertuples():
        print(f"  warning: {row.path}: caption has {row.clip_tokens} CLIP tokens, truncated to {CLIP_MAX_TOKENS}")
    words = table["caption"].str.split().str.len()
    print(
        f"caption: {len(table)} captions (method={params.method}), words min/median/max "
        f"{words.min()}/{int(words.median())}/{words.max()}, {len(too_long)} over {CLIP_MAX_TOKENS} tokens "
        f"-> {args.out}"
    )


if __name__ == "__main__":
    run_stage(main)
