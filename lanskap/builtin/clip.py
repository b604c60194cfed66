"""The built-in CLIP stand-in: image and text towers trained contrastively (CLIP's symmetric InfoNCE loss) on
procedural image/caption pairs from both worlds, so that CMMD and CLIP score on the demo measure something.
Images go through exactly the preprocessing evaluate uses (`features.clip_pixels`: centre square, PIL bicubic
to 336 px, CLIP normalisation); captions through the real CLIP tokenizer."""

import numpy as np
import torch
from PIL import Image

from lanskap.builtin.config import TINY_CLIP, BuildConfig
from lanskap.builtin.training import LossLog, batch_indices, optimizer_and_schedule, train_loop
from lanskap.builtin.worlds import WorldImages
from lanskap.evaluate.features import CLIP_CONTEXT_LENGTH, clip_pixels


def clip_inputs(tokenizer, images: WorldImages, rows, image_size: int) -> dict:
    pixels = np.stack([clip_pixels(Image.fromarray(images.pixels[row]), image_size) for row in rows.tolist()])
    tokens = tokenizer(
        [images.captions[row] for row in rows.tolist()],
        padding="max_length",
        max_length=CLIP_CONTEXT_LENGTH,
        truncation=True,
        return_tensors="pt",
    )
    return {
        "pixel_values": torch.from_numpy(pixels),
        "input_ids": tokens.input_ids,
        "attention_mask": tokens.attention_mask,
    }


def train_clip(config: BuildConfig, tokenizer, images: WorldImages, held_out: WorldImages, log: LossLog):
    """Train the CLIPModel from scratch; returns (model, seconds)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(config.seed)
    model = CLIPModel(
        CLIPConfig(
            text_config=TINY_CLIP["text_config"],
            vision_config=TINY_CLIP["vision_config"],
            projection_dim=TINY_CLIP["projection_dim"],
        )
    )
    image_size = TINY_CLIP["vision_config"]["image_size"]
    generator = torch.Generator().manual_seed(config.seed)
    batches = batch_indices(len(images), config.clip.batch_size, generator)
    optimizer, schedule = optimizer_and_schedule(model.parameters(), config.clip, weight_decay=0.1)
    held_out_batch = clip_inputs(tokenizer, held_out, torch.arange(len(held_out)), image_size)

    def step_loss(step: int) -> torch.Tensor:
        return model(**clip_inputs(tokenizer, images, next(batches), image_size), return_loss=True).loss

    def held_out_loss() -> float:  # over all held-out pairs at once, so it is not comparable to the batch loss
        return model(**held_out_batch, return_loss=True).loss.item()

    seconds = train_loop(config.clip, model, optimizer, schedule, step_loss, held_out_loss, log, "train CLIP")
    return model.eval(), seconds


def retrieval_accuracy(image_embeddings: np.ndarray, caption_embeddings: np.ndarray, captions: list[str]) -> dict:
    """Top-1 retrieval among the held-out pairs by cosine similarity (rows are L2-normalised). A retrieved
    caption counts as right when its text equals the true one (the worlds repeat some captions); chance is what a
    random pick scores."""
    similarity = image_embeddings @ caption_embeddings.T  # [n images, n captions]
    captions = np.asarray(captions)
    image_to_text = captions[similarity.argmax(axis=1)] == captions
    text_to_image = captions[similarity.argmax(axis=0)] == captions
    return {
        "image_to_caption_top1": float(image_to_text.mean()),
        "caption_to_image_top1": float(text_to_image.mean()),
        "chance": float((captions[:, None] == captions[None, :]).mean()),
        "pairs": len(captions),
    }
