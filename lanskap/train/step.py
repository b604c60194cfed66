"""One training step: caption conditioning, the denoising loss, gradient accumulation and the optimizer step."""

from contextlib import ExitStack

import torch
import torch.nn.functional as F

from lanskap.core.errors import UserError
from lanskap.core.params import TrainParams
from lanskap.train.batches import NOISE_STREAM, BatchShare, derived_seed
from lanskap.train.latents import Posterior, posterior_of
from lanskap.train.setup import Components, Trainer


def tokenize(captions: list[str], tokenizer) -> torch.Tensor:
    """CLIP token ids [n, 77], padded and truncated as SD 2.x's pipeline does."""
    return tokenizer(
        captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


class CaptionEncoder:
    """Caption ids -> encoder_hidden_states [B, 77, hidden]. The last id is the empty caption (caption dropout).

    With a frozen text encoder the states of each distinct caption are computed once, not once per step; with a
    trained one (text-encoder LoRA) the encoder runs on every batch's tokens."""

    def __init__(self, captions: list[str], parts: Components, device, text_encoder_trains: bool):
        self.empty_id = len(captions)
        self.token_ids = tokenize([*captions, ""], parts.tokenizer).to(device)  # [n + 1, 77]
        self.table = None if text_encoder_trains else self.frozen_states(parts.text_encoder)

    @torch.inference_mode()
    def frozen_states(self, text_encoder) -> torch.Tensor:
        states = [text_encoder(ids[None])[0] for ids in self.token_ids]  # one at a time: batch-size independent
        return torch.cat(states).clone()  # clone: leave inference mode so autograd can use it as an input

    def __call__(self, text_encoder, caption_ids: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            return self.table[caption_ids]
        return text_encoder(self.token_ids[caption_ids])[0]


def training_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet learns to predict, as the base model was trained: never silently changed."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(
        f"model scheduler has prediction_type={prediction_type!r}; only epsilon and v_prediction are supported"
    )


def min_snr_weights(noise_scheduler, timesteps, snr_gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), one per sample: min(SNR, gamma) / SNR for an epsilon target
    and min(SNR, gamma) / (SNR + 1) for a v target, whose loss is already SNR + 1 times the epsilon one."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=snr_gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(
    parts: Components,
    posterior: Posterior,
    encoder_hidden_states,
    generator: torch.Generator,
    share: BatchShare | None = None,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """The denoising loss of one batch: the VAE posterior of its images (latents.encode, or the latent cache),
    states [B, 77, hidden].

    Random draws come from `generator` for the global batch `share` belongs to (None: this batch is the whole),
    the latent sampled from the posterior first, so a cached and an encoded posterior draw the same numbers.
    noise_offset adds per-channel constant noise (lets the model shift mean brightness); snr_gamma weights each
    sample by min-SNR. Both default off, as the validation loss uses it."""
    share = share or BatchShare(posterior.mean.shape[0])
    latents = posterior.mean + posterior.std * share.randn(posterior.mean.shape[1:], generator, posterior.mean.dtype)
    latents = latents * parts.vae.config.scaling_factor  # [B, 4, H/f, W/f]
    noise = share.randn(latents.shape[1:], generator, latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * share.randn((latents.shape[1], 1, 1), generator, latents.dtype)
    timesteps = share.randint(parts.noise_scheduler.config.num_train_timesteps, generator)
    noisy_latents = parts.noise_scheduler.add_noise(latents, noise, timesteps)
    target = training_target(parts.noise_scheduler, latents, noise, timesteps)
    prediction = parts.unet(noisy_latents, timesteps, encoder_hidden_states.to(noisy_latents.dtype)).sample
    if snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(parts.noise_scheduler, timesteps, snr_gamma)).mean()


def drop_captions(
    caption_ids: torch.Tensor, empty_id: int, probability: float, generator, share: BatchShare
) -> torch.Tensor:
    """Replace each sample's caption by the empty caption with `probability` (teaches the unconditional prediction
    classifier-free guidance uses). Draws no random numbers when off, so default runs are unchanged."""
    if not probability:
        return caption_ids
    dropped = share.rand(generator) < probability
    return torch.where(dropped, torch.full_like(caption_ids, empty_id), caption_ids)


def check_finite(loss: torch.Tensor, step: int, params: TrainParams) -> None:
    if not torch.isfinite(loss):
        raise UserError(
            f"train_lora: loss is {loss.item()} at step {step}. Likely causes: train.mixed_precision=fp16 with "
            "SD 2.x (its attention overflows in fp16: use bf16 or no), or train.learning_rate="
            f"{params.learning_rate} too high. Nothing was saved."
        )


def accumulate_gradients(
    trainer: Trainer, batches, captions: CaptionEncoder, params: TrainParams, first_micro_batch: int
) -> tuple[torch.Tensor, int]:
    """Backward over gradient_accumulation_steps micro-batches, numbered from `first_micro_batch` (which seeds
    their noise); return their mean loss (detached) and this process's image count. Gradients are averaged across
    processes once, on the last micro-batch."""
    accelerator, parts = trainer.accelerator, trainer.wrapped
    losses, images = [], 0
    for micro in range(params.gradient_accumulation_steps):
        inputs, caption_ids = next(batches)  # pixels [B, 3, H, W] or, with train.cached_latents, a Posterior
        inputs = inputs.to(accelerator.device, non_blocking=True)
        caption_ids = caption_ids.to(accelerator.device, non_blocking=True)
        generator = torch.Generator(accelerator.device).manual_seed(
            derived_seed(params.seed, NOISE_STREAM, first_micro_batch + micro)
        )
        caption_ids = drop_captions(caption_ids, captions.empty_id, params.caption_dropout, generator, trainer.share)
        with ExitStack() as stack:
            if micro < params.gradient_accumulation_steps - 1:
                for module in {parts.unet, parts.text_encoder}:
                    stack.enter_context(accelerator.no_sync(module))
            with accelerator.autocast():
                encoder_hidden_states = captions(parts.text_encoder, caption_ids)
                loss = diffusion_loss(
                    parts,
                    posterior_of(parts.vae, inputs),
                    encoder_hidden_states,
                    generator,
                    trainer.share,
                    params.noise_offset,
                    params.snr_gamma,
                )
            accelerator.backward(loss / params.gradient_accumulation_steps)
        losses.append(loss.detach())
        images += caption_ids.shape[0]
    return accelerator.reduce(torch.stack(losses).mean(), "mean"), images


def optimizer_step(accelerator, lora_parameters: list, optimizer, lr_scheduler, max_grad_norm: float) -> None:
    accelerator.clip_grad_norm_(lora_parameters, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
