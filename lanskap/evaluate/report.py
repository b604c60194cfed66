"""The evaluation report a reviewer opens: which run it describes (commit, preset, base model, LoRA, data),
metrics with their n, LoRA-minus-base gaps with intervals and both tests, what the flags and sample sizes allow,
the loss curve, the comparison grid, the data card, and the feature extractors used.

Pure functions from the flat metrics dict (as `lanskap.evaluate.comparisons` produces it), the run's provenance and the
texts and relative paths the evaluate stage passes in; the stage writes the results. Nothing here reads files or
loads models. The Markdown links its figures by relative path (for a git host); the HTML carries them inline, one
file that opens anywhere, offline.
"""

import base64
import re
from dataclasses import dataclass

import pandas as pd

from lanskap.core.provenance import Provenance
from lanskap.evaluate.comparisons import FID_STABLE_N
from lanskap.evaluate.metrics import CLIP_S_WEIGHT
from lanskap.evaluate.paired import MIN_INTERVAL_PROMPTS

# Bar chart rows: metric name -> (base model's key, LoRA's key); both against the same reference.
BASE_VS_LORA_KEYS = {
    "cmmd_vs_test": ("cmmd_test_vs_base", "cmmd_test_vs_lora"),
    "cmmd_vs_text": ("cmmd_base_vs_text", "cmmd_lora_vs_text"),
    "fid_vs_test": ("fid_test_vs_base", "fid_test_vs_lora"),
    "kid_vs_test": ("kid_test_vs_base", "kid_test_vs_lora"),
    "clip_score": ("clip_score_base", "clip_score_lora"),
    "clip_s": ("clip_s_base", "clip_s_lora"),
    "clip_cosine": ("clip_cosine_base", "clip_cosine_lora"),
}
HIGHER_IS_BETTER = ("clip_",)  # key prefixes; lower is better for the rest (distances)
GAP_SUFFIX = "_lora_minus_base"
IMAGE_SETS = ("test", "base", "lora", "text")  # "text": the test captions, one per test image
STAND_IN_PREFIX = "builtin:"
FID_CAVEAT = (
    f"FID on fewer than {FID_STABLE_N} images per set is biased (the covariance estimate is "
    "rank-deficient): compare FID values only between runs with the same n."
)


@dataclass(frozen=True)
class ReportInputs:
    """What the report names besides the metrics; paths are relative to the report's folder."""

    clip_name: str
    inception_name: str
    loss_curve: str | None  # PNG, or None when the run has no training log
    comparison_grid: str
    data_card: str
    data_card_text: str  # the data card's Markdown, shown inline
    provenance: Provenance


def base_vs_lora_table(metrics: dict[str, float]) -> pd.DataFrame:
    """Long table (metric, model, value) for `dvc plots`: one base and one LoRA row per metric, drawn one panel per
    metric by `.dvc/plots/base_vs_lora.json` (KID runs to thousands, CMMD to about 10: one axis would hide CMMD)."""
    rows = [
        {"metric": metric, "model": model, "value": metrics[key]}
        for metric, keys in BASE_VS_LORA_KEYS.items()
        for model, key in zip(("base", "lora"), keys)
    ]
    return pd.DataFrame(rows, columns=["metric", "model", "value"])


def sample_size(key: str, metrics: dict[str, float]) -> str:
    """The n behind one metric key: images (or captions) per compared set in the key's order, images scored
    against their own captions for a CLIP score, prompts for a paired gap."""
    if key.startswith(("n_", "traits_")):  # traits: the report's traits table gives its prompts
        return ""
    if GAP_SUFFIX in key:
        return f"{metrics['n_test']:.0f} prompts"
    sets = [name for name in key.split("_") if name in IMAGE_SETS]
    sizes = [metrics["n_test" if name == "text" else f"n_{name}"] for name in sets]
    return " / ".join(f"{size:.0f}" for size in sizes)


def format_value(value: float) -> str:
    return f"{value:.6g}"


def format_pvalue(pvalue: float) -> str:
    """Three decimals; "< 0.001" below, where three decimals would print an impossible 0.000."""
    return "< 0.001" if pvalue < 0.001 else f"{pvalue:.3f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def interval_cells(key: str, metrics: dict[str, float]) -> list[str]:
    """The gap's bias-corrected value, 95% interval and the t-test's p-value, or why there are none."""
    if key + "_ci_low" not in metrics:
        return ["", f"none below {MIN_INTERVAL_PROMPTS} prompts", "none"]
    interval = f"[{format_value(metrics[key + '_ci_low'])}, {format_value(metrics[key + '_ci_high'])}]"
    return [format_value(metrics[key + "_bias_corrected"]), interval, format_pvalue(metrics[key + "_pvalue"])]


