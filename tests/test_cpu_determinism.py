"""The same bytes on any x86-64 CPU: training and generation do not depend on the code paths the machine's math
libraries would pick, nor on its thread count (lanskap/core/determinism.py, applied by `stages/__init__.py`).

One machine stands in for many: the libraries are told to take other paths (PyTorch's scalar kernels, oneDNN's
SSE4.1, MKL's SSE2 branch, two threads), as a CPU without AVX2, or one with AVX-512 and more cores, would have
them do. Pinned runs must give the same bytes regardless; unpinned ones must not (the negative control)."""

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lanskap.core.determinism import PINNED, SWITCH, cpu_flags, pinned_settings
from tests.conftest import DATA_STAGE_COMMANDS, ROOT, copy_project, shrink, write_params

OTHER_MACHINE = {
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "MKL_CBWR": "COMPATIBLE",
    "OMP_NUM_THREADS": "2",
}
x86_with_avx2 = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not {"avx2", "fma"} <= (cpu_flags() or set()),
    reason="needs x86-64 with AVX2",
)


def stage(project: Path, env: dict, *args: str) -> None:
    base = {name: value for name, value in os.environ.items() if name not in PINNED and name != SWITCH}
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=project, env={**base, **env}, capture_output=True, text=True
    )
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stderr[-3000:]}"


def digest(paths: list[Path]) -> str:
    return hashlib.sha256(b"".join(path.read_bytes() for path in paths)).hexdigest()


def lora_digest(project: Path, env: dict, name: str) -> str:
    """Train under `env`; the sha256 of the LoRA weights."""
    stage(
        project,
        env,
        "stages.train_lora",
        "--data",
        "data/processed",
        "--out",
        f"runs/{name}/lora",
        "--live",
        f"runs/{name}/live",
    )
    return digest([project / "runs" / name / "lora" / "pytorch_lora_weights.safetensors"])


def lora_and_images_digest(project: Path, env: dict, name: str) -> str:
    """Train and generate under `env`; the sha256 of the LoRA weights and every generated image."""
    lora = lora_digest(project, env, name)
    out = project / "runs" / name
    stage(
        project,
        env,
        "stages.generate",
        "--data",
        "data/processed",
        "--lora",
        str(out / "lora"),
        "--out",
        str(out / "generated"),
        "--reports",
        str(out / "reports"),
    )
    return lora + digest(sorted((out / "generated").rglob("*.png")))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("cpu-math") / "project")
    write_params(project, shrink(yaml.safe_load((ROOT / "params.yaml").read_text())))
    for command in DATA_STAGE_COMMANDS:
        stage(project, {}, *command)
    return project


@pytest.mark.slow
@x86_with_avx2
def test_pinned_runs_give_the_same_bytes_whatever_the_libraries_would_choose(project):
    here = lora_and_images_digest(project, {}, "pinned-here")
    elsewhere = lora_and_images_digest(project, OTHER_MACHINE, "pinned-elsewhere")
    assert here == elsewhere


@pytest.mark.slow
@x86_with_avx2
def test_unpinned_runs_differ_there_the_negative_control(project):
    native = {SWITCH: "native", "OMP_NUM_THREADS": "1"}
    assert lora_digest(project, native, "native-here") != lora_digest(
        project, {**native, **OTHER_MACHINE}, "native-elsewhere"
    )


@x86_with_avx2
def test_every_stage_runs_pinned_whatever_the_environment_says():
    probe = (
        "import os, stages, torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), "
        "os.environ['MKL_CBWR'])"
    )
    env = {**os.environ, **OTHER_MACHINE}
    env.pop(SWITCH, None)
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.stdout.split() == ["AVX2", "1", PINNED["MKL_CBWR"]], result.stderr[-2000:]


def test_an_unknown_switch_value_is_refused_naming_both_choices(monkeypatch):
    monkeypatch.setenv(SWITCH, "fast")
    with pytest.raises(SystemExit, match="(?s)LANSKAP_CPU_MATH='fast'.*pinned.*native"):
        pinned_settings()


def test_a_cpu_without_avx2_is_told_how_to_run_anyway(monkeypatch):
    from lanskap.core import determinism

    monkeypatch.delenv(SWITCH, raising=False)
    monkeypatch.setattr(determinism.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(determinism, "cpu_flags", lambda: {"sse4_2", "avx"})
    with pytest.raises(SystemExit, match="(?s)lacks avx2, fma.*LANSKAP_CPU_MATH=native"):
        pinned_settings()
    monkeypatch.setenv(SWITCH, "native")
    assert pinned_settings() == {}


def test_cpu_bf16_counts_as_native_only_with_the_instructions_and_unpinned_math(monkeypatch):
    from lanskap.core import determinism

    monkeypatch.setattr(determinism, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    monkeypatch.delenv(SWITCH, raising=False)
    assert not determinism.native_bf16_cpu()  # the pinned AVX2 paths emulate bf16
    monkeypatch.setenv(SWITCH, "native")
    assert determinism.native_bf16_cpu()
    monkeypatch.setattr(determinism, "cpu_flags", lambda: {"avx2", "fma"})
    assert not determinism.native_bf16_cpu()
