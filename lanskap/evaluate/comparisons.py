"""The paper's comparisons and ours, as flat numeric metrics with their n.

Image sets: `test` (held-out reference images), `base` and `lora` (generated, paired by prompt and seed),
and `text` (CLIP embeddings of the test captions). Every set comparison is reported for the base model
too, so a LoRA's effect is read against the model it started from; LoRA-minus-base differences carry a
jackknife interval over prompts, the t-test of "gap = 0" that inverts it, and the swap test of "the LoRA
changed nothing" (lanskap.evaluate.paired says why these differ).
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lanskap.core.errors import UserError
from lanskap.core.params import FID_STABLE_N, EvaluateParams
from lanskap.evaluate import kid, metrics, paired


@dataclass
class Features:
    """Per-image features; `prompt` gives each generated image's test-caption index."""

    clip: dict[str, np.ndarray]  # set name -> [n, d] L2-normalised CLIP image embeddings (+ "text")
    inception: dict[str, np.ndarray]  # set name -> [n, d] Inception pool features
    prompt: np.ndarray  # [n_generated] prompt index of each row of base/lora (same order in both)


def set_comparisons(f: Features, params: EvaluateParams) -> dict[str, float]:
    out = {}
    units = {"test": np.arange(len(f.clip["test"])), "base": f.prompt, "lora": f.prompt}
    self_sums = {name: metrics.rbf_self_sums(embeddings) for name, embeddings in f.clip.items()}  # once per set
    for a, b in [
        ("test", "text"),
        ("lora", "text"),
        ("base", "text"),
        ("test", "lora"),
        ("test", "base"),
        ("lora", "base"),
    ]:
        out[f"cmmd_{a}_vs_{b}"], out[f"cmmd_{a}_vs_{b}_unbiased"] = metrics.cmmd_estimates(
            f.clip[a], f.clip[b], self_sums=(self_sums[a], self_sums[b])
        )
        if b != "text":
            out[f"fid_{a}_vs_{b}"] = metrics.frechet_distance(f.inception[a], f.inception[b])
            kid_mean, kid_se = kid.kid(
                f.inception[a],
                f.inception[b],
                num_subsets=params.kid_subsets,
                seed=params.seed,
                units=(units[a], units[b]),
            )
            out[f"kid_{a}_vs_{b}"], out[f"kid_{a}_vs_{b}_se"] = kid_mean, kid_se
    for name in ("test", "base", "lora"):
        out[f"n_{name}"] = len(f.clip[name])
        text = f.clip["text"] if name == "test" else f.clip["text"][f.prompt]
        out[f"clip_score_{name}"] = metrics.clip_score(f.clip[name], text)  # clamped: descriptive only
        out[f"clip_s_{name}"] = metrics.clip_s(f.clip[name], text)  # clamped per image: descriptive only
        out[f"clip_cosine_{name}"] = float(np.mean(metrics.clip_cosines(f.clip[name], text)))
    out["fid_comparable"] = float(min(len(f.inception["test"]), len(f.inception["lora"])) >= FID_STABLE_N)
    return out


def lora_minus_base(f: Features, params: EvaluateParams) -> dict[str, float]:
    """Each gap (`<gap>`: CMMD to the test images; the unclamped mean CLIP cosine to the captions, which, unlike
    a clamped CLIP score, can fall below the base's) with

    - `<gap>_changed_pvalue`: the swap test of "the LoRA changed nothing" (swap the LoRA and base images of
      random prompts); small also when the LoRA changes the images without changing the gap, and
    - from MIN_INTERVAL_PROMPTS prompts on, `<gap>_bias_corrected`, `_ci_low`, `_ci_high`: the jackknife
      95 % interval, and `<gap>_pvalue`: the t-test of "gap = 0" that inverts it (p < 0.05 exactly when the
      interval excludes 0). See lanskap.evaluate.paired."""
    lora, base = f.clip["lora"], f.clip["base"]
    gaps = {
        "cmmd_vs_test": paired.cmmd_gap(lora, base, f.clip["test"], f.prompt),
        "clip_cosine": paired.clip_cosine_gap(lora, base, f.clip["text"], f.prompt),
    }
    n_prompts = len(f.clip["test"])
    out = {}
    for key, gap in gaps.items():
        name = f"{key}_lora_minus_base"
        out[name] = gap.value
        if n_prompts >= paired.MIN_INTERVAL_PROMPTS:
            test = paired.jackknife_t(gap.value, gap.leave_one_out)
            for suffix, value in (("bias_corrected", test.corrected), ("ci_low", test.low), ("ci_high", test.high)):
                out[f"{name}_{suffix}"] = value
            out[f"{name}_pvalue"] = test.pvalue
        out[f"{name}_changed_pvalue"] = paired.permutation_pvalue(
            gap.swapped, n_prompts, params.permutations, seed=params.seed
        )
    return out


def scored_weights(generated: pd.DataFrame, source: str) -> dict[str, float]:
    """Which LoRA weights generate scored (its lora_weights column, from generate.lora_weights), as a flat metric:
    ema_weights_scored is 1.0 for the EMA weights, 0.0 for the raw ones."""
    weights = set(generated.loc[generated["model"] == "lora", "lora_weights"])
    if len(weights) != 1 or not weights <= {"raw", "ema"}:
        raise UserError(
            f"evaluate: {source} has LoRA images of lora_weights {sorted(map(str, weights))}, expected "
            "one of raw or ema. Rerun generate (`dvc repro generate`)."
        )
    return {"ema_weights_scored": float(weights == {"ema"})}


def check_pairing(test: pd.DataFrame, generated: pd.DataFrame, source: str) -> None:
    """Refuse generated images that do not pair with the test set: every test caption (prompt i: row i of
    test.csv) needs the same samples from base and LoRA, with the same caption and seed in both."""

    def refuse(problem: str):
        raise UserError(
            f"evaluate: {source} does not pair with the test set: {problem}. Rerun generate "
            "(`dvc repro generate`) on the current test set."
        )

    if set(generated["model"]) != {"base", "lora"}:
        refuse(f"models {sorted(set(generated['model']))}, expected base and lora")
    keyed = {
        model: rows.set_index(["prompt_index", "sample"]).sort_index() for model, rows in generated.groupby("model")
    }
    base, lora = keyed["base"], keyed["lora"]
    if not base.index.is_unique or not base.index.equals(lora.index):
        refuse("base and LoRA images are not one per (prompt_index, sample) each")
    for column in ("caption", "seed"):
        differs = base[column].ne(lora[column])
        if differs.any():
            prompt, sample = differs[differs].index[0]
            refuse(f"{differs.sum()} pair(s) differ in {column}, first prompt {prompt} sample {sample}")
    samples = base.groupby(level="prompt_index").size()
    if not samples.index.equals(pd.RangeIndex(len(test))) or samples.nunique() != 1:
        refuse(f"expected the same number of samples for each of the {len(test)} test captions")
    captions = base["caption"].groupby(level="prompt_index").first()
    mismatched = captions.ne(test["caption"].astype(str).to_numpy())
    if mismatched.any():
        refuse(f"{mismatched.sum()} caption(s) differ from test.csv's, first at prompt {mismatched.idxmax()}")
