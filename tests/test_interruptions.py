"""kill -9 at chosen points of ingest, train_lora and generate: the next run completes with the outputs of a run
never interrupted, and the killed run leaves nothing DVC would record.

Each kill is a real SIGKILL of the whole process group (dvc and the stage it runs) at a point drawn at random with
a fixed seed (KILL_SEED; set $LANSKAP_KILL_SEED to explore others; the points drawn are printed):

- ingest, mid-download (the stage run directly on a URL manifest): the server stalls one URL part-way through its
  body, after the URLs before it were downloaded and their images staged. The rerun downloads only what is not
  cached yet and writes the same output.
- ingest, mid-image-writing (`dvc repro`): after k images are in the staging folder.
- train_lora (`dvc repro`), three runs in a row: killed mid-step before the first checkpoint (the next run starts
  over); killed mid-write of the step-8 checkpoint (a hook pauses after one of its files, drawn at random); then a
  run that resumes from the complete step-4 checkpoint, never the half-written one, and ends with the LoRA (tensors
  and metadata) and loss log of an uninterrupted run.
- generate, mid-run (`dvc repro`), three times: after k of the base and LoRA images are written; the rerun reuses
  the images the killed run had finished (lanskap/generate/resume.py) and draws only the others.
- caption, split, preprocess (`dvc repro`): each with its output complete under its staging name, just before the
  rename that publishes it; preprocess also after k of its images are written.
- dvc itself, in its commit step (after the first output went into its cache) and just before it writes dvc.lock.
- Ctrl-C (SIGINT to dvc and the stage) in train_lora's loop: the git-tracked log and the LoRA stay as they were.

After each kill, dvc.lock is untouched and each output is absent or the previous complete version; after the
rerun, the outputs equal the reference and `dvc status` is clean. The reference is the same project's
uninterrupted run, made in-process (to save the stage imports) and recorded with `dvc commit`.
"""

import contextlib
import hashlib
import http.server
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from lanskap.core.io import atomic_dir, remove_dir
from lanskap.core.presets import compose_params
from stages import generate, ingest, train_lora
from tests.conftest import GENERATE_ARGS, ROOT, TINY_OVERRIDES, TRAIN_ARGS, copy_project, write_params
from tests.test_data_stages import png_bytes, run_data_stages, tree_digest

KILL_SEED = int(os.environ.get("LANSKAP_KILL_SEED", "0"))
# Checkpoints at steps 4, 8 and 12; one image per generate call, so a kill can land between any two images.
EXTRA_OVERRIDES = {
    "train": {"steps": 12, "checkpoint_every": 4, "images_every": 0},
    "generate": {"batch_size": 1},
}  # keys this checkout lacks are skipped
BIN = Path(sys.executable).parent
# LANSKAP_PYTHON: the copies have no .venv of their own for stages/python to find
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "LANSKAP_PYTHON": sys.executable}
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def draw(label: str, choices):
    """A seeded random choice, printed so a failing point can be replayed."""
    choice = random.Random(f"{KILL_SEED}:{label}").choice(list(choices))
    print(f"kill point {label}: {choice}")
    return choice


