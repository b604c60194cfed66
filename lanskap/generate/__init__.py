"""The generate stage: sampling (every test caption with the base model and with base + LoRA, same seed per
pair)."""
