"""Start-up cost of each stage, this checkout's code beside a baseline commit's: CPU-s and peak memory of `--help`,
and of start-up to the stage's first unit of work.

    python bench/startup.py --inputs /path/to/a/project/that/ran/make/repro [--baseline ab572c7] [--rounds 3]

CPU-s is user + system time of the child process (os.wait4), so a busy machine inflates it less than wall time.
The first unit of work is the first call of the function that starts the stage's real work (SENTINELS below): the
run stops there (os._exit), so it counts the interpreter, the imports and the checks before it, whatever imports
them and wherever they sit (module level or inside functions). Both versions run the same commands, with the same
interpreter, in scratch copies of the --inputs project's params and outputs (nothing in --inputs is written); each
round runs every measurement for both versions, alternating which goes first, and the table shows the medians.
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REACHED = 97  # the exit status of a run that reached its sentinel
INPUTS = ["params.yaml", "conf", "data", "models", "reports", "dvclive", "metrics"]

# command (module and arguments, as dvc.yaml runs them), and the first unit of work: (module, function)
STAGES = {
    "ingest": (["stages.ingest", "--out", "data/ingested"], ("lanskap.data.images", "check_image")),
    "caption": (
        ["stages.caption", "--manifest", "data/ingested/manifest.csv", "--out", "data/captions.csv"],
        ("lanskap.data.captions", "choose_captions"),
    ),
    "split": (
        ["stages.split", "--captions", "data/captions.csv", "--out", "data/split"],
        ("lanskap.data.split", "split_table"),
    ),
    "preprocess": (
        ["stages.preprocess", "--split", "data/split", "--ingested", "data/ingested", "--out", "data/processed"]
        + ["--reports", "reports/preprocess"],
        ("lanskap.data.augment", "canonical_image"),
    ),
    "train_lora": (
        ["stages.train_lora", "--data", "data/processed", "--out", "models/lora", "--live", "dvclive/train"],
        ("lanskap.train.setup", "prepare_trainer"),  # the models' loading begins
    ),
    "generate": (
        ["stages.generate", "--data", "data/processed", "--lora", "models/lora", "--out", "data/generated"]
        + ["--reports", "reports/generate"],
        ("lanskap.generate.sampling", "load_pipeline"),
    ),
    "evaluate": (
        ["stages.evaluate", "--data", "data/processed", "--generated", "data/generated", "--out", "metrics/eval.json"]
        + ["--reports", "reports/evaluate"],
        ("lanskap.evaluate.features", "load_clip"),
    ),
    "sweep": (
        ["lanskap.sweep", "--from-json", "exp_show.json", "--out", "reports/sweep"],
        ("lanskap.sweep.aggregate", "finished_experiments"),
    ),
    "presets": (["lanskap.core.presets"], ("dvc.utils.hydra", "compose_and_dump")),
}

# Runs `module` as `python -m` does; when `function` of `target` is first called, exits with REACHED.
SENTINEL = f"""
import importlib.machinery, os, runpy, sys

target, function, module = sys.argv[1:4]
sys.argv = sys.argv[3:]


class Sentinel:
    def find_spec(self, name, path=None, where=None):
        if name != target:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run_module_code = spec.loader.exec_module

        def exec_module(loaded):
            run_module_code(loaded)
            setattr(loaded, function, lambda *args, **kwargs: os._exit({REACHED}))

        spec.loader.exec_module = exec_module
        return spec


if target:
    sys.meta_path.insert(0, Sentinel())
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def measure(code: Path, scratch: Path, command: list[str], sentinel: tuple[str, str] | None) -> tuple:
    """(CPU-s, peak MiB, failure) of one run of `command` with `code` first on the path, in `scratch`; failure is
    None, or the exit status and last line of a run that ended otherwise than expected (printed under the table)."""
    shutil.copy2(scratch / "params.yaml.orig", scratch / "params.yaml")  # a failed run may have removed it
    target, function = sentinel or ("", "")
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", SENTINEL, target, function, *command],
        cwd=scratch,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stderr = process.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    failure = None
    if os.waitstatus_to_exitcode(status) != (REACHED if sentinel else 0):
        last = (stderr.strip().splitlines() or ["(no output)"])[-1]
        failure = f"exit {os.waitstatus_to_exitcode(status)}: {last[:200]}"
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, failure


def scratch_project(inputs: Path, folder: Path) -> Path:
    """A copy of the inputs project's params and outputs (the runs may leave staging files behind)."""
    folder.mkdir()
    for name in INPUTS:
        source = inputs / name
        if source.is_dir():
            shutil.copytree(source, folder / name, symlinks=True)
        elif source.is_file():
            shutil.copy2(source, folder / name)
    shutil.copy2(folder / "params.yaml", folder / "params.yaml.orig")
    (folder / "exp_show.json").write_text("[]")
    return folder


def baseline_checkout(ref: str, folder: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(folder), ref], check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=Path, default=ROOT, help="a project whose pipeline ran (default: here)")
    parser.add_argument("--baseline", default="ab572c7", help="the commit to compare with (default: ab572c7)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped early: still remove the baseline worktree
    missing = [
        path for path in ("data/processed", "data/generated", "models/lora") if not (args.inputs / path).exists()
    ]
    if missing:
        raise SystemExit(f"{args.inputs} lacks {missing}: run `make repro` there first, or pass --inputs")

    with tempfile.TemporaryDirectory(prefix="lanskap-startup-") as temporary:
        temporary = Path(temporary)
        versions = {"baseline": baseline_checkout(args.baseline, temporary / "baseline"), "this": ROOT}
        try:
            scratch = {name: scratch_project(args.inputs, temporary / f"scratch-{name}") for name in versions}
            samples = {}
            for round_index in range(args.rounds):
                order = list(versions) if round_index % 2 == 0 else list(reversed(versions))
                for stage in args.stages:
                    command, sentinel = STAGES[stage]
                    for what, run_command, stop in (
                        ("--help", [command[0], "--help"], None),
                        ("to work", command, sentinel),
                    ):
                        for version in order:
                            sample = measure(versions[version], scratch[version], run_command, stop)
                            samples.setdefault((stage, what, version), []).append(sample)
                print_table(samples, args.stages, round_index + 1, args.baseline)  # a table per round: a long run
                # stopped early still leaves its medians so far
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(versions["baseline"])])


def print_table(samples: dict, stages: list[str], rounds: int, baseline: str) -> None:
    print(f"\nmedian of {rounds} round(s); baseline {baseline} vs this checkout; CPU-s = user + sys", flush=True)
    print(f"{'stage':12s} {'run':8s} {'CPU-s before':>12s} {'CPU-s after':>12s} {'MiB before':>11s} {'MiB after':>10s}")
    failures = {}
    for stage in stages:
        for what in ("--help", "to work"):
            cells = []
            for version in ("baseline", "this"):
                runs = samples[(stage, what, version)]
                failed = {run[2] for run in runs if run[2]}
                failures.update({f"{stage} {what} ({version}): {failure}": None for failure in failed})
                mark = "!" if failed else ""
                cells.append(
                    (
                        f"{statistics.median(run[0] for run in runs):.2f}{mark}",
                        statistics.median(run[1] for run in runs),
                    )
                )
            print(
                f"{stage:12s} {what:8s} {cells[0][0]:>12s} {cells[1][0]:>12s} {cells[0][1]:11.0f} {cells[1][1]:10.0f}"
            )
    for failure in failures:
        print(f"! failed: {failure}", flush=True)


if __name__ == "__main__":
    main()