def default_sigint() -> None:
    """Ctrl-C's default action in the child, as a terminal starts a command: pytest may run with SIGINT ignored
    (started in the background by a non-interactive shell), and an ignored signal stays ignored across exec, so
    dvc and the stage would never see the Ctrl-C the test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Run:
    """A command in its own process group, its output collected, killed with SIGKILL at a chosen point."""

    def __init__(self, cwd: Path, *command: str, env: dict | None = None):
        self.command = " ".join(command)
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env or ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=default_sigint,
        )
        self.output = ""
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        for chunk in iter(lambda: self.process.stdout.read1(4096), b""):
            self.output += chunk.decode(errors="replace")

    def kill_when(self, reached, point: str, delay: float = 0.0, timeout: float = 300) -> "Run":
        """SIGKILL the process group `delay` seconds after `reached(self)` first holds (or on a failure)."""
        deadline = time.monotonic() + timeout
        try:
            while not reached(self):
                assert self.process.poll() is None, f"{self.command} ended before {point}:\n{self.output[-3000:]}"
                assert time.monotonic() < deadline, f"{self.command}: {point} not reached in {timeout} s"
                time.sleep(0.002)
            time.sleep(delay)
        finally:
            self.kill()
        assert self.process.returncode == -signal.SIGKILL, f"{self.command} ended first:\n{self.output[-3000:]}"
        return self

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.reader.join()

    def finish(self, timeout: float = 600) -> str:
        try:
            self.process.wait(timeout)
        finally:
            if self.process.returncode is None:
                self.kill()
        self.reader.join()
        assert self.process.returncode == 0, f"{self.command} failed:\n{self.output[-3000:]}"
        return self.output


def run(cwd: Path, *command: str) -> str:
    return Run(cwd, *command).finish()


def staged_files(repo: Path, output: str, pattern: str) -> list[Path]:
    """Files matching `pattern` in the staging folders atomic_dir makes beside `output` (.NAME.tmp-*)."""
    output = Path(output)
    return list((repo / output.parent).glob(f".{output.name}.tmp-*/{pattern}"))


def temporaries(repo: Path, output: str) -> list[str]:
    """Staging and trash folders beside `output`: what a killed atomic_dir leaves, until the next write removes it."""
    output = Path(output)
    return sorted(path.name for path in (repo / output.parent).glob(f".{output.name}.*-*"))


def digests(repo: Path, *outputs: str) -> dict:
    return {output: tree_digest(repo / output) if (repo / output).exists() else None for output in outputs}


def configure(repo: Path) -> None:
    """conf/ shrunk as in test_pipeline, plus EXTRA_OVERRIDES for the keys this checkout has; params.yaml composed."""
    config_file = repo / "conf" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    for overrides in (TINY_OVERRIDES, EXTRA_OVERRIDES):
        for group, values in overrides.items():
            config[group].update({key: value for key, value in values.items() if key in config[group]})
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    compose_params([], repo / "params.yaml", repo / "conf")


STAGE_ARGS = {"train_lora": TRAIN_ARGS, "generate": GENERATE_ARGS}  # as dvc.yaml gives them
OUTPUTS = {
    "ingest": ["data/ingested"],
    "train_lora": ["models/lora"],
    "generate": ["data/generated", "reports/generate"],
}


@pytest.fixture
def image_server():
    """Serves a distinct PNG at every path; the path in `stall` stops after `cut` bytes of its next response
    (`stalled` is set then) until `release` is set."""
    state = SimpleNamespace(stall=None, cut=0, hits=Counter(), stalled=threading.Event(), release=threading.Event())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            state.hits[self.path] += 1
            body = png_bytes(size=(64, 64), seed=int.from_bytes(hashlib.sha256(self.path.encode()).digest()[:3], "big"))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                if self.path == state.stall:
                    state.stall = None
                    self.wfile.write(body[: state.cut])
                    self.wfile.flush()
                    state.stalled.set()
                    state.release.wait(60)
                else:
                    self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{httpd.server_port}"
    yield state
    state.release.set()
    httpd.shutdown()


def cached_download(workdir: Path, url: str) -> Path:
    return workdir / ".lanskap-cache/downloads" / hashlib.sha256(url.encode()).hexdigest()


def test_ingest_killed_mid_download_fetches_only_what_is_missing_and_writes_the_same_output(
    workdir, project_params, image_server
):
    urls = [f"{image_server.url}/{index}.png" for index in range(6)]
    (workdir / "raw").mkdir()
    pd.DataFrame({"path": urls, "caption": "a picture"}).to_csv(workdir / "raw/urls.csv", index=False)
    write_params(workdir, {**project_params, "ingest": {**project_params["ingest"], "source": "raw/urls.csv"}})
    ingest.main(["--out", "data/ingested"])  # the uninterrupted reference, left in place as the previous version
    reference = digests(workdir, "data/ingested")
    for url in urls:
        cached_download(workdir, url).unlink()

    stalled = draw("ingest URL killed mid-download", range(1, len(urls)))
    image_server.stall = f"/{stalled}.png"
    image_server.cut = draw("bytes received before the kill", [1, 16, 64])
    env = {**ENV, "PYTHONPATH": str(ROOT)}
    command = ("python", "-m", "stages.ingest", "--out", "data/ingested")
    Run(workdir, *command, env=env).kill_when(lambda _: image_server.stalled.is_set(), f"{stalled}.png mid-download")
    image_server.release.set()
    assert digests(workdir, "data/ingested") == reference  # the previous output, untouched
    assert len(staged_files(workdir, "data/ingested", "images/*")) == stalled  # the images before the stalled one
    for index, url in enumerate(urls):  # complete downloads are cached, the interrupted one is not
        assert cached_download(workdir, url).is_file() == (index < stalled), url
    hits = image_server.hits.copy()

    Run(workdir, *command, env=env).finish()
    assert digests(workdir, "data/ingested") == reference
    assert image_server.hits - hits == Counter(f"/{index}.png" for index in range(stalled, len(urls)))
    assert temporaries(workdir, "data/ingested") == []


def test_atomic_dir_removes_what_killed_writers_left_and_keeps_what_live_ones_are_writing(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()  # a process that has ended
    left = [tmp_path / f".out.tmp-{dead}-x", tmp_path / f".out.old-{dead}-x"]
    live = [tmp_path / f".out.tmp-{os.getppid()}-x", tmp_path / ".out.tmp-x", tmp_path / f".other.tmp-{dead}-x"]
    for folder in left + live:
        (folder / "images").mkdir(parents=True)
    with atomic_dir(tmp_path / "out") as staging:
        (staging / "done").write_text("")
    assert [path for path in left + live if path.exists()] == live  # unknown names and other targets: untouched
    assert (tmp_path / "out/done").is_file()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC copy of the project, shrunk, whose stages up to generate ran once uninterrupted (in-process)
    and were recorded with `dvc commit`: dvc.lock and the outputs are the reference."""
    repo = copy_project(tmp_path_factory.mktemp("interruptions") / "project")
    configure(repo)
    run(repo, "git", "init", "-q")
    run(repo, *GIT, "add", "-A")
    run(repo, *GIT, "commit", "-qm", "project")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(repo)
        run_data_stages(repo)
        train_lora.main(STAGE_ARGS["train_lora"])
        generate.main(STAGE_ARGS["generate"])
    run(repo, "dvc", "commit", "--force", "ingest", "caption", "split", "preprocess", "train_lora", "generate")
    shutil.rmtree(repo / ".dvc/cache/runs", ignore_errors=True)  # see evict()
    run(repo, *GIT, "add", "-A")
    run(repo, *GIT, "commit", "-qm", "reference run")
    assert "up to date" in dvc_status(repo)
    return repo


