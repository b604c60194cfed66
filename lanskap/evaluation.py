"""The paper's comparisons and ours, as flat numeric metrics with their n.

Image sets: `test` (held-out reference images), `base` and `lora` (generated, paired by prompt and seed),
and `text` (CLIP embeddings of the test captions). Every set comparison is reported for the base model
too, so a LoRA's effect is read against the model it started from; LoRA-minus-base differences carry a
paired resampling interval over prompts and a permutation p-value.
"""

from dataclasses import dataclass

import numpy as np

from lanskap import metrics
from lanskap.params import EvaluateParams

FID_STABLE_N = 2048  # below this FID's covariance is rank-deficient: values are not comparable across n


@dataclass
class Features:
    """Per-image features; `prompt` gives each generated image's test-caption index."""

    clip: dict[str, np.ndarray]  # set name -> [n, d] L2-normalised CLIP image embeddings (+ "text")
    inception: dict[str, np.ndarray]  # set name -> [n, d] Inception pool features
    prompt: np.ndarray  # [n_generated] prompt index of each row of base/lora (same order in both)


def set_comparisons(f: Features, params: EvaluateParams) -> dict[str, float]:
    out = {}
    for a, b in [("test", "text"), ("lora", "text"), ("base", "text"),
                 ("test", "lora"), ("test", "base"), ("lora", "base")]:
        out[f"cmmd_{a}_vs_{b}"] = metrics.cmmd(f.clip[a], f.clip[b])
        out[f"cmmd_{a}_vs_{b}_unbiased"] = metrics.cmmd(f.clip[a], f.clip[b], unbiased=True)
        if b != "text":
            out[f"fid_{a}_vs_{b}"] = metrics.frechet_distance(f.inception[a], f.inception[b])
            kid_mean, kid_std = metrics.kid(f.inception[a], f.inception[b], num_subsets=params.kid_subsets,
                                            seed=params.seed)
            out[f"kid_{a}_vs_{b}"], out[f"kid_{a}_vs_{b}_std"] = kid_mean, kid_std
    for name in ("test", "base", "lora"):
        out[f"n_{name}"] = len(f.clip[name])
        text = f.clip["text"] if name == "test" else f.clip["text"][f.prompt]
        out[f"clip_score_{name}"] = metrics.clip_score(f.clip[name], text)
    out["fid_comparable"] = float(min(len(f.inception["test"]), len(f.inception["lora"])) >= FID_STABLE_N)
    return out


def paired_gaps(f: Features):
    """LoRA-minus-base statistics over a subset of prompts, as functions of the two image sets."""
    test, text = f.clip["test"], f.clip["text"]

    def cmmd_gap(lora: np.ndarray, base: np.ndarray, prompts: np.ndarray) -> float:
        rows = np.isin(f.prompt, prompts)
        return metrics.cmmd(lora[rows], test[prompts]) - metrics.cmmd(base[rows], test[prompts])

    def clip_score_gap(lora: np.ndarray, base: np.ndarray, prompts: np.ndarray) -> float:
        rows = np.isin(f.prompt, prompts)
        captions = text[f.prompt[rows]]
        return metrics.clip_score(lora[rows], captions) - metrics.clip_score(base[rows], captions)

    return {"cmmd_vs_test": cmmd_gap, "clip_score": clip_score_gap}


def lora_minus_base(f: Features, params: EvaluateParams) -> dict[str, float]:
    """Each gap with a resampling interval over prompts and a permutation p-value (swap LoRA and base
    images of random prompts: under "the LoRA changes nothing" the swap leaves the gap's distribution alone)."""
    lora, base = f.clip["lora"], f.clip["base"]
    n_prompts = len(f.clip["test"])
    every_prompt = np.arange(n_prompts)
    out = {}
    for key, gap in paired_gaps(f).items():
        def swapped_gap(swap: np.ndarray) -> float:
            swap_rows = swap[f.prompt][:, None]
            return gap(np.where(swap_rows, base, lora), np.where(swap_rows, lora, base), every_prompt)

        low, high = metrics.paired_resampling_interval(lambda prompts: gap(lora, base, prompts), n_prompts,
                                                       params.resamples, seed=params.seed)
        name = f"{key}_lora_minus_base"
        out[name] = gap(lora, base, every_prompt)
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high
        out[f"{name}_pvalue"] = metrics.permutation_pvalue(swapped_gap, n_prompts, params.permutations, seed=params.seed)
    return out
