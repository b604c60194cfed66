"""The evaluation report, its provenance and the base-vs-LoRA chart table, from a fake metrics dict and a model
card written by train_lora's own function (no models loaded)."""

import base64
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lanskap.core.errors import UserError
from lanskap.core.figures import image_grid, save_loss_curves
from lanskap.core.params import conf_group
from lanskap.core.provenance import Commit, git_commit, read_model_card
from lanskap.evaluate.comparisons import FID_STABLE_N, Features, lora_minus_base, set_comparisons
from lanskap.evaluate.report import (
    BASE_VS_LORA_KEYS,
    FID_CAVEAT,
    ReportInputs,
    base_vs_lora_table,
    format_pvalue,
    gap_verdict,
    report_html,
    report_markdown,
)
from stages.train_lora import model_card

DATA_SHA = "ab" * 32
DATA_CARD = "# Data card\n\n- images: 60 (45 train, 15 test)\n\n## Caption length\n\n| words | captions |\n|---|---|\n"
PNG = b"\x89PNG fake bytes"


def write_model_card(folder: Path, **overrides) -> Path:
    """A card as train_lora writes it, for a run with the default params changed by `overrides` (group -> dict)."""
    loaded = {name: conf_group(name, **overrides.get(name, {})) for name in ("model", "lora", "train", "augment")}
    base = {
        "model": loaded["model"].base,
        "revision": "9a023f35ac2b7b91",
        "resolution": 64,
        "prediction_type": "v_prediction",
        "adapters": "UNet",
        "train_images": 45,
        "data_sha256": DATA_SHA,
    }
    summary = {"steps": loaded["train"].steps, "seconds": 1.0}
    files = {"diffusers": folder / "pytorch_lora_weights.safetensors"}
    card = folder / "README.md"
    card.write_text(model_card(base, summary, loaded, files))
    return card