def evict(repo: Path, stage: str) -> None:
    """Drop the stage's outputs from DVC's cache, as for a run that never completed: otherwise a `dvc repro` after
    the killed `dvc repro --force` would check the reference's outputs out again instead of running the stage."""
    for out in yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]["outs"]:
        (repo / ".dvc/cache/files/md5" / out["md5"][:2] / out["md5"][2:]).unlink(missing_ok=True)


def dvc_status(repo: Path, stage: str = "generate") -> str:
    return run(repo, "dvc", "status", stage)


def lock_outs(lock: Path | str, stage: str) -> list:
    """The output hashes dvc.lock records for `stage` (from the lock in a repo, or a lock's text)."""
    text = (lock / "dvc.lock").read_text() if isinstance(lock, Path) else lock
    return yaml.safe_load(text)["stages"][stage]["outs"]


def assert_nothing_recorded(repo: Path, lock_before: str, before: dict) -> None:
    """The killed run changed no lock entry, and left each output absent or as the previous complete version."""
    assert (repo / "dvc.lock").read_text() == lock_before
    for output, digest in digests(repo, *before).items():
        assert digest is None or digest == before[output], f"{output} was left partly written"


@pytest.mark.slow
def test_dvc_repro_killed_mid_ingest_writes_the_same_output_next_time(repo):
    lock, reference = (repo / "dvc.lock").read_text(), digests(repo, *OUTPUTS["ingest"])
    images = len([name for name in reference["data/ingested"] if name.startswith("images/")])
    written = draw("ingest images written", range(1, images - 3))  # a margin: the kill must land before the end
    evict(repo, "ingest")
    Run(repo, "dvc", "repro", "--force", "--single-item", "ingest").kill_when(
        lambda _: len(staged_files(repo, "data/ingested", "images/*")) >= written, f"{written} images staged"
    )
    assert_nothing_recorded(repo, lock, reference)
    assert temporaries(repo, "data/ingested")  # the killed run's staging folder: not an output, removed next time

    output = run(repo, "dvc", "repro", "preprocess")
    assert "Running stage 'ingest'" in output and "Running stage 'caption'" not in output  # same output: no more
    assert digests(repo, *OUTPUTS["ingest"]) == reference and temporaries(repo, "data/ingested") == []
    assert (repo / "dvc.lock").read_text() == lock and "up to date" in dvc_status(repo, "preprocess")


