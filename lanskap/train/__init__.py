"""LoRA fine-tuning of a Stable Diffusion 2.x UNet with diffusers, peft and accelerate.

One training step (step.py), in diffusers vocabulary:
    pixel_values --vae--> posterior (mean, std; or cached) --sample--> latents; noise ~ N(0, 1); timesteps ~ U{0, T-1}
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise (epsilon) or noise_scheduler.get_velocity(...) (v_prediction), from the scheduler config
    loss = mse(unet(noisy_latents, timesteps, encoder_hidden_states), target)
Only the LoRA parameters train (in fp32, whatever the frozen weights' dtype): the UNet's, and the text encoder's
when train.text_encoder_learning_rate is set. A frozen text encoder runs once per distinct caption, not once per
step. Augmented images are VAE-encoded on the fly each step, or, with train.cached_latents: K, K augmented
variants of each image are encoded once before training and each step samples from one of them (latents.py).

Randomness is a function of the seed and the position in the run only: each image's augmentation is seeded by
its place in the data sequence, and each micro-batch's noise, timesteps and caption dropout are drawn for the
global batch from a generator seeded by the micro-batch number. A resumed run, and a run split over N processes
by `accelerate launch`, therefore train on exactly what one uninterrupted process trains on.

Modules, in the order a run uses them: setup (model parts, adapters, accelerate), optimizers (AdamW, 8-bit AdamW,
Prodigy, schedule-free AdamW), batches (which images, aspect-ratio buckets, augmentation seeds, process shares),
latents (VAE posteriors, on the fly or cached), step (loss and update), ema (moving average of the adapter
weights), monitor (validation loss, images, DVCLive), checkpoints (save and resume), loop (train_lora, which ties
them together).
"""
