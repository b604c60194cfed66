"""Generation across `accelerate launch`'s processes (GPUs or machines), with the bytes of one process.

The jobs are cut into batches of generate.batch_size in their global order, once, whatever the number of processes:
a batch's images can depend on its other members in the last bits (a conv on another batch shape rounds
differently), so the batches are the unit of work and never change composition. The main process decides which
batches still need drawing (those not all in the resume cache, lanskap.generate.resume) and hands them out
round-robin; in each round every process draws at most one batch and sends its PNG bytes to the main process, which
alone writes the stage's outputs. A process other than the main one writes only its own batches' images, into the
resume cache (each file atomically, beside its sha256), so a killed run resumes with any number of processes.

Sending the bytes, not only the cache files, keeps machines without a shared filesystem working: the main process
never reads another machine's disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lanskap.core.errors import UserError


@dataclass(frozen=True)
class Processes:
    """This process's place among `accelerate launch`'s: `rank` of `count`, the main one being rank 0."""

    rank: int = 0
    count: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, item) -> list | None:
        """Every process's `item`, in rank order, on the main process; None on the others."""
        if self.count == 1:
            return [item]
        import torch.distributed

        received = [None] * self.count if self.main else None
        torch.distributed.gather_object(item, received, dst=0)
        return received

    def broadcast(self, item):
        """The main process's `item`, on every process."""
        if self.count == 1:
            return item
        import torch.distributed

        carrier = [item]
        torch.distributed.broadcast_object_list(carrier, src=0)
        return carrier[0]


def process_state() -> Processes:
    """This process's place (a single process when run directly). Refuses a launch whose processes did not join
    one group: each would then draw everything and write the same outputs."""
    import os

    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != state.num_processes:
        raise UserError(
            f"generate: launched as {launched} processes but accelerate set up {state.num_processes}; launch with "
            "`accelerate launch --multi_gpu --num_processes N -m stages.generate ...`"
        )
    return Processes(state.process_index, state.num_processes)


def batches(jobs: list, batch_size: int) -> list[list]:
    """The jobs in batches of `batch_size`, in their global order: the same batches for any number of processes."""
    return [jobs[start : start + batch_size] for start in range(0, len(jobs), batch_size)]


def require_splittable(batch_count: int, processes: Processes) -> None:
    """Refuse more processes than batches: the extra ones would load the model and wait, holding a GPU each."""
    if processes.count > batch_count:
        raise UserError(
            f"generate: {processes.count} processes for {batch_count} batches of generate.batch_size: launch at "
            f"most {batch_count} processes, or lower generate.batch_size"
        )


def agree(value, processes: Processes, what: str):
    """`value` as the main process has it; refuses where another process has another (different code, data, or
    library versions on another machine would give other images under the same names)."""
    values = processes.gather(value)
    same = processes.broadcast(None if values is None else all(other == values[0] for other in values))
    if not same:
        raise UserError(
            f"generate: the processes disagree on {what}: run every process with the same project and environment"
        )
    return processes.broadcast(value)


def run_batches(
    groups: list[list],
    draw: Callable[[list], list[bytes]],
    cached: Callable[[list], list[bytes] | None],
    write: Callable[[list, list[bytes]], None],
    processes: Processes,
    advance: Callable[[int], None],
    reuse: Callable[[int], None],
) -> int:
    """Draw the batches of `groups` not yet cached, spread over the processes, and `write` every batch's PNG bytes on
    the main process, cached ones included. `draw(batch)` returns a batch's PNG bytes (and caches them); `cached(
    batch)` the verified cached bytes or None; on the main process's progress line, `advance(n)` counts n images
    drawn and `reuse(n)` n taken from the cache. Returns the number reused (main process; 0 elsewhere)."""
    todo = processes.broadcast(
        [index for index, batch in enumerate(groups) if cached(batch) is None] if processes.main else None
    )
    reused = 0
    if processes.main:
        for index in sorted(set(range(len(groups))) - set(todo)):
            write(groups[index], cached(groups[index]))
            reused += len(groups[index])
        reuse(reused)
    for first in range(0, len(todo), processes.count):  # one round: at most one batch per process
        mine = first + processes.rank
        drawn = (todo[mine], draw(groups[todo[mine]])) if mine < len(todo) else None
        for result in processes.gather(drawn) or []:
            if result is not None:
                write(groups[result[0]], result[1])
                advance(len(result[1]))
    return reused
