"""evaluate: CMMD, FID, KID and CLIP score of test, base and LoRA images, with n and uncertainty; on the demo's
Inception stand-in also the traits diagnostic (lanskap.evaluate.traits: what the images show of what the prompts ask).

Inputs:  PROCESSED/test.csv (reference images and captions), GENERATED/index.csv (from generate)
         TRAINING_LOG/{train,validation}/loss.tsv (dvclive, for the loss curve; optional)
         COMPARISON (from generate), DATA_CARD (from preprocess), MODEL_CARD (from train_lora: base model,
         LoRA shape, steps, data hash), params.yaml's `preset`, and the git commit when there is one
Outputs: OUT  metrics JSON with flat numeric keys (for `dvc metrics diff`); ema_weights_scored says which LoRA
              weights generate used (1: the EMA weights, 0: the raw ones)
         REPORTS/base_vs_lora.csv  metric, model, value: base and LoRA per metric (`dvc plots` bar chart)
         REPORTS/report.md, loss.png  the run's report for a reviewer (figures linked by relative path)
         REPORTS/report.html          the same, one self-contained file (figures inline) that opens offline
Params:  evaluate, preset
CMMD is the reference's biased estimator x1000 (an `_unbiased` twin beside it); FID is clean-fid's
"clean" mode; FID below 2048 images per set is flagged (`fid_comparable` = 0). Each LoRA-minus-base gap has a
gap p (`_pvalue`, t-test of "gap = 0", agrees with its interval) and a changed p (`_changed_pvalue`, swap test of
"the LoRA changed nothing").

Image features are cached per batch in .lanskap-cache/features/ (LANSKAP_FEATURE_CACHE moves it), outside the
outputs: the test set's serve every experiment (lanskap/evaluate/feature_cache.py). Several GPUs, machines or CPU
processes: `accelerate launch --num_processes N -m stages.evaluate ...` shares the feature batches out; the main
process computes the metrics and writes every output, byte-identical for any N (lanskap/evaluate/extraction.py).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lanskap.core.errors import UserError, run_stage

if TYPE_CHECKING:  # the libraries load where the work starts, so that --help is instant
    import pandas as pd

    from lanskap.core.provenance import Provenance


def extract_features(test, generated, params, processes):
    """The sets' features through the feature cache, their batches shared out among the processes: (Features, CLIP
    name, Inception name) on the main process, None on the others."""
    from lanskap.evaluate.comparisons import Features
    from lanskap.evaluate.extraction import extract_sets

    # The pinned CPU thread on every device (no use_threads_for_device, unlike generate and train_lora): evaluate's
    # CPU work is PIL decoding, one thread per call whatever torch's setting, and the metrics' float64 sums, whose
    # bytes must not depend on the host's core count.
    clip, inception, extractors = load_extractors(params, str(processes.device))
    image_sets = {"test": [Path(p) for p in test["path"]]}
    for model in ("base", "lora"):
        rows = generated[generated["model"] == model].sort_values(["prompt_index", "sample"])
        image_sets[model] = [Path(p) for p in rows["path"]]
    features, counts = extract_sets(image_sets, extractors, processes)
    if features is None:
        return None
    print(f"features: {counts['hit']} batch entries from the cache, {counts['miss']} computed (main process)")
    clip_features = {**features["clip"], "text": clip.text_embeddings(test["caption"].tolist())}
    prompt = generated[generated["model"] == "lora"].sort_values(["prompt_index", "sample"])["prompt_index"].to_numpy()
    return Features(clip_features, features["inception"], prompt), clip.name, inception.name


def load_extractors(params, device: str):
    """The CLIP and Inception embedders on `device`, and each with the cache of its revision."""
    from lanskap.evaluate.extraction import Extractor
    from lanskap.evaluate.feature_cache import FeatureCache, cache_root, extractor_revision
    from lanskap.evaluate.features import load_clip, load_inception

    clip = load_clip(params.clip_model, params.clip_revision, device)
    inception = load_inception(params.inception_weights, device)
    extractors = {
        kind: Extractor(embedder, FeatureCache(cache_root(), kind, extractor_revision(kind, embedder.weights, device)))
        for kind, embedder in (("clip", clip), ("inception", inception))
    }
    return clip, inception, extractors


def process_state():
    """This process's place among `accelerate launch`'s (a single process when run directly)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def read_loss_curves(training_log: Path) -> dict[str, pd.DataFrame]:
    """dvclive's train and validation loss tables that exist (a run may have no validation split)."""
    import pandas as pd

    tables = {split: training_log / split / "loss.tsv" for split in ("train", "validation")}
    return {split: pd.read_csv(path, sep="\t") for split, path in tables.items() if path.is_file()}


def read_report_sources(args) -> tuple[Provenance, str]:
    """The run's provenance and the data card's text, read before any work: a missing one stops the stage."""
    from lanskap.core.params import PARAMS_FILE
    from lanskap.core.provenance import git_commit, read_model_card

    for path, stage in ((args.comparison, "generate"), (args.data_card, "preprocess")):
        if not path.is_file():
            raise UserError(f"evaluate: {path} not found; the report shows it. Run {stage} first (dvc repro {stage})")
    return read_model_card(args.model_card, Path(PARAMS_FILE), git_commit()), args.data_card.read_text()


