"""An exponential moving average (EMA) of the LoRA weights: updated after each optimizer step, validated beside the
trained weights, saved in checkpoints and exported as a second LoRA."""

from contextlib import contextmanager

import torch

from lanskap.core.params import TrainParams
from lanskap.train.optimizers import restored_afterwards

WARMUP_OFFSET = 10  # diffusers' EMAModel: decay_t <= (1 + s) / (10 + s)


class LoraEMA:
    """Float32 shadows of the LoRA parameters. Update t (t = 1, 2, ... after each optimizer step) sets

        shadow = decay_t * shadow + (1 - decay_t) * parameter

    With warm-up, decay_t = min(decay, (1 + s) / (10 + s)) with s = t - 1, and decay_1 = 0 (diffusers' EMAModel
    with its defaults): the shadow starts at the first step's weights and averages over a window that grows with
    the run, so an early run is not pulled towards the initial adapter (B = 0, the base model). Without it,
    decay_t = decay from the first update, from a shadow of the initial weights."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float, warmup: bool):
        self.parameters, self.decay, self.warmup = parameters, decay, warmup
        self.shadow = {name: parameter.detach().float().clone() for name, parameter in parameters.items()}

    def decay_at(self, update: int) -> float:
        """decay_t of update number `update` (from 1)."""
        if not self.warmup:
            return self.decay
        since_first = update - 1
        if since_first <= 0:
            return 0.0
        return min(self.decay, (1 + since_first) / (WARMUP_OFFSET + since_first))

    @torch.no_grad()
    def update(self, update: int) -> None:
        weight = 1.0 - self.decay_at(update)
        for name, parameter in self.parameters.items():
            self.shadow[name].lerp_(parameter.detach().float(), weight)  # shadow + (1 - decay_t)(parameter - shadow)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the shadows saved in a checkpoint (exactly: the same float32 bytes)."""
        for name, shadow in self.shadow.items():
            shadow.copy_(tensors[name])

    @contextmanager
    def applied(self):
        """The EMA weights in the LoRA parameters for the block (validation, export); the trained weights are
        restored from a copy afterwards, bit for bit."""
        with restored_afterwards(list(self.parameters.values())):
            with torch.no_grad():
                for name, parameter in self.parameters.items():
                    parameter.copy_(self.shadow[name])
            yield


def make_ema(parameters: dict[str, torch.nn.Parameter], params: TrainParams) -> LoraEMA | None:
    """The EMA train.ema_decay asks for, or None when it is off."""
    if params.ema_decay is None:
        return None
    return LoraEMA(parameters, params.ema_decay, params.ema_warmup)
