"""Start-up: `--help` loads none of the heavy libraries, and a Ctrl-C while a stage is still importing is one line
and exit status 130, not a traceback. (How long start-up takes is measured by bench/startup.py, not tested.)"""

import os
import signal
import subprocess
import sys

import pytest

from lanskap.core.errors import INTERRUPTED
from tests.conftest import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's code, whatever the environment's install points at
STAGES = ["ingest", "caption", "split", "preprocess", "train_lora", "generate", "evaluate"]
HEAVY = ["torch", "diffusers", "transformers", "peft", "accelerate", "dvclive", "pandas", "numpy", "scipy", "PIL"]

# Runs a module as `python -m` does, with sys.argv set, then lists the heavy libraries it loaded.
LOADED_AFTER = """
import runpy, sys
module, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print("LOADED", sorted(name for name in {heavy} if name in sys.modules))
"""

# Runs a module as `python -m` does, pausing (printing PAUSED) when it first imports `pause_at`, for the test to
# send SIGINT there: inside an import, as a Ctrl-C during a slow `import torch` would land.
PAUSED_IN_IMPORT = """
import runpy, sys, time

class PauseAt:
    def find_spec(self, name, path=None, target=None):
        if name == pause_at:
            print("PAUSED", flush=True)
            time.sleep(120)

pause_at, module, sys.argv = sys.argv[1], sys.argv[2], sys.argv[2:]
sys.meta_path.insert(0, PauseAt())
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module", [*(f"stages.{stage}" for stage in STAGES), "lanskap.sweep", "lanskap.core.presets"])
def test_help_loads_no_heavy_library(module, tmp_path):
    code = LOADED_AFTER.format(heavy=HEAVY)
    run = subprocess.run(
        [sys.executable, "-c", code, module, "--help"], cwd=tmp_path, env=ENV, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "usage:" in run.stdout
    assert run.stdout.splitlines()[-1] == "LOADED []"
    assert not (tmp_path / "params.yaml").exists()  # and --help wrote nothing


def default_sigint() -> None:
    """Ctrl-C's default action in the child, as in a terminal (pytest may run with SIGINT ignored, and an ignored
    signal stays ignored across exec): see tests/test_interruptions.py."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


INGEST = ["stages.ingest", "--out", "data/ingested"]
GENERATE = ["stages.generate", "--data", "data/processed", "--lora", "models/lora", "--out", "o", "--reports", "r"]


@pytest.mark.parametrize(
    ("pause_at", "command"),
    [
        ("argparse", INGEST),  # the stage module's own imports, before run_stage runs its main
        ("pandas", INGEST),  # the work's imports, inside main
        ("torch", GENERATE),  # after the params are validated
    ],
    ids=["ingest-module-imports", "ingest-work-imports", "generate-torch"],
)
def test_ctrl_c_while_importing_is_one_line_and_status_130(workdir, pause_at, command):
    process = subprocess.Popen(
        [sys.executable, "-c", PAUSED_IN_IMPORT, pause_at, *command],
        cwd=workdir,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    assert process.stdout.readline() == "PAUSED\n"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert (process.returncode, stderr) == (130, f"{INTERRUPTED}\n")