def paused_in_checkpoint(tmp_path: Path, file_name: str, checkpoint: str) -> dict:
    """ENV for a train_lora that pauses (sleeps) right after writing `file_name` of `checkpoint` (PAUSE_HOOK)."""
    (tmp_path / "hook").mkdir(exist_ok=True)
    (tmp_path / "hook" / "sitecustomize.py").write_text(PAUSE_HOOK)
    return {
        **ENV,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "hook"), ENV.get("PYTHONPATH")])),
        "LANSKAP_PAUSE_AFTER": file_name,
        "LANSKAP_PAUSE_CHECKPOINT": checkpoint,
    }


# Injected into `python -m stages.train_lora` through PYTHONPATH: once the checkpoint file named by
# $LANSKAP_PAUSE_AFTER has been written into the staging folder of $LANSKAP_PAUSE_CHECKPOINT, say so and hang.
PAUSE_HOOK = """
import os, sys
if os.environ.get("LANSKAP_PAUSE_AFTER") and sys.orig_argv[1:3] == ["-m", "stages.train_lora"]:
    import pathlib, time
    import safetensors.torch, torch

    def paused_after(write, path_argument):
        def wrapper(*args, **kwargs):
            result = write(*args, **kwargs)
            path = pathlib.Path(args[path_argument])
            if (path.name == os.environ["LANSKAP_PAUSE_AFTER"]
                    and path.parent.name.startswith("." + os.environ["LANSKAP_PAUSE_CHECKPOINT"] + ".tmp-")):
                print("PAUSED IN CHECKPOINT WRITE after", path, flush=True)
                time.sleep(3600)
            return result
        return wrapper

    safetensors.torch.save_file = paused_after(safetensors.torch.save_file, 1)
    torch.save = paused_after(torch.save, 1)
    pathlib.Path.write_text = paused_after(pathlib.Path.write_text, 0)
"""


def loss_curves(repo: Path) -> dict[str, list]:
    """The DVCLive training and validation loss logs, without their timestamps."""
    return {
        name: pd.read_csv(repo / f"dvclive/train/plots/metrics/{name}/loss.tsv", sep="\t")[
            ["step", "loss"]
        ].values.tolist()
        for name in ("train", "validation")
    }


def checkpoints(repo: Path, pattern: str = "step-*") -> list[str]:
    """Complete checkpoints by default (atomic_dir's staging folders start with a dot)."""
    return sorted(path.name for path in (repo / ".lanskap-cache/checkpoints").glob(f"*/{pattern}"))


