"""The generate stage: sampling (every test caption with the base model and with base + LoRA, same seed per
pair), resume (the finished batches kept for a killed run) and shards (the batches shared among `accelerate
launch`'s processes, with the bytes of one)."""