def write_reports(results: dict[str, float], names: tuple[str, str], args, sources: tuple[Provenance, str]) -> None:
    """The bar-chart table, the loss curve and the report, replacing REPORTS as a whole."""
    from lanskap.core.figures import save_loss_curves
    from lanskap.core.io import atomic_dir, write_csv, write_text
    from lanskap.evaluate.report import ReportInputs, base_vs_lora_table, report_html, report_markdown

    curves = read_loss_curves(args.training_log)
    with atomic_dir(args.reports) as staging:
        write_csv(staging / "base_vs_lora.csv", base_vs_lora_table(results))
        if curves:
            save_loss_curves(curves, staging / "loss.png", title="LoRA training loss")
        # Links are relative to the report's final folder, so they work in a browser and on a git host.
        inputs = ReportInputs(
            clip_name=names[0],
            inception_name=names[1],
            loss_curve="loss.png" if curves else None,
            comparison_grid=os.path.relpath(args.comparison, args.reports),
            data_card=os.path.relpath(args.data_card, args.reports),
            data_card_text=sources[1],
            provenance=sources[0],
        )
        markdown = report_markdown(results, inputs)
        write_text(staging / "report.md", markdown)
        images = {inputs.comparison_grid: args.comparison.read_bytes()}
        if curves:
            images["loss.png"] = (staging / "loss.png").read_bytes()
        write_text(staging / "report.html", report_html(markdown, images))


def gap_text(results: dict[str, float], gap: str) -> str:
    """The gap's interval and its two p-values, each named by what it tests."""
    from lanskap.evaluate.paired import MIN_INTERVAL_PROMPTS
    from lanskap.evaluate.report import format_pvalue

    changed = f"changed p: {format_pvalue(results[gap + '_changed_pvalue'])} (swap test: LoRA images differ from base)"
    if gap + "_ci_low" not in results:
        return f"no interval or gap test below {MIN_INTERVAL_PROMPTS} prompts; {changed}"
    return (
        f"95% interval [{results[gap + '_ci_low']:.4f}, {results[gap + '_ci_high']:.4f}] "
        f"(bias-corrected {results[gap + '_bias_corrected']:.4f}), gap p: {format_pvalue(results[gap + '_pvalue'])} "
        f"(t-test: gap = 0); {changed}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--generated", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reports", type=Path, default=Path("reports/evaluate"))
    parser.add_argument("--training-log", type=Path, default=Path("dvclive/train/plots/metrics"))
    parser.add_argument("--comparison", type=Path, default=Path("reports/generate/comparison.png"))
    parser.add_argument("--data-card", type=Path, default=Path("reports/preprocess/data_card.md"))
    parser.add_argument("--model-card", type=Path, default=Path("models/lora/README.md"))
    args = parser.parse_args(argv)
    from lanskap.core.console import quiet_libraries  # here, not above: --help needs none of them
    from lanskap.core.params import load_params

    params = load_params("evaluate")["evaluate"]
    quiet_libraries()

    import numpy as np

    from lanskap.core.io import write_json
    from lanskap.data.manifest import read_table
    from lanskap.data.split import MIN_TEST_PROMPTS
    from lanskap.evaluate.comparisons import (
        FID_STABLE_N,
        check_pairing,
        lora_minus_base,
        scored_weights,
        set_comparisons,
    )
    from lanskap.evaluate.features import BUILTIN_TINY_INCEPTION
    from lanskap.evaluate.traits import run_traits

    test = read_table(args.data / "test.csv", ["path", "caption"])
    generated = read_table(
        args.generated / "index.csv", ["prompt_index", "sample", "caption", "seed", "model", "path", "lora_weights"]
    )
    if len(test) < MIN_TEST_PROMPTS:
        raise UserError(
            f"evaluate: {len(test)} test image(s) in {args.data / 'test.csv'}; the paired statistics "
            f"need at least {MIN_TEST_PROMPTS}: add images or raise split.test_fraction"
        )
    check_pairing(test, generated, str(args.generated / "index.csv"))
    scored = scored_weights(generated, str(args.generated / "index.csv"))
    report_sources = read_report_sources(args)
    extracted = extract_features(test, generated, params, process_state())
    if extracted is None:  # another process of `accelerate launch`: its batches went to the main process
        return
    features, clip_name, inception_name = extracted
    results = {**set_comparisons(features, params), **lora_minus_base(features, params), **scored}
    if params.inception_weights == BUILTIN_TINY_INCEPTION:  # demo only: the stand-in's scene heads
        results |= run_traits(test["caption"].astype(str).tolist(), features.inception, features.prompt)
    results = {key: float(np.round(value, 6)) for key, value in results.items()}
    write_json(args.out, results)
    write_reports(results, (clip_name, inception_name), args, report_sources)

    print(
        f"evaluate ({clip_name}; n test={results['n_test']:.0f}, base={results['n_base']:.0f}, "
        f"lora={results['n_lora']:.0f}):"
    )
    for key in (
        "cmmd_test_vs_text",
        "cmmd_lora_vs_text",
        "cmmd_test_vs_lora",
        "cmmd_test_vs_base",
        "fid_test_vs_lora",
        "fid_test_vs_base",
        "clip_score_lora",
        "clip_score_base",
        "clip_s_lora",
        "clip_s_base",
        "clip_cosine_lora",
        "clip_cosine_base",
    ):
        print(f"  {key:28s} {results[key]:12.4f}")
    for gap in ("cmmd_vs_test_lora_minus_base", "clip_cosine_lora_minus_base"):
        print(f"  {gap:28s} {results[gap]:12.4f}  {gap_text(results, gap)}")
    if not results["fid_comparable"]:
        print(f"  note: FID on fewer than {FID_STABLE_N} images per set is biased and not comparable across n")
    print(f"-> {args.out}; report -> {args.reports / 'report.md'}")


if __name__ == "__main__":
    run_stage(main)
