"""The optimizer and its learning-rate schedule."""

import torch

from lanskap.errors import UserError
from lanskap.params import TrainParams

def make_optimizer(parameter_groups: list[dict], params: TrainParams, fused: bool | None = None):
    """AdamW (torch's, or bitsandbytes' 8-bit one) over parameter groups that may carry their own "lr", and its lr
    scheduler; `fused` picks torch's single-kernel AdamW (None: torch's default)."""
    from diffusers.optimization import get_scheduler

    settings = {"lr": params.learning_rate, "betas": (params.adam_beta1, params.adam_beta2),
                "weight_decay": params.adam_weight_decay, "eps": params.adam_epsilon}
    if params.optimizer == "adamw8bit":
        optimizer = bitsandbytes_module().optim.AdamW8bit(parameter_groups, **settings)
    else:
        optimizer = torch.optim.AdamW(parameter_groups, fused=fused, **settings)
    lr_scheduler = get_scheduler(params.lr_scheduler, optimizer, num_warmup_steps=params.warmup_steps,
                                 num_training_steps=params.steps)
    return optimizer, lr_scheduler


def bitsandbytes_module():
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("train.optimizer=adamw8bit needs bitsandbytes, which is not installed: `uv pip install "
                        "bitsandbytes` (CUDA machines), or set train.optimizer: adamw") from None
    return bitsandbytes