@pytest.mark.slow
def test_dvc_repro_killed_mid_step_and_mid_checkpoint_write_resumes_to_the_same_lora(repo, tmp_path):
    lock, curves = (repo / "dvc.lock").read_text(), loss_curves(repo)
    reference = tree_digest(repo / "models/lora")  # made in-process: the bytes must not depend on the process
    force = ("dvc", "repro", "--force", "--single-item", "train_lora")
    evict(repo, "train_lora")

    # 1. Mid-step, before the first checkpoint (step 4): a random moment in the first steps of the loop.
    delay = draw("train_lora seconds into the loop", [0.0, 0.01, 0.02, 0.05])
    Run(repo, *force).kill_when(lambda run: "/12 [" in run.output, "the training loop", delay)
    assert checkpoints(repo, "*") == [] and tree_digest(repo / "models/lora") == reference  # persist: kept
    assert (repo / "dvc.lock").read_text() == lock

    # 2. Mid-write of the step-8 checkpoint, after one of its files; step 4 is complete by then.
    written = draw("checkpoint file written", ["lora.safetensors", "optimizer.pt", "state.json"])
    second = Run(repo, *force, env=paused_in_checkpoint(tmp_path, written, "step-00000008")).kill_when(
        lambda run: "PAUSED IN CHECKPOINT WRITE" in run.output, "the step-8 checkpoint write"
    )
    assert "resuming from" not in second.output  # run 1 left nothing to resume from
    assert checkpoints(repo) == ["step-00000004"] and checkpoints(repo, ".step-00000008.tmp-*")
    assert tree_digest(repo / "models/lora") == reference
    assert (repo / "dvc.lock").read_text() == lock

    # 3. The next repro resumes from step 4, not from the half-written step 8, and trains to the same LoRA.
    output = run(repo, "dvc", "repro", "train_lora")
    assert re.search(r"resuming from \S*step-00000004 \(step 4\)", output), output[-3000:]
    assert tree_digest(repo / "models/lora") == reference
    assert loss_curves(repo) == curves  # the log of the steps before the checkpoint is replayed
    assert checkpoints(repo, "*") == [] and "up to date" in dvc_status(repo, "train_lora")


@pytest.mark.slow
@pytest.mark.parametrize("kill", range(3))
def test_dvc_repro_killed_mid_generate_resumes_without_redrawing_to_the_same_images(repo, kill):
    """Three kills at random points (images written, then a random delay into the next image): the rerun reuses
    every image the killed run had finished (it had cached each before staging it) and writes the reference."""
    lock, reference = (repo / "dvc.lock").read_text(), digests(repo, *OUTPUTS["generate"])
    images = len([name for name in reference["data/generated"] if name.endswith(".png")])
    written = draw(f"generate images written, run {kill}", range(1, images))
    evict(repo, "generate")
    Run(repo, "dvc", "repro", "--force", "--single-item", "generate").kill_when(
        lambda _: len(staged_files(repo, "data/generated", "*/*.png")) >= written,
        f"{written} images generated",
        delay=draw(f"generate seconds after that, run {kill}", [0.0, 0.005, 0.02, 0.1]),
    )
    assert_nothing_recorded(repo, lock, reference)

    output = run(repo, "dvc", "repro", "generate")
    assert "Running stage 'generate'" in output
    reused = sum(int(count) for count in re.findall(r"generate (?:base|lora): (\d+) of \d+ images reused", output))
    assert written <= reused <= images, output[-3000:]
    assert digests(repo, *OUTPUTS["generate"]) == reference and "up to date" in dvc_status(repo)
    assert lock_outs(repo, "generate") == lock_outs(lock, "generate")
    assert temporaries(repo, "data/generated") == temporaries(repo, "reports/generate") == []
    assert not any((repo / ".lanskap-cache/generate").iterdir())  # published: the resume cache is gone