@pytest.fixture(scope="module")
def provenance(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    (folder / "params.yaml").write_text("preset: demo\n")
    card = write_model_card(folder, lora={"rank": 8, "alpha": 16.0}, train={"steps": 150})
    return read_model_card(card, folder / "params.yaml", Commit("0123456789abcdef0123", "2025-12-03", False))


@pytest.fixture(scope="module")
def inputs(provenance) -> ReportInputs:
    return ReportInputs(
        clip_name="builtin:tiny-clip@0123456789abcdef",
        inception_name="clean-fid inception-2015-12-05.pt (/w/inception-2015-12-05.pt)",
        loss_curve="loss.png",
        comparison_grid="../generate/comparison.png",
        data_card="../preprocess/data_card.md",
        data_card_text=DATA_CARD,
        provenance=provenance,
    )


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
    params = conf_group("evaluate", kid_subsets=5, permutations=10)
    results = {**set_comparisons(features, params), **lora_minus_base(features, params), "ema_weights_scored": 0.0}
    return {key: float(value) for key, value in results.items()}


def test_report_lists_every_metric_key_with_its_n(metrics, inputs):
    report = report_markdown(metrics, inputs)
    rows = {line.split(" | ")[0].strip("| `"): line for line in report.splitlines() if line.startswith("| `")}
    for key in metrics:
        assert key in rows, key
        if not key.startswith("n_") and key not in ("fid_comparable", "ema_weights_scored"):  # flags: no n
            assert rows[key].rstrip(" |").endswith(("6", "6 prompts", "6 / 6")), rows[key]
    assert "6 test, 6 base, 6 LoRA" in report


def test_report_gives_each_gap_with_interval_and_both_pvalues_named(metrics, inputs):
    report = report_markdown(metrics, inputs)
    assert "| gap p | changed p |" in report
    assert '**gap p** (`_pvalue`): the t-test of "the gap is 0"' in report
    assert '**changed p** (`_changed_pvalue`): the swap test of "the LoRA changed nothing"' in report
    assert "clip_score_lora_minus_base" not in report  # a clamped gap cannot fail: not reported
    for gap in ("cmmd_vs_test_lora_minus_base", "clip_cosine_lora_minus_base"):
        row = next(line for line in report.splitlines() if line.startswith(f"| `{gap}` |")).split(" | ")
        low, high = metrics[gap + "_ci_low"], metrics[gap + "_ci_high"]
        assert row[3] == f"[{low:.6g}, {high:.6g}]"
        assert row[4:6] == [format_pvalue(metrics[gap + "_pvalue"]), format_pvalue(metrics[gap + "_changed_pvalue"])]


def test_pvalues_print_three_decimals_and_never_zero():
    assert (format_pvalue(0.0172), format_pvalue(0.001), format_pvalue(0.00034)) == ("0.017", "0.001", "< 0.001")


def test_report_without_interval_says_why_there_is_no_gap_pvalue(metrics, inputs):
    gap = "cmmd_vs_test_lora_minus_base"
    fewer = {k: v for k, v in metrics.items() if not k.endswith(("_bias_corrected", "_ci_low", "_ci_high", "_pvalue"))}
    fewer.update({k: v for k, v in metrics.items() if k.endswith("_changed_pvalue")})
    row = next(line for line in report_markdown(fewer, inputs).splitlines() if line.startswith(f"| `{gap}` |"))
    assert "| none below 6 prompts | none |" in row


def test_report_carries_the_fid_caveat_figures_data_card_and_flags_stand_ins(metrics, inputs):
    report = report_markdown(metrics, inputs)
    assert FID_CAVEAT in report and "2048" in FID_CAVEAT and "**`fid_comparable` = 0**:" in report
    assert "](../generate/comparison.png)" in report and "![training and validation loss](loss.png)" in report
    assert "From `../preprocess/data_card.md`" in report and "- images: 60 (45 train, 15 test)" in report
    assert "\n### Caption length\n" in report and "\n# Data card" not in report  # its headings under the report's
    clip_line, inception_line = (line for line in report.splitlines() if line.startswith(("- CLIP", "- Inception")))
    assert "stand-in" in clip_line and "stand-in" not in inception_line


def test_report_names_the_run_it_describes(metrics, inputs):
    run = report_markdown(metrics, inputs).split("## Run")[1].split("\n## ")[0]
    for expected in (
        "`0123456789ab` of 2025-12-03",
        "`demo`",
        "`builtin:tiny-sd2` revision `9a023f35ac2b7b91`",
        "rank 8, alpha 16",
        "`to_q`",
        "150 steps",
        DATA_SHA,
    ):
        assert expected in run, expected
    assert "uncommitted" not in run and "text encoder" not in run


def test_report_says_when_the_commit_is_unknown_or_the_code_differed(metrics, inputs):
    from dataclasses import replace

    unknown = replace(inputs, provenance=replace(inputs.provenance, commit=None))
    assert "unknown: evaluate did not run in a git checkout" in report_markdown(metrics, unknown)
    dirty = replace(inputs, provenance=replace(inputs.provenance, commit=Commit("f" * 40, "2025-12-04", True)))
    assert "`ffffffffffff` of 2025-12-04 **with uncommitted changes" in report_markdown(metrics, dirty)


def test_fid_comparable_is_explained_either_way(metrics, inputs):
    assert f"= 1**: both sets have at least {FID_STABLE_N} images" in report_markdown(
        {**metrics, "fid_comparable": 1.0}, inputs
    )


@pytest.mark.parametrize(
    ("gap", "low", "high", "verdict"),
    [
        ("cmmd_vs_test", -0.2, 0.1, "interval includes 0: no difference detectable at 6 prompts"),
        ("cmmd_vs_test", -0.2, -0.1, "LoRA lower than base (better)"),
        ("cmmd_vs_test", 0.1, 0.2, "LoRA higher than base (worse)"),
        ("clip_cosine", -0.2, -0.1, "LoRA lower than base (worse)"),
        ("clip_cosine", 0.1, 0.2, "LoRA higher than base (better)"),
    ],
)
def test_each_gap_says_what_its_interval_allows(gap, low, high, verdict):
    key = f"{gap}_lora_minus_base"
    assert gap_verdict(key, {"n_test": 6.0, key + "_ci_low": low, key + "_ci_high": high}).startswith(verdict)


def test_a_gap_without_interval_is_called_descriptive():
    assert "no interval at 4 prompts" in gap_verdict("cmmd_vs_test_lora_minus_base", {"n_test": 4.0})


def test_report_without_training_log_says_so(metrics, inputs):
    report = report_markdown(metrics, ReportInputs(**{**inputs.__dict__, "loss_curve": None}))
    assert "No training log" in report and "loss.png" not in report


def test_html_is_one_file_with_its_images_inline(metrics, inputs):
    html = report_html(report_markdown(metrics, inputs), {"loss.png": PNG, "../generate/comparison.png": PNG * 2})
    assert html.startswith("<!DOCTYPE html>") and "<table>" in html
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) == 2 and all(source.startswith("data:image/png;base64,") for source in sources)
    assert sorted(base64.b64decode(source.split(",")[1]) for source in sources) == [PNG, PNG * 2]
    assert "href=" not in html and "http" not in html and "<script" not in html  # nothing to fetch or run