def gaps_section(metrics: dict[str, float]) -> str:
    """Each LoRA-minus-base gap with its jackknife interval, the t-test of "gap = 0" and the swap test."""
    rows = [
        [
            f"`{key}`",
            format_value(metrics[key]),
            *interval_cells(key, metrics),
            format_pvalue(metrics[key + "_changed_pvalue"]),
            sample_size(key, metrics),
        ]
        for key in sorted(k for k in metrics if k.endswith(GAP_SUFFIX))
    ]
    header = ["gap", "LoRA minus base", "bias-corrected", "95% interval", "gap p", "changed p", "n"]
    return (
        "## LoRA minus base\n\nPaired by prompt and seed. `cmmd_vs_test`: CMMD to the test images (lower is "
        "closer); `clip_cosine`: the mean CLIP cosine of each image to its caption, unclamped, so a LoRA that "
        "moves its images away from their captions scores below 0 even where the clamped CLIP scores of both "
        "models read 0.\n\n"
        "- **95% interval**: jackknife over prompts (leave one out), Student t, for the gap with unlimited "
        "prompts; it is centred on the bias-corrected gap, which removes the small-n offset of the biased CMMD.\n"
        '- **gap p** (`_pvalue`): the t-test of "the gap is 0" that this interval inverts (bias-corrected gap / '
        "jackknife standard error, n - 1 degrees of freedom, two-sided): below 0.05 exactly when the interval "
        "excludes 0.\n"
        '- **changed p** (`_changed_pvalue`): the swap test of "the LoRA changed nothing": the LoRA and base '
        "images of random prompts exchanged (exact over all swaps when they are few). It is small for any change "
        "the gap statistic sees, also one that leaves the gap at 0, so it is no evidence that the gap differs "
        "from 0.\n\n"
        f"Below {MIN_INTERVAL_PROMPTS} prompts there is no interval and no gap p: there even the exact swap test "
        "cannot reach p < 0.05.\n\n" + markdown_table(header, rows)
    )


def base_vs_lora_section(metrics: dict[str, float]) -> str:
    # Base and LoRA images are paired one to one, so the LoRA key's n is the base key's too.
    rows = [
        [
            metric,
            format_value(metrics[base]),
            format_value(metrics[lora]),
            sample_size(lora, metrics),
            f"`{base}`, `{lora}`",
        ]
        for metric, (base, lora) in BASE_VS_LORA_KEYS.items()
    ]
    table = markdown_table(["metric", "base", "LoRA", "n per set", "keys"], rows)
    return (
        "## Base vs LoRA\n\nLower is better for CMMD, FID and KID; higher for the CLIP numbers. n per set: the "
        "sizes of the two compared sets, in the order the key names them. CLIP, each image against its own "
        "caption: `clip_score` is torchmetrics' (100 x the mean cosine, clamped at 0: the paper's convention), "
        f"`clip_s` CLIP-S (Hessel et al. 2021: w x max(cos, 0) per image, averaged; here w = "
        f"{CLIP_S_WEIGHT:g}, clip_score's scale; the paper's w = 2.5 gives 1/40 of it), `clip_cosine` the mean "
        "cosine, unclamped. A clamped score reads 0 for a set whose images sit on the far side of their "
        "captions, whatever they show: compare models on `clip_cosine`.\n\n" + table
    )


def every_metric_section(metrics: dict[str, float]) -> str:
    rows = [[f"`{key}`", format_value(value), sample_size(key, metrics)] for key, value in sorted(metrics.items())]
    return "## Every metric (`metrics/eval.json`)\n\n" + markdown_table(["key", "value", "n"], rows)


def commit_cell(provenance: Provenance) -> str:
    commit = provenance.commit
    if commit is None:
        return "unknown: evaluate did not run in a git checkout"
    modified = " **with uncommitted changes to lanskap/, stages/ or dvc.yaml**" if commit.code_modified else ""
    return f"`{commit.sha[:12]}` of {commit.date}{modified}"