def test_remove_dir_renames_a_folder_away_before_deleting_it(tmp_path, monkeypatch):
    """A kill during the delete must not leave a half-deleted checkpoint under its own name, where a resume would
    pick it (load_checkpoint takes the newest `step-*`)."""
    import lanskap.core.io

    target = tmp_path / "step-00000004"
    (target / "inner").mkdir(parents=True)
    (target / "lora.safetensors").write_bytes(b"x")
    name_present_while_deleting, real_rmtree = [], shutil.rmtree

    def observing_rmtree(path, *args, **kwargs):
        name_present_while_deleting.append(target.exists())
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(lanskap.core.io.shutil, "rmtree", observing_rmtree)
    remove_dir(target)
    assert name_present_while_deleting == [False] and list(tmp_path.iterdir()) == []


# Injected through PYTHONPATH into the stage (`-m stages.*`) or into dvc itself: pause, say so, and hang - until killed.
#  LANSKAP_PAUSE_BEFORE_RENAME=PATH  the stage, once its output PATH is complete under its staging name, before the
#                                    rename that publishes it (the last moment a kill can catch)
#  LANSKAP_PAUSE_DVC=commit          dvc, after it copied the stage's first output into its cache, holding its lock
#  LANSKAP_PAUSE_DVC=lock            dvc, with every output committed, just before it writes dvc.lock
SECOND_HOOK = """
import os, sys, time

def pause(what):
    print("PAUSED", what, flush=True)
    time.sleep(3600)

rename_target = os.environ.get("LANSKAP_PAUSE_BEFORE_RENAME")
if rename_target and sys.orig_argv[1:2] == ["-m"]:
    real_replace = os.replace

    def replace(source, destination, *args, **kwargs):
        if os.path.abspath(destination) == os.path.abspath(rename_target):
            pause("before renaming onto " + rename_target)
        return real_replace(source, destination, *args, **kwargs)

    os.replace = replace
dvc_point = os.environ.get("LANSKAP_PAUSE_DVC")
if dvc_point and len(sys.orig_argv) > 1 and os.path.basename(sys.orig_argv[1]) == "dvc":
    if dvc_point == "commit":
        from dvc.output import Output
        real_commit = Output.commit

        def commit(self, *args, **kwargs):
            result = real_commit(self, *args, **kwargs)
            pause("in dvc's commit after " + str(self))
            return result

        Output.commit = commit
    else:
        from dvc.dvcfile import Lockfile
        real_dump = Lockfile.dump_stages

        def dump_stages(self, *args, **kwargs):
            pause("in dvc before writing dvc.lock")
            return real_dump(self, *args, **kwargs)

        Lockfile.dump_stages = dump_stages
"""
DATA_OUTPUTS = {
    "caption": ["data/captions.csv"],
    "split": ["data/split"],
    "preprocess": ["data/processed", "reports/preprocess"],
}


def hooked_env(tmp_path: Path, **variables: str) -> dict:
    (tmp_path / "hook").mkdir(exist_ok=True)
    (tmp_path / "hook" / "sitecustomize.py").write_text(SECOND_HOOK)
    return {
        **ENV,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "hook"), ENV.get("PYTHONPATH")])),
        **variables,
    }


def rerun_gives_the_reference(repo: Path, stage: str, lock: str, reference: dict) -> None:
    """The next plain `dvc repro` completes with the uninterrupted outputs, dvc.lock as before, `dvc status` clean."""
    run(repo, "dvc", "repro", stage)
    assert digests(repo, *reference) == reference
    assert (repo / "dvc.lock").read_text() == lock and "up to date" in dvc_status(repo, stage)
    assert all(temporaries(repo, output) == [] for output in reference)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["caption", "split", "preprocess"])
