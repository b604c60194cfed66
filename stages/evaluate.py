"""evaluate: CMMD, FID, KID and CLIP score of test, base and LoRA images, with n and uncertainty.

Inputs:  PROCESSED/test.csv (reference images and captions), GENERATED/index.csv (from generate)
Outputs: OUT  metrics JSON with flat numeric keys (for `dvc metrics diff`)
Params:  evaluate
CMMD is the reference's biased estimator x1000 (an `_unbiased` twin beside it); FID is clean-fid's
"clean" mode; FID below 2048 images per set is flagged (`fid_comparable` = 0).
"""

import argparse
from pathlib import Path

import numpy as np

from lanskap.data import read_table
from lanskap.errors import UserError, run_stage
from lanskap.io import write_json
from lanskap.params import load_params

MIN_TEST_PROMPTS = 3  # resampling prompts without replacement needs subsets smaller than the whole


def extract_features(test, generated, params):
    from lanskap.evaluation import Features
    from lanskap.features import load_clip, load_inception

    clip = load_clip(params.clip_model, params.clip_revision)
    inception = load_inception(params.inception_weights)
    image_sets = {"test": test["path"].tolist()}
    for model in ("base", "lora"):
        image_sets[model] = generated[generated["model"] == model].sort_values(["prompt_index", "sample"])["path"].tolist()
    clip_features = {name: clip.image_embeddings([Path(p) for p in paths]) for name, paths in image_sets.items()}
    clip_features["text"] = clip.text_embeddings(test["caption"].tolist())
    inception_features = {name: inception.features([Path(p) for p in paths]) for name, paths in image_sets.items()}
    prompt = generated[generated["model"] == "lora"].sort_values(["prompt_index", "sample"])["prompt_index"].to_numpy()
    return Features(clip_features, inception_features, prompt), clip.name


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--generated", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params("evaluate")["evaluate"]

    from lanskap.evaluation import FID_STABLE_N, lora_minus_base, set_comparisons

    test = read_table(args.data / "test.csv", ["path", "caption"])
    generated = read_table(args.generated / "index.csv", ["prompt_index", "sample", "model", "path"])
    if len(test) < MIN_TEST_PROMPTS:
        raise UserError(f"evaluate: {len(test)} test image(s) in {args.data / 'test.csv'}; the paired statistics "
                        f"need at least {MIN_TEST_PROMPTS}: add images or raise split.test_fraction")
    features, clip_name = extract_features(test, generated, params)
    results = {**set_comparisons(features, params), **lora_minus_base(features, params)}
    results = {key: float(np.round(value, 6)) for key, value in results.items()}
    write_json(args.out, results)

    print(f"evaluate ({clip_name}; n test={results['n_test']:.0f}, base={results['n_base']:.0f}, lora={results['n_lora']:.0f}):")
    for key in ("cmmd_test_vs_text", "cmmd_lora_vs_text", "cmmd_test_vs_lora", "cmmd_test_vs_base",
                "fid_test_vs_lora", "fid_test_vs_base", "clip_score_lora", "clip_score_base"):
        print(f"  {key:28s} {results[key]:12.4f}")
    gap = "cmmd_vs_test_lora_minus_base"
    print(f"  {gap:28s} {results[gap]:12.4f}  95% interval [{results[gap + '_ci_low']:.4f}, "
          f"{results[gap + '_ci_high']:.4f}], p = {results[gap + '_pvalue']:.3f}")
    if not results["fid_comparable"]:
        print(f"  note: FID on fewer than {FID_STABLE_N} images per set is biased and not comparable across n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    run_stage(main)
