"""Adapters on the UNet (and optionally the text encoder): LoRA, LoHa or LoKr (`lora.type`), attached through peft
for training and exported in the formats users load.

Modules: adapters (the peft configs, attaching them, counting and reading them), kohya (the AUTOMATIC1111 /
ComfyUI file: kohya module names, LoRA tensors, `ss_*`/`modelspec.*` metadata), lycoris (LoHa and LoKr tensors
under LyCORIS names, scaled as those loaders scale them), files (writing every file of a run, and loading them
back with a check that every trained module returned).
"""