def test_dvc_repro_killed_before_a_data_stage_publishes_its_output(repo, tmp_path, stage):
    output = DATA_OUTPUTS[stage][0]
    lock, reference = (repo / "dvc.lock").read_text(), digests(repo, *DATA_OUTPUTS[stage])
    evict(repo, stage)
    env = hooked_env(tmp_path, LANSKAP_PAUSE_BEFORE_RENAME=str(repo / output))
    Run(repo, "dvc", "repro", "--force", "--single-item", stage, env=env).kill_when(
        lambda run: "PAUSED before renaming" in run.output, f"{stage} before publishing {output}"
    )
    assert_nothing_recorded(repo, lock, reference)
    rerun_gives_the_reference(repo, stage, lock, reference)


@pytest.mark.slow
def test_dvc_repro_killed_mid_preprocess_writes_the_same_output_next_time(repo):
    lock, reference = (repo / "dvc.lock").read_text(), digests(repo, *DATA_OUTPUTS["preprocess"])
    images = len([name for name in reference["data/processed"] if name.endswith(".png")])
    written = draw("preprocess images written", range(1, images - 3))
    evict(repo, "preprocess")
    Run(repo, "dvc", "repro", "--force", "--single-item", "preprocess").kill_when(
        lambda _: len(staged_files(repo, "data/processed", "**/*.png")) >= written, f"{written} images preprocessed"
    )
    assert_nothing_recorded(repo, lock, reference)
    rerun_gives_the_reference(repo, "preprocess", lock, reference)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["commit", "lock"])
def test_dvc_killed_in_its_own_commit_and_lock_step_recovers_on_the_next_repro(repo, tmp_path, point):
    lock, reference = (repo / "dvc.lock").read_text(), digests(repo, *DATA_OUTPUTS["split"])
    evict(repo, "split")
    Run(
        repo, "dvc", "repro", "--force", "--single-item", "split", env=hooked_env(tmp_path, LANSKAP_PAUSE_DVC=point)
    ).kill_when(lambda run: "PAUSED in dvc" in run.output, f"dvc's {point} step")
    assert (repo / "dvc.lock").read_text() == lock  # killed before it wrote the lock
    rerun_gives_the_reference(repo, "split", lock, reference)


@pytest.mark.slow
def test_ctrl_c_in_train_lora_leaves_the_tracked_outputs_as_they_were_and_says_so(repo, tmp_path):
    """The user's Ctrl-C reaches dvc and the stage (the terminal's whole process group): git stays clean."""
    run(repo, *GIT, "add", "-A")  # what earlier tests left is the baseline
    run(repo, *GIT, "commit", "-qm", "before the Ctrl-C", "--allow-empty")
    lock, before = (repo / "dvc.lock").read_text(), digests(repo, "models/lora", "dvclive/train")
    evict(repo, "train_lora")
    # Held mid-training (in the step-4 checkpoint write), so that the Ctrl-C cannot come after a fast loop ended.
    interrupted = Run(
        repo,
        "dvc",
        "repro",
        "--force",
        "--single-item",
        "train_lora",
        env=paused_in_checkpoint(tmp_path, "lora.safetensors", "step-00000004"),
    )
    deadline = time.monotonic() + 300
    while "PAUSED IN CHECKPOINT WRITE" not in interrupted.output:
        assert interrupted.process.poll() is None and time.monotonic() < deadline, interrupted.output[-3000:]
        time.sleep(0.01)
    os.killpg(interrupted.process.pid, signal.SIGINT)
    interrupted.process.wait(120)
    interrupted.reader.join()
    assert interrupted.process.returncode != 0
    assert "models/lora and dvclive/train are as they were before this run" in interrupted.output
    assert "interrupted: no output was written" in interrupted.output
    assert digests(repo, "models/lora", "dvclive/train") == before and (repo / "dvc.lock").read_text() == lock
    assert run(repo, "git", "status", "--porcelain") == ""  # the git-tracked log and metrics untouched
    shutil.rmtree(repo / ".lanskap-cache/checkpoints", ignore_errors=True)


