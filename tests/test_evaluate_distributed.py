"""`accelerate launch` with two CPU processes writes the same metrics/eval.json and report, byte for byte, as one
process: the feature batches are the same whatever the number of processes (lanskap/evaluate/extraction.py)."""

import os
import subprocess

import pytest

from tests.conftest import EVALUATE_ARGS, ROOT, launcher
from tests.test_feature_cache import evaluate_project

OUTPUTS = ["metrics/eval.json", "reports/evaluate/report.md", "reports/evaluate/report.html"]


def evaluate(workdir, launcher: list[str], cache: str, computed: int) -> dict[str, bytes]:
    """Run the stage with its own feature cache and return its outputs; its main process computed `computed` batch
    entries (none from the cache)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LANSKAP_FEATURE_CACHE": cache}
    finished = subprocess.run(
        [*launcher, "-m", "stages.evaluate", *EVALUATE_ARGS],
        cwd=workdir,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert f"0 batch entries from the cache, {computed} computed (main process)" in finished.stdout
    # One progress line, counting every process's batches (6: 2 per set), however many processes share them.
    assert finished.stderr.count("features: 100%") == 1 and "| 6/6 [" in finished.stderr, finished.stderr[-2000:]
    return {output: (workdir / output).read_bytes() for output in OUTPUTS}


@pytest.mark.slow
def test_two_processes_write_the_bytes_of_one(tmp_path):
    workdir = evaluate_project(tmp_path, 40)  # 2 batches per set: each process computes some of every set
    single = evaluate(workdir, launcher(1), str(tmp_path / "cache-one"), computed=12)  # 6 batches x 2
    accelerate = launcher(2)
    double = evaluate(workdir, accelerate, str(tmp_path / "cache-two"), computed=6)  # the other process: the rest
    assert double == single
    one_entries = sorted(path.name for path in (tmp_path / "cache-one").rglob("*.features"))
    assert one_entries == sorted(path.name for path in (tmp_path / "cache-two").rglob("*.features"))