def test_the_model_card_round_trips_and_a_foreign_card_is_refused(tmp_path):
    card = write_model_card(tmp_path, lora={"target_modules": ["to_k", "to_q"]})
    (tmp_path / "params.yaml").write_text("lora: {}\n")
    provenance = read_model_card(card, tmp_path / "params.yaml", None)
    assert provenance.preset is None and provenance.data_sha256 == DATA_SHA
    assert provenance.params["lora"]["target_modules"] == ["to_k", "to_q"]
    card.write_text(card.read_text().split("## Params")[0])
    with pytest.raises(UserError, match="no params block.*dvc repro -f train_lora"):
        read_model_card(card, tmp_path / "params.yaml", None)
    with pytest.raises(UserError, match="not found.*dvc repro train_lora"):
        read_model_card(tmp_path / "missing.md", tmp_path / "params.yaml", None)


def test_git_commit_reads_head_and_uncommitted_code_and_is_none_outside_git(tmp_path):
    assert git_commit(tmp_path) is None
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "lanskap").mkdir()
    (tmp_path / "lanskap/x.py").write_text("a = 1\n")
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "x"]):
        subprocess.run(git + command, cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    commit = git_commit(tmp_path)
    assert commit.sha == head and re.fullmatch(r"\d{4}-\d\d-\d\d", commit.date) and not commit.code_modified
    (tmp_path / "notes.txt").write_text("untracked, not code\n")
    assert not git_commit(tmp_path).code_modified
    (tmp_path / "lanskap/x.py").write_text("a = 2\n")
    assert git_commit(tmp_path).code_modified


def test_grid_shows_each_row_label_in_full_and_wraps_column_labels_in_the_cell():
    from lanskap.core.figures import COLUMN_LABEL_LINES, ROW_LABEL_WIDTH, column_label_lines, label_font, wrap_text

    tile = Image.new("RGB", (64, 64), "red")
    short, long = "a lake", " ".join(["a fantasy landscape under an emerald aurora with floating islands"] * 4)
    grid = image_grid(
        [[tile, tile], [tile, tile]],
        ["reference", "a very long column label"],
        cell=64,
        row_labels=[short, long],
        row_header="prompt",
    )
    assert grid.width == ROW_LABEL_WIDTH + 2 * 64
    assert grid.height > 64 + 2 * 64  # the long label's row grew past the cell
    lines = wrap_text(long, label_font(), ROW_LABEL_WIDTH - 12)
    assert " ".join(lines) == long and len(lines) > 3
    assert all(label_font().getlength(line) <= ROW_LABEL_WIDTH - 12 for line in lines)
    plain = image_grid([[tile, tile]], ["reference", "base"], cell=64)
    assert plain.size == (128, plain.height) and plain.height < 64 + 40  # no text column without row labels
    assert " ".join(column_label_lines("drawn (held out)", label_font(), 84)) == "drawn (held out)"
    cut = column_label_lines(long, label_font(), 84)
    assert len(cut) == COLUMN_LABEL_LINES and cut[-1].endswith("…") and label_font().getlength(cut[-1]) <= 84
    tall = image_grid([[tile]], [long], cell=96)
    assert tall.height > image_grid([[tile]], ["base"], cell=96).height  # the header grew for the wrapped label


def test_bar_chart_table_has_base_and_lora_rows_per_metric(metrics):
    table = base_vs_lora_table(metrics)
    assert list(table.columns) == ["metric", "model", "value"]
    for metric, (base_key, lora_key) in BASE_VS_LORA_KEYS.items():
        rows = table[table["metric"] == metric].set_index("model")["value"]
        assert rows.to_dict() == {"base": metrics[base_key], "lora": metrics[lora_key]}
    assert not table.duplicated(["metric", "model"]).any()  # one bar per panel and model, none drawn over another


def test_report_functions_are_deterministic(metrics, inputs, tmp_path):
    assert report_markdown(metrics, inputs) == report_markdown(dict(reversed(metrics.items())), inputs)
    images = {"loss.png": PNG}
    markdown = report_markdown(metrics, inputs)
    assert report_html(markdown, images) == report_html(markdown, images)
    pd.testing.assert_frame_equal(base_vs_lora_table(metrics), base_vs_lora_table(metrics))
    curves = {"train": pd.DataFrame({"step": [1, 2, 3], "loss": [0.5, 0.4, 0.45]})}
    save_loss_curves(curves, tmp_path / "a.png")
    save_loss_curves(curves, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_evaluate_stage_writes_table_loss_curve_and_reports(metrics, tmp_path, monkeypatch):
    from argparse import Namespace

    from stages.evaluate import read_report_sources, write_reports

    monkeypatch.chdir(tmp_path)  # params.yaml and the git checkout (none here) are read from the project root
    Path("params.yaml").write_text("preset: demo\n")
    log = tmp_path / "dvclive/train/plots/metrics"
    for split in ("train", "validation"):
        (log / split).mkdir(parents=True)
        (log / split / "loss.tsv").write_text("step\tloss\n2\t0.5\n4\t0.4\n")
    args = Namespace(
        reports=tmp_path / "reports/evaluate",
        training_log=log,
        comparison=tmp_path / "reports/generate/comparison.png",
        data_card=tmp_path / "reports/preprocess/data_card.md",
        model_card=tmp_path / "README.md",
    )
    args.comparison.parent.mkdir(parents=True)
    with pytest.raises(UserError, match="comparison.png not found.*dvc repro generate"):
        read_report_sources(args)
    Image.new("RGB", (8, 8)).save(args.comparison)
    args.data_card.parent.mkdir(parents=True)
    args.data_card.write_text(DATA_CARD)
    write_model_card(tmp_path)
    write_reports(
        metrics,
        ("builtin:tiny-clip@0123456789abcdef", "builtin:tiny-inception@0123456789abcdef"),
        args,
        read_report_sources(args),
    )
    written = sorted(path.name for path in args.reports.iterdir())
    assert written == ["base_vs_lora.csv", "loss.png", "report.html", "report.md"]
    assert len(pd.read_csv(args.reports / "base_vs_lora.csv")) == 2 * len(BASE_VS_LORA_KEYS)
    assert "](../generate/comparison.png)" in (args.reports / "report.md").read_text()
    html = (args.reports / "report.html").read_text()
    inline = [base64.b64decode(uri) for uri in re.findall(r'src="data:image/png;base64,([^"]*)"', html)]
    assert sorted(inline) == sorted([args.comparison.read_bytes(), (args.reports / "loss.png").read_bytes()])