def tiny_training(seed: int = 0):
    """Parameters, optimizer and lr scheduler as train_lora makes them, at a size a checkpoint test can afford."""
    import torch

    torch.manual_seed(seed)
    parameters = {"a.lora_A": torch.nn.Parameter(torch.randn(4, 8)), "a.lora_B": torch.nn.Parameter(torch.zeros(8, 4))}
    optimizer = torch.optim.AdamW(parameters.values(), lr=1e-2)
    return parameters, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))


def train_and_save(checkpoint_dir: Path, steps: tuple[int, ...]) -> dict[int, dict]:
    """Steps of a toy loss, a checkpoint after each step in `steps`; the parameters saved at each."""
    from lanskap.train.checkpoints import TrainingState, save_checkpoint

    parameters, optimizer, scheduler = tiny_training()
    saved = {}
    for step in range(1, max(steps) + 1):
        sum(((parameter - 1) ** 2).sum() for parameter in parameters.values()).backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
        if step in steps:
            save_checkpoint(
                checkpoint_dir, TrainingState(step=step, losses=[0.5] * step), parameters, optimizer, scheduler
            )
            saved[step] = {name: parameter.detach().clone() for name, parameter in parameters.items()}
    return saved


CHECKPOINT_FILES = ["lora.safetensors", "optimizer.pt", "state.json"]


@pytest.mark.parametrize("damaged", CHECKPOINT_FILES)
def test_a_truncated_newest_checkpoint_falls_back_to_the_spare(tmp_path, damaged, capsys):
    import torch

    from lanskap.train.checkpoints import load_checkpoint

    checkpoint_dir = tmp_path / ".lanskap-cache/checkpoints/key"
    saved = train_and_save(checkpoint_dir, (4, 8))
    newest = checkpoint_dir / "step-00000008" / damaged
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    parameters, optimizer, scheduler = tiny_training(seed=1)
    state = load_checkpoint(checkpoint_dir, parameters, optimizer, scheduler)
    assert state.step == 4 and state.losses == [0.5] * 4 and scheduler.last_epoch == 4
    assert all(torch.equal(parameters[name], saved[4][name]) for name in parameters)
    out = capsys.readouterr().out
    assert f"checkpoint {newest.parent} is damaged" in out and "trying the spare step-00000004" in out
    assert ".lanskap-cache/checkpoints/, which can be deleted" in out
    assert f"resuming from {newest.parent.with_name('step-00000004')} (step 4) (the spare)" in out


@pytest.mark.parametrize("damaged", CHECKPOINT_FILES)
def test_checkpoints_all_damaged_start_afresh_saying_so(tmp_path, damaged, capsys):
    import torch

    from lanskap.train.checkpoints import load_checkpoint

    checkpoint_dir = tmp_path / ".lanskap-cache/checkpoints/key"
    train_and_save(checkpoint_dir, (4, 8))
    for folder in checkpoint_dir.iterdir():
        (folder / damaged).write_bytes((folder / damaged).read_bytes()[:7])
    parameters, optimizer, scheduler = tiny_training(seed=1)
    fresh = {name: parameter.detach().clone() for name, parameter in parameters.items()}
    assert load_checkpoint(checkpoint_dir, parameters, optimizer, scheduler) is None
    assert all(torch.equal(parameters[name], fresh[name]) for name in parameters)  # nothing half-restored
    assert scheduler.last_epoch == 0
    out = capsys.readouterr().out
    assert out.count("is damaged") == 2 and "trying the spare step-00000004" in out and "starting afresh" in out


def test_an_undamaged_newest_checkpoint_is_the_one_resumed(tmp_path, capsys):
    """The negative control: nothing damaged, the newest is used and no damage is reported."""
    from lanskap.train.checkpoints import load_checkpoint

    checkpoint_dir = tmp_path / ".lanskap-cache/checkpoints/key"
    train_and_save(checkpoint_dir, (4, 8))
    parameters, optimizer, scheduler = tiny_training(seed=1)
    assert load_checkpoint(checkpoint_dir, parameters, optimizer, scheduler).step == 8
    assert "is damaged" not in capsys.readouterr().out
