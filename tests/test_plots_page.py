"""`dvc plots show/diff` pages draw offline (the configured template carries vega inline, no plot title breaks the
page's script) and readably: one panel per metric, losses in their own colours, every logged series, prompts in
full, and the page itself git-ignored."""

import configparser
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageChops

from lanskap.evaluate.report import BASE_VS_LORA_KEYS

ROOT = Path(__file__).resolve().parents[1]


def configured_template() -> Path:
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc/config")
    return ROOT / ".dvc" / config["plots"]["html_template"]  # DVC resolves it against .dvc/


def test_the_configured_template_carries_vega_and_fetches_nothing():
    page = configured_template().read_text()
    assert "{plot_divs}" in page
    assert "{scripts}" not in page  # where DVC would insert its CDN <script src=...> tags
    assert not re.search(r"<(script|link)[^>]+(src|href)=", page)
    for library in ("vega", "vegaLite", "vegaEmbed"):  # the globals each bundle defines
        assert f".{library}=" in page, library


def test_plot_titles_hold_no_quotes():
    """DVC writes `vegaEmbed('#<title>', spec)`: a quote in a title ends the string and no chart is drawn."""
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    titles = [next(iter(plot)) if isinstance(plot, dict) else plot for plot in plots]
    assert titles and not [title for title in titles if re.search(r"['\"\\]", title)]


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> dict:
    """The specs `dvc plots show` renders from the committed results, by plot title."""
    out = tmp_path_factory.mktemp("dvc_plots")
    shown = subprocess.run(
        [Path(sys.executable).with_name("dvc"), "plots", "show", "--json", "-o", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    rendered = json.loads(shown.stdout)
    assert not rendered.get("errors"), rendered["errors"]
    # the blind rating's plot has no data until someone rates (reports/qualitative/win_rates.csv is then empty)
    empty = [title for title, entries in rendered["data"].items() if not entries and "(qualitative)" not in title]
    assert not empty, f"plots with nothing to draw: {empty}"
    return {
        title: entries[0]["content"]
        for title, entries in rendered["data"].items()
        if entries and entries[0]["type"] == "vega"
    }


def line_layers(spec: dict) -> list[dict]:
    return [layer for group in spec["layer"] for layer in group.get("layer", [group]) if "line" in str(layer["mark"])]


def test_base_vs_lora_draws_each_metric_in_its_own_panel_and_scale(page):
    """KID runs to thousands, CMMD to about 10: on one axis the CMMD and CLIP-score bars had no width."""
    spec = page["Base vs LoRA per metric (evaluate)"]
    assert spec["facet"]["column"]["field"] == "metric"
    assert spec["resolve"]["scale"]["y"] == "independent"
    assert {row["metric"] for row in spec["data"]["values"]} == set(BASE_VS_LORA_KEYS)


def test_train_and_validation_loss_are_drawn_in_their_own_colours(page):
    spec = page["Training loss (paper Figure 5)"]
    assert {row["filename"] for row in spec["data"]["values"]} == {"train/loss.tsv", "validation/loss.tsv"}
    for layer in [spec, *spec["layer"]]:  # the layers that draw lines colour by file; nothing colours by revision
        assert layer.get("encoding", {}).get("color", {}).get("field") in (None, "filename")
    assert line_layers(spec)


def test_every_series_the_training_log_holds_is_plotted():
    """DVCLive's metric files (loss, validation loss, learning rate, images/s) each appear in a plot of dvc.yaml."""
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    plotted = set()
    for plot in plots:
        title, definition = next(iter(plot.items())) if isinstance(plot, dict) else (plot, None)
        y = (definition or {}).get("y")
        plotted |= set(y) if isinstance(y, dict) else {title}  # the files named under y:, else the title itself
    logged = {str(path.relative_to(ROOT)) for path in (ROOT / "dvclive/train/plots/metrics").rglob("*.tsv")}
    assert "dvclive/train/plots/metrics/learning_rate.tsv" in logged
    assert logged <= plotted, logged - plotted


def test_the_plots_page_is_git_ignored():
    ignored = subprocess.run(["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=ROOT)
    assert ignored.returncode == 0


def test_validation_images_show_each_prompt_in_full():
    """A prompt's last words reach the grid: at the demo's 64 px they were cut to "a fantasy landsc…"."""
    from lanskap.train.monitor import validation_grid

    prompt = "a fantasy landscape with floating islands and tall spires under an emerald aurora sky"
    tile = Image.new("RGB", (64, 64), "gray")
    short, longer = (validation_grid([tile, tile], [text, "a lake"], 64) for text in (prompt, f"{prompt} at night"))
    assert ImageChops.difference(short, longer).getbbox() is not None
    assert short.size == longer.size  # the added words wrapped within the label column, not past it
