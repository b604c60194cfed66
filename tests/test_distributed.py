"""`accelerate launch` with two CPU processes trains the same LoRA as one process at the same global batch.

Both runs see the same images, augmentations, noise and timesteps (all seeded by position in the run, not by
process); what may differ is the order of float reductions (DDP's all-reduce of two half-batch gradients against
one full-batch backward), so the weights agree to a stated tolerance rather than bit for bit.
"""

import os
import shutil
import subprocess

import pytest
import safetensors.torch
import torch
import yaml

from lanskap.lora.files import DIFFUSERS_WEIGHT_NAME
from tests.conftest import ROOT, launcher, shrink, write_params
from tests.test_data_stages import run_data_stages

# Relative to the largest weight change (B moves up to steps x lr from zero). Measured: 7.9e-5 without accumulation
# (2.4e-7 on a change of 3.0e-3) and 1.9e-4 with it; AdamW's first steps amplify float32 reduction-order noise. A
# run on other data or noise would differ by the order of the change itself, so 1e-3 leaves room for other CPUs'
# kernels and still catches any mismatch.
TOLERANCE = 1e-3


def train(workdir, out: str, launcher: list[str]) -> dict[str, torch.Tensor]:
    stage = ["-m", "stages.train_lora", "--data", "data/processed", "--out", out, "--live", f"dvclive/{out}"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(
        [*launcher, *stage], cwd=workdir, env=environment, capture_output=True, text=True, timeout=600
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "global batch 4 = batch_size" in finished.stdout
    return safetensors.torch.load_file(workdir / out / DIFFUSERS_WEIGHT_NAME)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The data stages run once (they do not depend on the training parameters), copied into each test's workdir."""
    prepared = tmp_path_factory.mktemp("distributed-data")
    write_params(prepared, shrink(yaml.safe_load((ROOT / "params.yaml").read_text())))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(prepared)
        run_data_stages(prepared)
    (prepared / "params.yaml").unlink()
    return prepared


@pytest.mark.slow
@pytest.mark.parametrize(
    ("batch_size", "accumulation", "cached_latents"), [(4, 1, 0), (2, 2, 0), (4, 1, 3)]
)  # (2, 2): gradients synced once per step
def test_two_processes_match_one_at_the_same_global_batch(
    prepared, workdir, project_params, batch_size, accumulation, cached_latents
):
    shutil.copytree(prepared, workdir, dirs_exist_ok=True)
    one_process = {
        "steps": 3,
        "batch_size": batch_size,
        "gradient_accumulation_steps": accumulation,
        "images_every": 0,
        "caption_dropout": 0.2,
        "cached_latents": cached_latents,
    }
    write_params(workdir, {**project_params, "train": {**project_params["train"], **one_process}})
    single = train(workdir, "models/one", launcher(1))

    two_processes = {**one_process, "batch_size": batch_size // 2}
    write_params(workdir, {**project_params, "train": {**project_params["train"], **two_processes}})
    accelerate = launcher(2)
    double = train(workdir, "models/two", accelerate)

    assert double.keys() == single.keys()
    largest_change = max(single[key].abs().max().item() for key in single if ".lora_B." in key)
    assert largest_change > 0  # the runs trained (B starts at zero)
    relative = {
        key: (double[key] - single[key]).abs().max().item() / max(largest_change, single[key].abs().max().item())
        for key in single
    }
    print(f"two processes vs one: largest relative difference {max(relative.values()):.2e} (tolerance {TOLERANCE})")
    assert max(relative.values()) <= TOLERANCE, max(relative, key=relative.get)
