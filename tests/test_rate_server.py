"""The rating server over plain HTTP, as a separate process (`python -m lanskap.rate`): forged and malformed votes
are refused with 4xx and write nothing, kill -9 mid-vote leaves no partial row, and it binds beyond this machine
only when asked. The fixtures here (a small generated index with images, a running server) serve the browser
tests too."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lanskap.rate.items import item_id, rater_plan, read_items
from tests.conftest import ROOT, free_port

N_ITEMS = 4
CRITERIA = ["detail", "sharpness", "texture", "caption", "overall"]


def write_generated(root: Path) -> None:
    """generate's index.csv and its images, as dvc.yaml lays them out: base/, lora/ and the reference images."""
    rng = np.random.default_rng(0)
    rows = []
    for folder in ("data/generated/base", "data/generated/lora", "data/processed/images"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(N_ITEMS):
        reference = f"data/processed/images/ref{i:04d}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / reference)
        for model in ("base", "lora"):
            path = f"data/generated/{model}/{i:04d}_00.png"
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / path)
            rows.append(f'{i},0,"a fantasy landscape number {i}",{i},{model},{path},{reference},none')
    header = "prompt_index,sample,caption,seed,model,path,reference_path,lora_weights"
    (root / "data/generated/index.csv").write_text("\n".join([header, *rows]) + "\n")


@pytest.fixture
def project(tmp_path) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path)  # as it is: rate.criteria's order is the page's
    write_generated(tmp_path)
    return tmp_path


