"""The adapters: peft configs for LoRA, LoHa and LoKr, attached to a model for training, and read back.

peft's state dict (`get_peft_model_state_dict`) names each adapted layer's tensors after the layer's path; its
delta on the layer's weight W [out, in] (a conv's in: in_channels x kernel, reshaped to W's shape) is
- lora: `<path>.lora_A.weight` A [r, in], `.lora_B.weight` B [out, r]; delta = B A alpha / r;
- loha: `<path>.hada_w1_a` [out, r], `.hada_w1_b` [r, in], `.hada_w2_a` [out, r], `.hada_w2_b` [r, in];
  delta = (w1_a w1_b) * (w2_a w2_b) alpha / r, `*` the elementwise (Hadamard) product;
- lokr: `<path>.lokr_w1` [a, c] (or `.lokr_w1_a` [a, r] `.lokr_w1_b` [r, c]) and `.lokr_w2` [b, d] (or
  `.lokr_w2_a` [b, r] `.lokr_w2_b` [r, d]), out = a b, in = c d; delta = kron(w1, w2) alpha / r, whichever
  factors are full matrices (peft keeps a factor full when its larger side is at most 2 r).

Adapter weights stay float32 on a bf16/fp16 base: fp16 trainable params make the AMP grad scaler fail with
"Attempting to unscale FP16 gradients", and bf16 ones lose small updates.

peft is imported where an adapter is made or read, not here: importing it costs more than the rest of generate's
imports together, and generate needs it only once the base images are done and the LoRA is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lanskap.core.params import LoraParams

if TYPE_CHECKING:
    import peft

ADAPTER_NAME = "default"  # the name `add_adapter` gives the adapter it trains
LOADED_ADAPTER_NAME = "lora"  # the name generate (and the export check) loads the exported adapter under
ADAPTER_TITLES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}  # lora.type as written in titles


def adapter_config(params: LoraParams, target_modules: list[str]) -> peft.PeftConfig:
    """The peft config of `params.type`; each starts as an exact no-op on the base model (LoRA B = 0, LoHa
    w2_b = 0, LoKr w1 = 0)."""
    import peft

    targets = list(target_modules)
    if params.type == "loha":
        return peft.LoHaConfig(r=params.rank, alpha=params.alpha, target_modules=targets)
    if params.type == "lokr":
        return peft.LoKrConfig(
            r=params.rank,
            alpha=params.alpha,
            target_modules=targets,
            decompose_factor=params.decompose_factor,
            decompose_both=params.decompose_both,
        )
    # Gaussian or Kaiming-uniform A and zero B.
    return peft.LoraConfig(
        r=params.rank,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=targets,
        use_dora=params.use_dora,
        use_rslora=params.use_rslora,
        init_lora_weights="gaussian" if params.init_lora_weights == "gaussian" else True,
    )


def add_lora(model, params: LoraParams, target_modules: list[str]) -> list[torch.nn.Parameter]:
    """Freeze `model` (the UNet or the text encoder), attach a `params.type` adapter in float32 on `target_modules`,
    set train mode and return the trainable parameters."""
    from diffusers.training_utils import cast_training_params

    model.requires_grad_(False)  # only the adapter trains (and only it is upcast below)
    model.add_adapter(adapter_config(params, target_modules))
    model.train()  # from_pretrained returns eval mode, in which lora.dropout does nothing
    # PEFT creates the adapter in the base layer's dtype; train it in float32 whatever the frozen weights are.
    cast_training_params(model, dtype=torch.float32)
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def add_unet_lora(unet, params: LoraParams) -> list[torch.nn.Parameter]:
    return add_lora(unet, params, params.target_modules)


def peft_state_dict(model, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    import peft

    # save_embedding_layers=False: the adapters never touch embeddings, and "auto" probes the hub for a config.
    return peft.get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)


def adapter_metadata(model) -> dict:
    """The adapter's peft config as JSON-ready values, sets as sorted lists (a set's order changes per process)."""
    config = model.peft_config[ADAPTER_NAME].to_dict()
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


def adapter_module_count(model, adapter_name: str) -> int:
    """How many layers of `model` carry an adapter (LoRA, LoHa or LoKr) named `adapter_name`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(
        isinstance(module, BaseTunerLayer)
        and any(adapter_name in getattr(module, name) for name in module.adapter_layer_names)
        for module in model.modules()
    )
