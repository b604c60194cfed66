"""The evaluation report and the base-vs-LoRA chart table, from a fake metrics dict (no models loaded)."""

import numpy as np
import pandas as pd
import pytest

from lanskap.eval_report import (BASE_VS_LORA_KEYS, FID_CAVEAT, ReportInputs, base_vs_lora_table, report_html,
                                 report_markdown)
from lanskap.evaluation import Features, lora_minus_base, set_comparisons
from lanskap.params import EvaluateParams
from lanskap.report import save_loss_curves

INPUTS = ReportInputs(clip_name="builtin:tiny-clip (random weights)",
                      inception_name="clean-fid inception-2015-12-05.pt (/w/inception-2015-12-05.pt)",
                      loss_curve="loss.png", comparison_grid="../generate/comparison.png",
                      data_card="../preprocess/data_card.md")


@pytest.fixture(scope="module")
def metrics() -> dict[str, float]:
    """Every key evaluation.py produces, computed on small random features (numbers, not meaning)."""
    rng = np.random.default_rng(0)
    n_test, dim = 6, 8

    def unit_rows(n: int) -> np.ndarray:
        rows = rng.normal(size=(n, dim))
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    clip = {name: unit_rows(n_test) for name in ("test", "base", "lora", "text")}
    inception = {name: rng.normal(size=(n_test, dim)) for name in ("test", "base", "lora")}
    features = Features(clip, inception, np.arange(n_test))
    params = EvaluateParams(kid_subsets=5, resamples=10, permutations=10)
    results = {**set_comparisons(features, params), **lora_minus_base(features, params)}
    return {key: float(value) for key, value in results.items()}


def test_report_lists_every_metric_key_with_its_n(metrics):
    report = report_markdown(metrics, INPUTS)
    rows = {line.split(" | ")[0].strip("| `"): line for line in report.splitlines() if line.startswith("| `")}
    for key in metrics:
        assert key in rows, key
        if not key.startswith("n_") and key != "fid_comparable":
            assert rows[key].rstrip(" |").endswith(("6", "6 prompts", "6 / 6")), rows[key]
    assert "6 test, 6 base, 6 LoRA" in report


def test_report_gives_each_gap_with_interval_and_pvalue(metrics):
    report = report_markdown(metrics, INPUTS)
    for gap in ("cmmd_vs_test_lora_minus_base", "clip_score_lora_minus_base"):
        row = next(line for line in report.splitlines() if line.startswith(f"| `{gap}` |"))
        low, high = metrics[gap + "_ci_low"], metrics[gap + "_ci_high"]
        assert f"[{low:.6g}, {high:.6g}]" in row and f"{metrics[gap + '_pvalue']:.3f}" in row


def test_report_carries_the_fid_caveat_links_and_flags_stand_ins(metrics):
    report = report_markdown(metrics, INPUTS)
    assert FID_CAVEAT in report and "2048" in FID_CAVEAT
    assert "](../generate/comparison.png)" in report and "](../preprocess/data_card.md)" in report
    assert "![training and validation loss](loss.png)" in report
    clip_line, inception_line = (line for line in report.splitlines() if line.startswith(("- CLIP", "- Inception")))
    assert "stand-in" in clip_line and "stand-in" not in inception_line


def test_report_without_training_log_says_so(metrics):
    report = report_markdown(metrics, ReportInputs(**{**INPUTS.__dict__, "loss_curve": None}))
    assert "No training log" in report and "loss.png" not in report


def test_html_embeds_images_and_links_by_relative_path(metrics):
    html = report_html(report_markdown(metrics, INPUTS))
    assert html.startswith("<!DOCTYPE html>") and "<table>" in html
    assert '<img src="loss.png"' in html and 'href="../generate/comparison.png"' in html


def test_bar_chart_table_has_base_and_lora_rows_per_metric(metrics):
    table = base_vs_lora_table(metrics)
    assert list(table.columns[:3]) == ["metric", "model", "value"]
    for metric, (base_key, lora_key) in BASE_VS_LORA_KEYS.items():
        rows = table[table["metric"] == metric].set_index("model")["value"]
        assert rows.to_dict() == {"base": metrics[base_key], "lora": metrics[lora_key]}
    assert table["bar"].is_unique  # one bar per row in the chart, none drawn over another


def test_report_functions_are_deterministic(metrics, tmp_path):
    assert report_markdown(metrics, INPUTS) == report_markdown(dict(reversed(metrics.items())), INPUTS)
    assert report_html(report_markdown(metrics, INPUTS)) == report_html(report_markdown(metrics, INPUTS))
    pd.testing.assert_frame_equal(base_vs_lora_table(metrics), base_vs_lora_table(metrics))
    curves = {"train": pd.DataFrame({"step": [1, 2, 3], "loss": [0.5, 0.4, 0.45]})}
    save_loss_curves(curves, tmp_path / "a.png")
    save_loss_curves(curves, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_evaluate_stage_writes_table_loss_curve_and_reports_with_relative_links(metrics, tmp_path):
    from argparse import Namespace

    from stages.evaluate import write_reports

    log = tmp_path / "dvclive/train/plots/metrics"
    for split in ("train", "validation"):
        (log / split).mkdir(parents=True)
        (log / split / "loss.tsv").write_text("step\tloss\n2\t0.5\n4\t0.4\n")
    args = Namespace(reports=tmp_path / "reports/evaluate", training_log=log,
                     comparison=tmp_path / "reports/generate/comparison.png",
                     data_card=tmp_path / "reports/preprocess/data_card.md")
    write_reports(metrics, ("builtin:tiny-clip (random weights)", "builtin:tiny-inception (random weights)"), args)
    written = sorted(path.name for path in args.reports.iterdir())
    assert written == ["base_vs_lora.csv", "loss.png", "report.html", "report.md"]
    assert len(pd.read_csv(args.reports / "base_vs_lora.csv")) == 2 * len(BASE_VS_LORA_KEYS)
    report = (args.reports / "report.md").read_text()
    assert "](../generate/comparison.png)" in report and "](../preprocess/data_card.md)" in report
