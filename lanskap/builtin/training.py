"""What every built-in model's training shares: the optimiser and its schedule, seeded batches, the loss log."""

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lanskap.builtin.config import Training
from lanskap.core.console import progress


def optimizer_and_schedule(parameters, training: Training, weight_decay: float = 0.0):
    """AdamW with a linear warmup and a cosine decay to a tenth of the learning rate."""
    optimizer = torch.optim.AdamW(parameters, lr=training.learning_rate, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < training.warmup_steps:
            return (step + 1) / training.warmup_steps
        progress_fraction = (step - training.warmup_steps) / max(1, training.steps - training.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_fraction)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batch_indices(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless seeded epochs: each a fresh permutation of 0..count-1, cut into batches (the last one short)."""
    while True:
        order = torch.randperm(count, generator=generator)
        yield from order.split(batch_size)


@dataclass
class LossLog:
    """Rows of (step, name, value), written as a TSV beside the model; the model card quotes the last ones."""

    rows: list[tuple[int, str, float]] = field(default_factory=list)

    def add(self, step: int, name: str, value: float) -> None:
        self.rows.append((step, name, float(value)))

    def last(self, name: str) -> float:
        return next(value for _, row_name, value in reversed(self.rows) if row_name == name)

    def prefixed(self, prefix: str) -> "LossLog":
        return LossLog([(step, prefix + name, value) for step, name, value in self.rows])

    def write(self, path: Path) -> None:
        lines = ["step\tname\tvalue"] + [f"{step}\t{name}\t{value:.6g}" for step, name, value in self.rows]
        path.write_text("\n".join(lines) + "\n")


def train_loop(
    training: Training,
    model: torch.nn.Module,
    optimizer,
    schedule,
    step_loss: Callable[[int], torch.Tensor],
    held_out_loss: Callable[[], float],
    log: LossLog,
    description: str,
) -> float:
    """Run `training.steps` optimiser steps of `step_loss(step)` with gradient clipping; every `log_every` steps log
    the mean training loss and `held_out_loss()`. Returns the seconds it took."""
    start, running = time.perf_counter(), []
    for step in progress(range(training.steps), desc=description, unit="step"):
        model.train()
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if (step + 1) % training.log_every == 0 or step + 1 == training.steps:
            log.add(step + 1, "train_loss", sum(running) / len(running))
            running = []
            model.eval()
            with torch.no_grad():
                log.add(step + 1, "held_out_loss", held_out_loss())
    return time.perf_counter() - start
