"""`dvc plots show/diff` pages draw offline: the configured template carries vega inline, and no plot title breaks
the page's script."""

import configparser
import re
from pathlib import Path

import yaml

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
