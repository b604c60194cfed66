"""Vote latency of the rating server (`python -m lanskap.rate`) with many votes already stored (goal: < 50 ms).

    python bench/rate_throughput.py [--stored 10000] [--votes 300] [--items 100] [--workdir /tmp/lanskap-rate-bench]

Writes a generated index of ITEMS small base/LoRA/reference PNG triples into WORKDIR, fills the votes database
with STORED votes on them (from 100 raters, through the same `record` the server uses), starts the real server
as its own process and times VOTES votes over HTTP, each on a new connection as the page sends them, and
then the page's state request. Prints median, 95th percentile and maximum in ms.
"""

import argparse
import http.client
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lanskap.rate import votes as db  # noqa: E402
from lanskap.rate.items import rater_plan, read_items  # noqa: E402


def write_index(root: Path, items: int) -> None:
    rng = np.random.default_rng(0)
    rows = ["prompt_index,sample,caption,seed,model,path,reference_path,lora_weights"]
    for i in range(items):
        for model in ("base", "lora", "reference"):
            path = root / f"images/{model}{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        for model in ("base", "lora"):
            rows.append(f"{i},0,caption {i},{i},{model},images/{model}{i:05d}.png,images/reference{i:05d}.png,none")
    (root / "data/generated").mkdir(parents=True, exist_ok=True)
    (root / "data/generated/index.csv").write_text("\n".join(rows) + "\n")


def fill_votes(root: Path, stored: int, criteria: list[str]) -> None:
    items = read_items(root / "data/generated/index.csv", root=root)
    connection = db.connect(root / "ratings/votes.sqlite", create=True)
    n = 0
    for rater in (f"rater{r:03d}" for r in range(100)):
        sides = rater_plan(items, rater, seed=0)[1]
        for item, side in zip(items, sides, strict=True):
            for criterion in criteria:
                if n == stored:
                    db.close(connection)
                    return
                db.record(connection, db.Vote(rater, item.prompt_index, 0, item.caption, item.base_sha256,
                                              item.lora_sha256, side, criterion, "A"))  # fmt: skip
                n += 1
    raise SystemExit(f"--stored {stored} is more than 100 raters x {len(items)} items x {len(criteria)} criteria")


def timed(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> float:
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 200, response.status
    return 1000 * (time.perf_counter() - start)


def report(name: str, times: list[float]) -> None:
    p95 = np.percentile(times, 95)
    print(f"{name:34s} median {np.median(times):6.1f} ms   p95 {p95:6.1f} ms   max {max(times):6.1f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stored", type=int, default=10_000)
    parser.add_argument("--votes", type=int, default=300)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lanskap-rate-bench"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", args.workdir)
    write_index(args.workdir, args.items)
    criteria = ["detail", "sharpness", "texture", "caption", "overall"]
    fill_votes(args.workdir, args.stored, criteria)

    server = subprocess.Popen([sys.executable, "-m", "lanskap.rate", "--port", "0"], cwd=args.workdir,
                              env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        line = server.stdout.readline()
        while not line.startswith("open http://"):
            line = server.stdout.readline()
        port = int(line.split()[1].rsplit(":", 1)[1].strip("/"))
        connection = http.client.HTTPConnection("127.0.0.1", port)
        connection.request("GET", "/api/state?rater=bench")
        state = json.loads(connection.getresponse().read())
        headers = {"Content-Type": "application/json", "X-CSRF-Token": state["token"]}
        vote_times = []
        for n in range(args.votes):
            item = state["items"][n // len(criteria) % len(state["items"])]["id"]
            body = {"rater": "bench", "item": item, "criterion": criteria[n % len(criteria)], "answer": "B"}
            vote_times.append(timed(port, "POST", "/api/vote", json.dumps(body).encode(), headers))
        state_times = [timed(port, "GET", "/api/state?rater=bench") for _ in range(20)]
    finally:
        server.terminate()
        server.wait()
    connection = db.open_existing(args.workdir / "ratings/votes.sqlite")
    total = connection.execute("SELECT count(*) FROM votes").fetchone()[0]
    db.close(connection)
    print(f"rating server, {args.stored} votes stored before, {total} after; {args.items} items, fsync per vote")
    report(f"vote (POST /api/vote, n={args.votes})", vote_times)
    report("page state (GET /api/state, n=20)", state_times)


if __name__ == "__main__":
    main()
