"""Which reduced precisions a base model and a device can run: one rule for train_lora and generate.

fp16: SD 2.1-768's UNet sets `upcast_attention` because its attention scores overflow in fp16, which the SDPA
attention diffusers uses does not honour, and its VAE decodes NaNs in fp16 at 768 px: training ends in NaN losses
hours in, sampling in black images. Refused for such a model, with the reason.

bf16 on a CPU: without bf16 instructions, or with the math libraries pinned to their AVX2 paths
(lanskap/core/determinism.py), every bf16 op is emulated; a conv of SD 2.1-768 took over 120 s against 1.1 s in
fp32. Refused there, naming the two ways out.
"""

import json
from pathlib import Path

from lanskap.core.determinism import SWITCH, native_bf16_cpu
from lanskap.core.errors import UserError


def fp16_overflows(model_dir: Path) -> bool:
    """Whether the model's UNet config asks for fp32 attention scores (SD 2.1-768 does)."""
    config = json.loads((Path(model_dir) / "unet" / "config.json").read_text())
    return bool(config.get("upcast_attention"))


def require_fp16_safe(model_dir: Path, key: str, instead: str) -> None:
    if fp16_overflows(model_dir):
        raise UserError(
            f"{key}=fp16 with {model_dir}: its UNet sets upcast_attention (as SD 2.1-768 does) because its "
            f"attention overflows in fp16, and its VAE decodes NaNs in fp16 at 768 px. Set {instead}"
        )


def require_fast_bf16(device_type: str, key: str, instead: str) -> None:
    """Refuse bf16 on a CPU that would emulate it (see the module's docstring); any CUDA device passes."""
    if device_type == "cpu" and not native_bf16_cpu():
        raise UserError(
            f"{key}=bf16 on this CPU: it would emulate bf16, about 100x slower than fp32, because the CPU has no "
            f"bf16 instructions (avx512_bf16, amx_bf16) or the math is pinned to AVX2 ({SWITCH} is not `native`). "
            f"Set {instead}, or run on a GPU"
        )
