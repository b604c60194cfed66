"""The rating page in a real browser: headless Chromium (Debian's) driven by Playwright against the real server.

Locally these skip, saying why, when no Chromium or no Playwright is found; in CI (CI set, or
LANSKAP_REQUIRE_BROWSER=1, which .ci/run sets after installing Debian's chromium) they fail instead of skipping.
"""

import json
import os
import re
import shutil
import sqlite3

import pytest

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the dev group installs it; without it the `chromium` fixture skips or fails, saying why
    expect = sync_playwright = None

from lanskap.rate.items import rater_plan, read_items
from tests import test_rate_server
from tests.conftest import free_port
from tests.test_rate_server import CRITERIA, N_ITEMS, rows, start_server, stop_server

project = test_rate_server.project  # the fixture: a small generated index and its images

CHROMIUM_FLAGS = [  # what a headless Chromium needs as root on a machine with no network beyond loopback
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REVEALING = re.compile(r"base|lora|\d{4}_\d{2}|ref\d{4}|\.png", re.IGNORECASE)  # the models and the file names


def browser_required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("LANSKAP_REQUIRE_BROWSER") == "1"


@pytest.fixture(scope="module")
def chromium():
    executable = os.environ.get("LANSKAP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None or sync_playwright is None:
        reason = "no Chromium (apt-get install chromium) or no playwright (the dev group): browser tests not run"
        if browser_required():
            pytest.fail(reason + ", but CI / LANSKAP_REQUIRE_BROWSER=1 requires them")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def served(project):
    """The project, the server's URL and, in a dict a test may restart it through, its port and process."""
    port = free_port()
    running = {"port": port, "process": start_server(project, "--port", str(port))[0]}
    yield project, f"http://127.0.0.1:{port}/", running
    stop_server(running["process"])


def chosen(page, count: int) -> None:
    """Wait until the shown item has `count` answers highlighted (the page's CSP forbids eval: no wait_for_function)."""
    expect(page.locator("#criteria button.chosen")).to_have_count(count)


def saved(page) -> None:
    """Wait until every answer given has reached the server (the page shows an answer before it is saved)."""
    expect(page.locator("#saving")).to_have_text("all answers saved", timeout=30_000)


def sign_in(page, url: str, rater: str) -> None:
    page.goto(url)
    page.fill("#rater", rater)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#item:not([hidden])")


def expected_item(root, rater: str, position: int):
    """The item the rater sees at `position` of their order, and the LoRA's side on it."""
    items = read_items(root / "data/generated/index.csv", root=root)
    order, sides = rater_plan(items, rater, seed=0)
    return items[order[position]], sides[order[position]]


def test_clicks_and_keys_record_the_right_rows(chromium, served):
    root, url, _ = served
    page = chromium.new_page()
    sign_in(page, url, "alice")
    item, side = expected_item(root, "alice", 0)
    assert page.inner_text("#caption") == item.caption
    page.click("#criteria button[data-criterion=detail][data-answer=A]")
    chosen(page, 1)
    assert "current" in page.locator("#criteria .question").nth(1).get_attribute("class")  # the keys' next question
    for answered, key in enumerate(("b", "t", "2"), start=2):  # sharpness B, texture tie, caption B
        page.keyboard.press(key)
        chosen(page, answered)
    page.keyboard.press("ArrowLeft")  # overall A, the last question: on to the next item
    expect(page.locator("#count")).to_have_text(f"1 of {N_ITEMS} rated")
    saved(page)
    expected = list(zip(CRITERIA, ["A", "B", "tie", "B", "A"], strict=True))
    assert sorted(rows(root)) == sorted(("alice", item.prompt_index, side, c, a) for c, a in expected)
    assert page.inner_text("#caption") == expected_item(root, "alice", 1)[0].caption  # on to the next item


def test_the_page_and_its_requests_never_reveal_which_side_is_the_lora(chromium, served):
    root, url, _ = served
    page = chromium.new_page()
    seen = []
    page.on("request", lambda r: seen.append(f"{r.method} {r.url} {r.headers} {r.post_data or ''}"))

    def on_response(response):
        seen.append(f"{response.url} {response.headers}")
        if not response.headers.get("content-type", "").startswith("image/"):
            seen.append(response.text())

    page.on("response", on_response)
    sign_in(page, url, "alice")
    for _ in range(2 * len(CRITERIA)):  # two items, every question, typed as fast as keys go
        page.keyboard.press("a")
    expect(page.locator("#count")).to_have_text(f"2 of {N_ITEMS} rated")
    saved(page)
    page.reload()
    page.wait_for_selector("#item:not([hidden])")
    seen.append(page.content())
    assert any("/img/" in text for text in seen) and any("/api/vote" in text for text in seen)  # it looked at both
    leaks = [match.group(0) for text in seen for match in [REVEALING.search(text)] if match]
    assert not leaks, leaks
    assert len(rows(root)) == 2 * len(CRITERIA)


def test_a_reload_and_a_restart_resume_where_the_rater_stopped(chromium, served):
    root, url, running = served
    page = chromium.new_page()
    sign_in(page, url, "carol")
    for n, key in enumerate(["a"] * len(CRITERIA) + ["b", "b"]):  # the first item, two questions of the second
        page.keyboard.press(key)
        chosen(page, (n + 1) % len(CRITERIA))
    saved(page)
    second = expected_item(root, "carol", 1)[0].caption

    def resumed():
        page.wait_for_selector("#item:not([hidden])")
        assert page.inner_text("#count").startswith(f"1 of {N_ITEMS}")
        assert page.inner_text("#caption") == second
        assert page.locator("#criteria .question").nth(2).get_attribute("class") == "question current"
        assert page.locator("#criteria button.chosen").count() == 2

    page.reload()
    resumed()
    stop_server(running["process"])
    running["process"] = start_server(root, "--port", str(running["port"]))[0]  # same origin: same rater id
    page.reload()
    resumed()


def test_two_raters_at_once_lose_no_vote(chromium, served):
    root, url, _ = served
    pages = []
    for rater in ("dan", "eve"):
        page = chromium.new_context().new_page()  # separate storage: two people
        sign_in(page, url, rater)
        pages.append(page)
    cast_all = """async () => {
        const rater = localStorage.getItem("rater");
        const state = await (await fetch(`/api/state?rater=${rater}`)).json();
        const calls = [];
        for (const item of state.items) for (const c of state.criteria) for (const answer of ["A", "B"])
            calls.push(fetch("/api/vote", {
                method: "POST",
                body: JSON.stringify({rater, item: item.id, criterion: c.name, answer}),
                headers: {"Content-Type": "application/json", "X-CSRF-Token": state.token},
            }).then(r => r.status));
        document.body.dataset.statuses = JSON.stringify(await Promise.all(calls));
    }"""
    for page in pages:
        page.evaluate(f"({cast_all})(); 0")  # started, not awaited: both raters' votes in flight together
    for page in pages:
        expect(page.locator("body")).to_have_attribute("data-statuses", re.compile("."), timeout=60_000)
        assert set(json.loads(page.locator("body").get_attribute("data-statuses"))) == {200}
    with sqlite3.connect(root / "ratings/votes.sqlite") as connection:
        counts = dict(connection.execute("SELECT rater, count(*) FROM votes GROUP BY rater").fetchall())
    assert counts == {"dan": N_ITEMS * len(CRITERIA), "eve": N_ITEMS * len(CRITERIA)}  # one row per answer
