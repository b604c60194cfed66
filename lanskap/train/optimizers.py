"""The optimizer and its learning-rate schedule, and the weights schedule-free AdamW evaluates on."""

from contextlib import contextmanager

import torch

from lanskap.core.errors import UserError
from lanskap.core.params import TrainParams

SCHEDULE_FREE = "adamw_schedulefree"


def make_optimizer(parameter_groups: list[dict], params: TrainParams, fused: bool | None = None):
    """The train.optimizer over parameter groups that may carry their own "lr", and its lr scheduler; `fused` picks
    torch's single-kernel AdamW (None: torch's default).

    AdamW (torch's, or bitsandbytes' 8-bit one); Prodigy, whose step is its own estimate of the distance to the
    solution times the lr (so lr is about 1.0, and the scheduler scales it as usual); schedule-free AdamW, whose
    warm-up is its own (train.warmup_steps) under a constant schedule, and which starts in train mode."""
    from diffusers.optimization import get_scheduler

    settings = {
        "lr": params.learning_rate,
        "betas": (params.adam_beta1, params.adam_beta2),
        "weight_decay": params.adam_weight_decay,
        "eps": params.adam_epsilon,
    }
    if params.optimizer == "adamw8bit":
        optimizer = optional_module("bitsandbytes", params).optim.AdamW8bit(parameter_groups, **settings)
    elif params.optimizer == "prodigy":
        # safeguard_warmup: Prodigy's advice under an lr warm-up, whose small early lr would inflate its estimate
        optimizer = optional_module("prodigyopt", params).Prodigy(
            parameter_groups, **settings, safeguard_warmup=params.warmup_steps > 0
        )
    elif params.optimizer == SCHEDULE_FREE:
        optimizer = optional_module("schedulefree", params).AdamWScheduleFree(
            parameter_groups, **settings, warmup_steps=params.warmup_steps
        )
        optimizer.train()  # it refuses to step in eval mode
    else:
        optimizer = torch.optim.AdamW(parameter_groups, fused=fused, **settings)
    lr_scheduler = get_scheduler(
        params.lr_scheduler, optimizer, num_warmup_steps=params.warmup_steps, num_training_steps=params.steps
    )
    return optimizer, lr_scheduler


INSTALL = {  # the optional package of each optimizer, and how to get it
    "bitsandbytes": "`uv pip install bitsandbytes` (CUDA machines)",
    "prodigyopt": "`uv pip install prodigyopt` (or install lanskap with the extra [optimizers])",
    "schedulefree": "`uv pip install schedulefree` (or install lanskap with the extra [optimizers])",
}


def optional_module(name: str, params: TrainParams):
    """The optional package train.optimizer needs, or a UserError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(
            f"train.optimizer={params.optimizer} needs {name}, which is not installed: {INSTALL[name]}, "
            "or set train.optimizer: adamw"
        ) from None


@contextmanager
def evaluation_weights(optimizer, params: TrainParams, parameters: list[torch.nn.Parameter]):
    """The weights to validate and export in place of the trained ones, for the block.

    Schedule-free AdamW steps on an interpolation y of its iterates and evaluates on their average x: optimizer
    .eval() swaps x in. Its .train() swaps y back by the inverse interpolation, which is not exact in floating point,
    so y is restored from a copy instead: validating then changes nothing in training. Other optimizers train on the
    weights they evaluate: nothing to do."""
    if params.optimizer != SCHEDULE_FREE:
        yield
        return
    with restored_afterwards(parameters):
        optimizer.eval()
        try:
            yield
        finally:
            optimizer.train()


@contextmanager
def restored_afterwards(parameters: list[torch.nn.Parameter]):
    """Whatever the block puts in the parameters, they hold their values again afterwards, bit for bit (from a
    copy, not by undoing the change)."""
    saved = [parameter.detach().clone() for parameter in parameters]
    try:
        yield
    finally:
        with torch.no_grad():
            for parameter, value in zip(parameters, saved):
                parameter.copy_(value)


def keep_evaluation_weights(optimizer, params: TrainParams) -> None:
    """After the last step: leave in the parameters the weights to export (schedule-free AdamW's average x)."""
    if params.optimizer == SCHEDULE_FREE:
        optimizer.eval()
