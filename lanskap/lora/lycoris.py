"""LoHa and LoKr tensors under LyCORIS names, scaled so that the loaders of AUTOMATIC1111 and ComfyUI compute
peft's delta.

Both loaders read a module's `alpha` (0-d) and its tensors, and add strength x scale x delta to the weight:
- LoHa (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`): delta = (w1_a w1_b) * (w2_a w2_b), reshaped to the
  weight's shape, scale = alpha / rank with rank = `hada_w1_b`'s first dimension: peft's own formula, so the
  tensors and the trained alpha are written as they are.
- LoKr (`lokr_w1` or `lokr_w1_a`/`lokr_w1_b`; `lokr_w2` or `lokr_w2_a`/`lokr_w2_b`): delta = kron(w1, w2) (w1
  given trailing unit dimensions when w2 is a conv kernel), reshaped; scale = alpha / rank, rank the first
  dimension of `lokr_w2_b` (else `lokr_w1_b`), but 1 when both factors are full matrices: there is no rank to
  divide by, and LyCORIS itself then trains at scale 1. peft scales by alpha / r in every case, so when both
  factors are full the scale is multiplied into `lokr_w1` and the alpha written is the rank (scale 1 for any
  reader that divides anyway).
"""

import torch

from lanskap.core.params import LoraParams


def lycoris_alpha(alpha: float) -> torch.Tensor:
    return torch.tensor(float(alpha), dtype=torch.float32)  # 0-d float32: the loaders call .item() on it


def loha_tensors(tensors: dict[str, torch.Tensor], params: LoraParams) -> dict[str, torch.Tensor]:
    """One module's peft LoHa tensors, named as LyCORIS names them, and its alpha."""
    return {name: weight.contiguous() for name, weight in tensors.items()} | {"alpha": lycoris_alpha(params.alpha)}


def lokr_tensors(tensors: dict[str, torch.Tensor], params: LoraParams) -> dict[str, torch.Tensor]:
    """One module's peft LoKr tensors, named as LyCORIS names them, and the alpha that gives its scale."""
    lycoris = {name: weight.contiguous() for name, weight in tensors.items()}
    if "lokr_w1" in lycoris and "lokr_w2" in lycoris:  # both full: the loaders apply scale 1
        lycoris["lokr_w1"] = lycoris["lokr_w1"] * (params.alpha / params.rank)
        return lycoris | {"alpha": lycoris_alpha(params.rank)}
    return lycoris | {"alpha": lycoris_alpha(params.alpha)}