def provenance_section(provenance: Provenance) -> str:
    """Which run this is: the code, the preset, and what the LoRA's model card says it was trained from."""
    lora, train = provenance.params["lora"], provenance.params["train"]
    variants = [name for name, on in (("DoRA", lora["use_dora"]), ("rsLoRA", lora["use_rslora"])) if on]
    targets = "UNet " + ", ".join(f"`{module}`" for module in lora["target_modules"])
    if provenance.adapters != "UNet":
        targets += "; text encoder " + ", ".join(f"`{module}`" for module in lora["text_encoder_target_modules"])
    rows = [
        ["commit", commit_cell(provenance)],
        ["preset", f"`{provenance.preset}`" if provenance.preset else "none recorded in params.yaml"],
        ["base model", f"`{provenance.base_model}` revision `{provenance.base_revision}`"],
        [
            "LoRA",
            f"rank {lora['rank']}, alpha {format_value(lora['alpha'])}"
            + "".join(f", {v}" for v in variants)
            + f"; on {targets}",
        ],
        [
            "training",
            f"{train['steps']} steps, batch {train['batch_size']} x {train['gradient_accumulation_steps']} "
            f"accumulated, learning rate {format_value(train['learning_rate'])}, seed {train['seed']}",
        ],
        ["training data", f"sha256 `{provenance.data_sha256}` (of the training table, processed/train.csv)"],
    ]
    return (
        "## Run\n\n" + "\n".join(f"- **{name}**: {value}" for name, value in rows) + "\n\nThe date is the "
        "commit's: the report holds no clock time, so the same commit and inputs give the same file. Every "
        "input's hash is in `dvc.lock`."
    )


def gap_verdict(key: str, metrics: dict[str, float]) -> str:
    """What the gap's interval allows one to say."""
    if key + "_ci_low" not in metrics:
        return f"no interval at {metrics['n_test']:.0f} prompts: a description of these images, not evidence"
    low, high = metrics[key + "_ci_low"], metrics[key + "_ci_high"]
    if low <= 0 <= high:
        return f"interval includes 0: no difference detectable at {metrics['n_test']:.0f} prompts"
    lower = high < 0
    better = lower != key.startswith(HIGHER_IS_BETTER)
    return f"LoRA {'lower' if lower else 'higher'} than base ({'better' if better else 'worse'}); interval excludes 0"


def flags_section(metrics: dict[str, float]) -> str:
    """The flags and sample sizes explained: what each number can carry at this run's n."""
    comparable = metrics["fid_comparable"] == 1
    fid = (
        f"1**: both sets have at least {FID_STABLE_N} images, so FID can be compared with other runs and "
        "published values computed the same way (clean-fid)."
        if comparable
        else f"0**: {FID_CAVEAT} The paper's FID does not apply either."
    )
    verdicts = [[f"`{key}`", gap_verdict(key, metrics)] for key in sorted(k for k in metrics if k.endswith(GAP_SUFFIX))]
    return (
        "## Flags and sample sizes\n\n"
        f"- **`fid_comparable` = {fid}\n"
        f"- **n** is the number of images (or prompts) behind a number. CMMD, FID and KID are set statistics: "
        "with few images they move from sample to sample and carry a bias that depends on n, so two runs "
        "compare only at the same n. A LoRA-minus-base gap carries weight only when its 95% interval excludes "
        f"0 (gap p < 0.05); below {MIN_INTERVAL_PROMPTS} prompts there is neither, and no p-value below 0.05 is "
        "possible.\n\n" + markdown_table(["gap", "at this n"], verdicts)
    )


def trait_cells(trait: str, metrics: dict[str, float]) -> list[str]:
    key = f"traits_{trait}"

    def cell(suffix: str) -> str:
        return format_value(metrics[key + suffix]) if key + suffix in metrics else "-"

    calibration = [cell(suffix) for suffix in ("_share_test", "_false_positive_test", "_detector_accuracy")]
    unasked = [cell("_false_positive_base"), cell("_false_positive_lora")]
    if key + "_share_gap" not in metrics:
        return [trait, "fewer than 2", *calibration, "", "", *unasked, ""]
    shares = [format_value(metrics[f"{key}_share_{name}"]) for name in ("base", "lora")]
    gap = f"{format_value(metrics[key + '_share_gap'])} [{format_value(metrics[key + '_share_gap_ci_low'])}, "
    gap += f"{format_value(metrics[key + '_share_gap_ci_high'])}]"
    return [trait, f"{metrics[key + '_prompts']:.0f}", *calibration, *shares, *unasked, gap]


