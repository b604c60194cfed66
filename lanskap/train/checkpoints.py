"""The full training state saved every train.checkpoint_every steps, and restored bit-identically on resume.

A checkpoint is written atomically, but a disk can still damage it later (a full disk while copying the cache, a bad
sector, a user's editor): a damaged newest checkpoint is read in full and refused before anything is restored, then
the spare is tried, then training starts afresh; each step says so. (Damaged checkpoints are left for the next save
to replace or prune: with several processes, each reads them.)
"""

import json
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from lanskap.core.io import atomic_dir, remove_dir
from lanskap.train.ema import LoraEMA

CHECKPOINTS_KEPT = 2  # the newest is complete (atomic rename); the one before is a spare
# What reading a truncated or overwritten checkpoint file raises: safetensors' own error, torch.load's (zip and
# unpickling), JSON's (a ValueError), a file or tensor that is missing (OSError, KeyError), a wrong shape or state.
SAVED_KEYS = {
    "states": {"optimizer", "lr_scheduler", "torch_rng", "cuda_rng"},
    "document": {"state", "python_rng", "numpy_rng"},
}
DAMAGED = (SafetensorError, RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError, TypeError)


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
    """Restore the newest readable checkpoint into the LoRA parameters, EMA, optimizer, lr scheduler and RNGs; None
    if there is none (a fresh start). Damaged checkpoints are named and skipped. (The folder is keyed by the params,
    train.ema_decay included: an EMA run never finds a checkpoint without its shadows.)"""
    saved = sorted(checkpoint_dir.glob("step-*"), reverse=True)
    for index, folder in enumerate(saved):
        try:
            contents = read_checkpoint(folder, lora_parameters, ema is not None)
        except DAMAGED as error:
            fallback = f"trying the spare {saved[index + 1].name}" if index + 1 < len(saved) else "starting afresh"
            print(
                f"train_lora: checkpoint {folder} is damaged ({type(error).__name__}: {str(error)[:200]}); "
                f"{fallback}. (Checkpoints live in .lanskap-cache/checkpoints/, which can be deleted: training "
                "then starts afresh.)"
            )
            continue
        state = restore(contents, lora_parameters, optimizer, lr_scheduler, ema)
        print(f"train_lora: resuming from {folder} (step {state.step})" + (" (the spare)" if index else ""))
        return state
    return None


def read_checkpoint(folder: Path, lora_parameters: dict, with_ema: bool) -> dict:
    """Every file of a checkpoint, read in full and checked against the parameters, before anything is restored."""
    import safetensors.torch

    contents = {
        "lora": safetensors.torch.load_file(folder / "lora.safetensors"),
        "ema": safetensors.torch.load_file(folder / "ema.safetensors") if with_ema else None,
        "states": torch.load(folder / "optimizer.pt", weights_only=True),
        "document": json.loads((folder / "state.json").read_text()),
    }
    for part, keys in SAVED_KEYS.items():
        missing = keys - set(contents[part]) if isinstance(contents[part], dict) else keys
        if missing:
            raise KeyError(f"{part} lacks {sorted(missing)}")
    for name, parameter in lora_parameters.items():
        if contents["lora"][name].shape != parameter.shape:
            raise ValueError(f"{name} has shape {tuple(contents['lora'][name].shape)}, not {tuple(parameter.shape)}")
    return contents


def restore(contents: dict, lora_parameters: dict, optimizer, lr_scheduler, ema: LoraEMA | None) -> TrainingState:
    with torch.no_grad():
        for name, parameter in lora_parameters.items():
            parameter.copy_(contents["lora"][name])
    if ema is not None:
        ema.load(contents["ema"])
    states = contents["states"]
    optimizer.load_state_dict(states["optimizer"])
    lr_scheduler.load_state_dict(states["lr_scheduler"])
    torch.set_rng_state(states["torch_rng"])
    if states["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda_rng"])
    document = contents["document"]
    version, internal, gauss = document["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = document["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))  # noqa: NPY002 (as saved)
    state = TrainingState(**document["state"])
    state.validation_losses, state.ema_validation_losses = (  # JSON keys are str
        {int(step): loss for step, loss in losses.items()}
        for losses in (state.validation_losses, state.ema_validation_losses)
    )
    return state
