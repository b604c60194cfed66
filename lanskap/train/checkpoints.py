"""The full training state saved every train.checkpoint_every steps, and restored bit-identically on resume."""

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lanskap.core.io import atomic_dir, remove_dir
from lanskap.train.ema import LoraEMA

CHECKPOINTS_KEPT = 2  # the newest is complete (atomic rename); the one before is a spare


@dataclass
class TrainingState:
    """What a resumed run needs besides the modules: where it is and what it has logged."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    validation_losses: dict[int, float] = field(default_factory=dict)
    ema_validation_losses: dict[int, float] = field(default_factory=dict)  # of the EMA weights, when train.ema_decay
    logged: list[dict] = field(default_factory=list)  # DVCLive rows, replayed on resume (DVC deletes the log)


def save_checkpoint(
    checkpoint_dir: Path,
    state: TrainingState,
    lora_parameters: dict[str, torch.nn.Parameter],
    optimizer,
    lr_scheduler,
    ema: LoraEMA | None = None,
) -> Path:
    """The full training state after `state.step` (the EMA shadows too, when on), written atomically; only the
    newest CHECKPOINTS_KEPT stay."""
    import safetensors.torch

    target = checkpoint_dir / f"step-{state.step:08d}"
    with atomic_dir(target) as staging:
        lora_tensors = {name: parameter.detach().contiguous() for name, parameter in lora_parameters.items()}
        safetensors.torch.save_file(lora_tensors, staging / "lora.safetensors")
        if ema is not None:
            safetensors.torch.save_file(ema.shadow, staging / "ema.safetensors")
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            staging / "optimizer.pt",
        )
        numpy_rng = np.random.get_state()  # noqa: NPY002 (the legacy global state is what libraries draw from)
        (staging / "state.json").write_text(
            json.dumps(
                {
                    "state": vars(state),
                    "python_rng": random.getstate(),
                    "numpy_rng": [numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]],
                }
            )
        )
    for old in sorted(checkpoint_dir.glob("step-*"))[:-CHECKPOINTS_KEPT]:
        remove_dir(old)  # never half-deleted under its own name, where a resume would pick it
    return target


def load_checkpoint(
    checkpoint_dir: Path,
    lora_parameters: dict[str, torch.nn.Parameter],
    optimizer,
    lr_scheduler,
    ema: LoraEMA | None = None,
) -> TrainingState | None:
    """Restore the newest checkpoint into the LoRA parameters, EMA, optimizer, lr scheduler and RNGs; None if
    none. (The folder is keyed by the params, train.ema_decay included: an EMA run never finds a checkpoint
    without its shadows.)"""
    import safetensors.torch

    saved = sorted(checkpoint_dir.glob("step-*"))
    if not saved:
        return None
    tensors = safetensors.torch.load_file(saved[-1] / "lora.safetensors")
    with torch.no_grad():
        for name, parameter in lora_parameters.items():
            parameter.copy_(tensors[name])
    if ema is not None:
        ema.load(safetensors.torch.load_file(saved[-1] / "ema.safetensors"))
    states = torch.load(saved[-1] / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    lr_scheduler.load_state_dict(states["lr_scheduler"])
    torch.set_rng_state(states["torch_rng"])
    if states["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda_rng"])
    document = json.loads((saved[-1] / "state.json").read_text())
    version, internal, gauss = document["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = document["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))  # noqa: NPY002 (as saved)
    state = TrainingState(**document["state"])
    state.validation_losses, state.ema_validation_losses = (  # JSON keys are str
        {int(step): loss for step, loss in losses.items()}
        for losses in (state.validation_losses, state.ema_validation_losses)
    )
    print(f"train_lora: resuming from {saved[-1]} (step {state.step})")
    return state