def traits_section(metrics: dict[str, float]) -> str | None:
    """The demo's trait shares beside the detector's calibration (lanskap.evaluate.traits); None without them."""
    suffix = "_detector_accuracy"  # one per trait, in the order evaluate wrote them (the heads' order)
    keys = [key for key in metrics if key.startswith("traits_") and key.endswith(suffix)]
    traits = [key[len("traits_") : -len(suffix)] for key in keys]
    if not traits:
        return None
    header = [
        "trait",
        "prompts asking",
        "test",
        "test, not asked",
        "accuracy (test)",
        "base",
        "LoRA",
        "base, not asked",
        "LoRA, not asked",
        "LoRA - base [95%]",
    ]
    return (
        "## Traits (demo diagnostic)\n\nWhat the built-in Inception stand-in's scene-classifier heads find, for "
        "each trait a prompt asks for (read from its procedural caption): the share of test, base and LoRA images "
        "in which the detected class is the asked one, over the prompts that ask. Calibration on the reference "
        "test images: the share where the trait is drawn, the share where it is found though not drawn (false "
        "positives; '-' where every caption asks), and the accuracy over all. A detector that finds a trait as often "
        "where it is not drawn tells nothing about it; nor does a model whose images show it as often where their "
        "prompt does not ask (the 'not asked' columns: the detector may be answering to the look of its images). "
        "Interval: paired by prompt, adjusted Wald (Bonett-Price) with "
        "Student t (`lanskap/evaluate/traits.py`).\n\n"
        + markdown_table(header, [trait_cells(trait, metrics) for trait in traits])
    )


def data_card_section(text: str, source: str) -> str:
    """The data card inline, its headings moved under this section's."""
    body = re.sub(r"^# .*\n+", "", text, count=1)  # its title: this section's heading says it
    body = re.sub(r"^(#+) ", lambda match: "#" * (len(match.group(1)) + 1) + " ", body, flags=re.MULTILINE)
    return f"## Data card\n\nFrom `{source}`.\n\n{body.strip()}"


def extractor_line(role: str, name: str) -> str:
    flag = (
        (
            " (stand-in trained on procedural images, see its card in lanskap/assets/builtin/: the numbers compare "
            "runs of this demo, not real-world CMMD or FID)"
        )
        if name.startswith(STAND_IN_PREFIX)
        else ""
    )
    return f"- {role}: `{name}`{flag}"


def report_markdown(metrics: dict[str, float], inputs: ReportInputs) -> str:
    """The whole report as Markdown; the same metrics and inputs always give the same text."""
    loss = (
        f"![training and validation loss]({inputs.loss_curve})" if inputs.loss_curve else "No training log was found."
    )
    sections = [
        "# Evaluation report",
        provenance_section(inputs.provenance),
        f"Images: {metrics['n_test']:.0f} test, {metrics['n_base']:.0f} base, {metrics['n_lora']:.0f} LoRA (from "
        + ("the EMA weights, models/lora/ema/)." if metrics["ema_weights_scored"] else "the trained weights)."),
        "Feature extractors:\n\n"
        + extractor_line("CLIP (CMMD, CLIP score)", inputs.clip_name)
        + "\n"
        + extractor_line("Inception (FID, KID)", inputs.inception_name),
        gaps_section(metrics),
        base_vs_lora_section(metrics),
        flags_section(metrics),
        *filter(None, [traits_section(metrics)]),
        "## Training loss\n\n" + loss,
        "## Comparison grid\n\nThe first test captions, each with its reference image and the base and LoRA "
        f"images from the same seed (`{inputs.comparison_grid}`).\n\n"
        f"![prompt, reference, base and LoRA per test caption]({inputs.comparison_grid})",
        data_card_section(inputs.data_card_text, inputs.data_card),
        every_metric_section(metrics),
    ]
    return "\n\n".join(sections) + "\n"


def inline_images(html: str, images: dict[str, bytes]) -> str:
    """Each `<img src="path">` whose path is in `images` (PNG bytes) carried inline as a data URI."""
    for path, data in sorted(images.items()):
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        html = html.replace(f'src="{path}"', f'src="{uri}"')
    return html


def report_html(markdown_text: str, images: dict[str, bytes], title: str = "Evaluation report") -> str:
    """One self-contained page from the Markdown report: the images in `images` (by their path in the Markdown)
    inline, no script, no external resource."""
    from markdown_it import MarkdownIt

    body = inline_images(MarkdownIt("commonmark").enable("table").render(markdown_text), images)
    style = (
        "body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em;line-height:1.4}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
        "text-align:left;vertical-align:top}code{font-size:0.9em;overflow-wrap:anywhere}"
        "blockquote{background:#fff4d6;margin:0;padding:4px 12px}img{max-width:100%}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{style}</style></head>\n<body>\n{body}</body></html>\n"
    )