def start_server(root: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`python -m lanskap.rate ARGS` in `root`; returns the process and the URL it printed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lanskap.rate", *args], cwd=root, env=env, stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("open http://"):
            threading.Thread(target=process.stdout.read, daemon=True).start()  # keep its pipe drained
            return process, line.split()[1]
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError(f"the rating server did not start (exit {process.poll()})")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


@pytest.fixture
def server(project):
    process, url = start_server(project, "--port", str(free_port()))
    yield url
    stop_server(process)


def rows(root: Path) -> list[tuple]:
    with sqlite3.connect(root / "ratings/votes.sqlite") as connection:
        return connection.execute("SELECT rater, prompt_index, lora_side, criterion, answer FROM votes").fetchall()


def request(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    call = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(call, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def state(url: str, rater: str) -> dict:
    status, body = request(f"{url}api/state?rater={rater}")
    assert status == 200, body
    return body


def vote(url: str, token: str | None, **fields) -> int:
    headers = {"Content-Type": "application/json", **({"X-CSRF-Token": token} if token else {})}
    return request(f"{url}api/vote", json.dumps(fields).encode(), headers)[0]


def test_a_vote_is_recorded_with_the_lora_side_drawn_for_the_rater(project, server):
    alice = state(server, "alice")
    first = alice["items"][0]
    assert vote(server, alice["token"], rater="alice", item=first["id"], criterion="overall", answer="B") == 200
    items = read_items(project / "data/generated/index.csv", root=project)
    order, sides = rater_plan(items, "alice", seed=0)
    assert rows(project) == [("alice", items[order[0]].prompt_index, sides[order[0]], "overall", "B")]
    with sqlite3.connect(project / "ratings/votes.sqlite") as connection:
        secret = bytes.fromhex(connection.execute("SELECT value FROM meta").fetchone()[0])
    assert first["id"] == item_id(secret, items[order[0]])


def test_forged_and_malformed_votes_are_refused_and_write_nothing(project, server):
    alice, bob = state(server, "alice"), state(server, "bob")
    good = {"rater": "alice", "item": alice["items"][0]["id"], "criterion": "overall", "answer": "A"}
    json_headers = {"Content-Type": "application/json", "X-CSRF-Token": alice["token"]}
    assert vote(server, alice["token"], **{**good, "item": "0" * 20}) == 404  # unknown item
    assert vote(server, alice["token"], **{**good, "answer": "lora"}) == 400  # wrong answer value
    assert vote(server, alice["token"], **{**good, "answer": "a"}) == 400
    assert vote(server, alice["token"], **{**good, "criterion": "colour"}) == 400  # unknown criterion
    assert vote(server, None, **good) == 403  # missing CSRF token
    assert vote(server, bob["token"], **good) == 403  # another rater's token
    assert vote(server, alice["token"], **{**good, "rater": "bob"}) == 403  # alice's token for bob
    assert vote(server, alice["token"], **good, extra="x") == 400  # a key too many
    assert vote(server, alice["token"], **{**good, "answer": 1}) == 400  # not a string
    oversized = json.dumps({**good, "criterion": "x" * 5000}).encode()
    assert request(f"{server}api/vote", oversized, json_headers)[0] == 413
    assert request(f"{server}api/vote", b"{not json", json_headers)[0] == 400
    form = {"Content-Type": "application/x-www-form-urlencoded", "X-CSRF-Token": alice["token"]}
    assert request(f"{server}api/vote", json.dumps(good).encode(), form)[0] == 415  # what a cross-site form sends
    assert request(f"{server}api/vote")[0] == 405
    assert request(f"{server}api/state?rater=../etc")[0] == 400
    assert rows(project) == []
    assert vote(server, alice["token"], **good) == 200  # and the well-formed vote goes through
    assert len(rows(project)) == 1


def test_kill_9_mid_vote_leaves_no_partial_row(project):
    process, url = start_server(project, "--port", str(free_port()))
    alice = state(url, "alice")
    acknowledged, stop = [], threading.Event()

    def voter(rater_index: int):
        rater = f"r{rater_index}"
        token = state(url, rater)["token"]
        n = 0
        while not stop.is_set():
            item = alice["items"][n % N_ITEMS]["id"]
            try:
                criterion = CRITERIA[n // N_ITEMS % 5]
                if vote(url, token, rater=rater, item=item, criterion=criterion, answer="A") == 200:
                    acknowledged.append((rater, item, criterion))
            except OSError:
                return  # the server is gone
            n += 1

    threads = [threading.Thread(target=voter, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    while len(acknowledged) < 20:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stop.set()
    for thread in threads:
        thread.join()
    with sqlite3.connect(project / "ratings/votes.sqlite") as connection:  # recovers the WAL as SQLite does
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = connection.execute("SELECT * FROM votes").fetchall()
    # every acknowledged answer is there (one more may be: written, then killed before the reply); a repeated
    # (rater, item, criterion) replaces its row
    assert len(stored) >= len(set(acknowledged))
    for row in stored:
        assert all(value not in (None, "") for value in row), row
        assert row[7] in ("left", "right") and row[8] in CRITERIA and row[9] == "A" and len(row[5]) == 64


def test_serves_on_localhost_only_unless_asked(project):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "lanskap.rate", "--port", "0"]
    refused = subprocess.run([*command, "--host", "0.0.0.0"], cwd=project, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "--allow-remote" in refused.stderr, refused.stderr
    assert not (project / "ratings").exists()  # refused before anything was created
    process, url = start_server(project, "--port", "0", "--host", "0.0.0.0", "--allow-remote")
    try:
        assert url.startswith("http://0.0.0.0:")
        assert request(url.replace("0.0.0.0", "127.0.0.1") + "api/state?rater=alice")[0] == 200
    finally:
        stop_server(process)
    process, url = start_server(project, "--port", "0")
    stop_server(process)
    assert url.startswith("http://127.0.0.1:")


def test_stopping_folds_the_votes_into_the_committed_file(project):
    process, url = start_server(project, "--port", "0")
    alice = state(url, "alice")
    second = alice["items"][1]["id"]
    assert vote(url, alice["token"], rater="alice", item=second, criterion="detail", answer="tie") == 200
    assert (project / "ratings/votes.sqlite-wal").exists()  # WAL mode while it runs
    stop_server(process)
    assert sorted(path.name for path in (project / "ratings").iterdir()) == ["votes.sqlite"]
    file_only = sqlite3.connect(f"file:{project / 'ratings/votes.sqlite'}?immutable=1", uri=True)  # no WAL read
    assert file_only.execute("SELECT criterion, answer FROM votes").fetchall() == [("detail", "tie")]
