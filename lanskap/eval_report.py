"""The evaluation report a reviewer opens: metrics with their n, LoRA-minus-base gaps with intervals, the
loss curve, links to the comparison grid and the data card, and the feature extractors used.

Pure functions from the flat metrics dict (as `lanskap.evaluation` produces it) and relative paths to
text and tables; the evaluate stage writes them. Nothing here reads files or loads models.
"""

from dataclasses import dataclass

import pandas as pd

from lanskap.evaluation import FID_STABLE_N
from lanskap.paired import MIN_INTERVAL_PROMPTS

# Bar chart rows: metric name -> (base model's key, LoRA's key); both against the same reference.
BASE_VS_LORA_KEYS = {
    "cmmd_vs_test": ("cmmd_test_vs_base", "cmmd_test_vs_lora"),
    "cmmd_vs_text": ("cmmd_base_vs_text", "cmmd_lora_vs_text"),
    "fid_vs_test": ("fid_test_vs_base", "fid_test_vs_lora"),
    "kid_vs_test": ("kid_test_vs_base", "kid_test_vs_lora"),
    "clip_score": ("clip_score_base", "clip_score_lora"),
}
GAP_SUFFIX = "_lora_minus_base"
IMAGE_SETS = ("test", "base", "lora", "text")  # "text": the test captions, one per test image
STAND_IN_PREFIX = "builtin:"
FID_CAVEAT = (f"FID on fewer than {FID_STABLE_N} images per set is biased (the covariance estimate is "
              "rank-deficient): compare FID values only between runs with the same n.")


@dataclass(frozen=True)
class ReportInputs:
    """What the report names besides the metrics; paths are relative to the report's folder."""

    clip_name: str
    inception_name: str
    loss_curve: str | None  # PNG, or None when the run has no training log
    comparison_grid: str
    data_card: str


def base_vs_lora_table(metrics: dict[str, float]) -> pd.DataFrame:
    """Long table (metric, model, value, bar) for `dvc plots`: one base and one LoRA row per metric.

    `bar` ("metric model") is the chart's category axis: DVC's bar templates separate bars only by
    revision, so two rows sharing a category would be drawn on top of each other.
    """
    rows = [{"metric": metric, "model": model, "value": metrics[key], "bar": f"{metric} {model}"}
            for metric, keys in BASE_VS_LORA_KEYS.items() for model, key in zip(("base", "lora"), keys)]
    return pd.DataFrame(rows, columns=["metric", "model", "value", "bar"])


def sample_size(key: str, metrics: dict[str, float]) -> str:
    """The n behind one metric key: images (or captions) per compared set in the key's order, images scored
    against their own captions for a CLIP score, prompts for a paired gap."""
    if key.startswith("n_"):
        return ""
    if GAP_SUFFIX in key:
        return f"{metrics['n_test']:.0f} prompts"
    sets = [name for name in key.split("_") if name in IMAGE_SETS]
    sizes = [metrics["n_test" if name == "text" else f"n_{name}"] for name in sets]
    return " / ".join(f"{size:.0f}" for size in sizes)


def format_value(value: float) -> str:
    return f"{value:.6g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def interval_cells(key: str, metrics: dict[str, float]) -> list[str]:
    """The gap's bias-corrected value and 95% interval, or why there is none."""
    if key + "_ci_low" not in metrics:
        return ["", f"none below {MIN_INTERVAL_PROMPTS} prompts"]
    interval = f"[{format_value(metrics[key + '_ci_low'])}, {format_value(metrics[key + '_ci_high'])}]"
    return [format_value(metrics[key + "_bias_corrected"]), interval]


def gaps_section(metrics: dict[str, float]) -> str:
    """Each LoRA-minus-base gap with its jackknife interval and permutation p-value."""
    rows = [[f"`{key}`", format_value(metrics[key]), *interval_cells(key, metrics),
             f"{metrics[key + '_pvalue']:.3f}", sample_size(key, metrics)]
            for key in sorted(k for k in metrics if k.endswith(GAP_SUFFIX))]
    table = markdown_table(["gap", "LoRA minus base", "bias-corrected", "95% interval", "p-value", "n"], rows)
    return ("## LoRA minus base\n\nPaired by prompt and seed. Interval: jackknife over prompts (leave one out), "
            "Student t, for the gap with unlimited prompts; it is centred on the bias-corrected gap, which removes "
            "the small-n offset of the biased CMMD. None is given below "
            f"{MIN_INTERVAL_PROMPTS} prompts, where the permutation test cannot reach p < 0.05. p-value: "
            "swapping a prompt's LoRA and base images (exact over all swaps when they are few).\n\n" + table)


def base_vs_lora_section(metrics: dict[str, float]) -> str:
    # Base and LoRA images are paired one to one, so the LoRA key's n is the base key's too.
    rows = [[metric, format_value(metrics[base]), format_value(metrics[lora]), sample_size(lora, metrics),
             f"`{base}`, `{lora}`"] for metric, (base, lora) in BASE_VS_LORA_KEYS.items()]
    table = markdown_table(["metric", "base", "LoRA", "n per set", "keys"], rows)
    return ("## Base vs LoRA\n\nLower is better for CMMD, FID and KID; higher for CLIP score. n per set: the "
            "sizes of the two compared sets, in the order the key names them.\n\n" + table)


def every_metric_section(metrics: dict[str, float]) -> str:
    rows = [[f"`{key}`", format_value(value), sample_size(key, metrics)] for key, value in sorted(metrics.items())]
    return "## Every metric (`metrics/eval.json`)\n\n" + markdown_table(["key", "value", "n"], rows)


def extractor_line(role: str, name: str) -> str:
    flag = " **stand-in with random weights: the numbers carry no meaning**" if name.startswith(STAND_IN_PREFIX) else ""
    return f"- {role}: `{name}`{flag}"


def report_markdown(metrics: dict[str, float], inputs: ReportInputs) -> str:
    """The whole report as Markdown; the same metrics and inputs always give the same text."""
    comparable = "" if not metrics["fid_comparable"] else " (this run has enough images)"
    loss = (f"![training and validation loss]({inputs.loss_curve})" if inputs.loss_curve
            else "No training log was found.")
    sections = [
        "# Evaluation report",
        f"Images: {metrics['n_test']:.0f} test, {metrics['n_base']:.0f} base, {metrics['n_lora']:.0f} LoRA.",
        "Feature extractors:\n\n" + extractor_line("CLIP (CMMD, CLIP score)", inputs.clip_name) + "\n"
        + extractor_line("Inception (FID, KID)", inputs.inception_name),
        f"> **FID caveat**{comparable}: {FID_CAVEAT}",
        gaps_section(metrics),
        base_vs_lora_section(metrics),
        "## Training loss\n\n" + loss,
        f"## Figures and data\n\n- [comparison grid: reference | base | LoRA]({inputs.comparison_grid})\n"
        f"- [data card]({inputs.data_card})\n\n![reference, base and LoRA per test caption]({inputs.comparison_grid})",
        every_metric_section(metrics),
    ]
    return "\n\n".join(sections) + "\n"


def report_html(markdown_text: str, title: str = "Evaluation report") -> str:
    """A standalone page from the Markdown report; images and links keep their relative paths."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown_text)
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
             "blockquote{background:#fff4d6;margin:0;padding:4px 12px}img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{style}</style></head>\n<body>\n{body}</body></html>\n")
