"""What the builder trains, on what, for how long: one place for every architecture, data size, step count and seed.

`FULL` is what ships in `lanskap/assets/builtin/`; `MINIATURE` builds the same models on a handful of images in
a few steps, for the test that proves the builder runs. The architectures are part of the config, so the
miniature is the real model, only trained less.
"""

from dataclasses import asdict, dataclass, replace

# The data seeds differ from the demo's `ingest.seed` (0), so no image the models learn from is a demo image.
TRAIN_SEED = 1000
HELD_OUT_SEED = 9000

TINY_SD2 = {
    # Two levels on 16 x 16 latents; cross-attention at both (down 1, mid, up 2), linear projections as SD 2.x.
    "unet": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=16,
    ),
    # Three down blocks: latents are 1/4 of the image side (SD's VAE uses 1/8 with four).
    "vae": dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=64,
        layers_per_block=1,
        block_out_channels=(16, 32, 32),
        norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    ),
    "text_encoder": dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=32,
    ),
    # SD 2.1-768's noise schedule and prediction type.
    "scheduler": dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        steps_offset=1,
    ),
}

TINY_CLIP = {
    # 336 px input like ViT-L/14-336, so the stand-in sees exactly the real model's pixels; 48 px patches
    # (7 x 7 tokens) keep it cheap. The real CLIP vocabulary and context length.
    "vision_config": dict(
        image_size=336, patch_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    ),
    "text_config": dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
    ),
    "projection_dim": 32,
}

# Strided convolutions and a global average pool: the FID stand-in's features are the pool.
TINY_INCEPTION = {"channels": [16, 32, 64], "kernel_sizes": [5, 3, 3], "strides": [4, 2, 2]}


@dataclass(frozen=True)
class Training:
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    log_every: int  # training loss is averaged over this many steps; held-out loss measured as often


@dataclass(frozen=True)
class BuildConfig:
    render_size: int  # procedural images are drawn at this size (the demo's ingest.image_size) ...
    resolution: int  # ... and resized to this one (the demo's preprocess.resolution), as preprocess does
    base_images: int  # base-world images: the text-to-image pretraining set
    fantasy_images: int  # fantasy-world images: for the VAE, CLIP and Inception stand-ins, never the UNet
    held_out_images: int  # per world, for held-out losses, retrieval and classification accuracy
    vae_images_per_world: int
    vae_crop: int  # the VAE trains on random crops: it is convolutional, and a crop costs a quarter
    vae_kl_weight: float
    vae: Training
    unet: Training
    caption_dropout: float  # empty captions in pretraining, so classifier-free guidance works
    clip_images_per_world: int
    clip: Training
    inception_images_per_world: int
    inception: Training
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


FULL = BuildConfig(
    render_size=128,
    resolution=64,
    base_images=6000,
    fantasy_images=2000,
    held_out_images=150,
    vae_images_per_world=2000,
    vae_crop=32,
    vae_kl_weight=1e-6,
    vae=Training(steps=1500, batch_size=32, learning_rate=1e-3, warmup_steps=50, log_every=100),
    unet=Training(steps=3000, batch_size=32, learning_rate=1e-3, warmup_steps=100, log_every=100),
    caption_dropout=0.1,
    clip_images_per_world=2000,
    clip=Training(steps=1500, batch_size=64, learning_rate=5e-4, warmup_steps=100, log_every=100),
    inception_images_per_world=1500,
    inception=Training(steps=1000, batch_size=32, learning_rate=1e-3, warmup_steps=50, log_every=100),
)

MINIATURE = replace(
    FULL,
    base_images=8,
    fantasy_images=8,
    held_out_images=4,
    vae_images_per_world=8,
    clip_images_per_world=8,
    inception_images_per_world=8,
    vae=replace(FULL.vae, steps=2, batch_size=4, warmup_steps=1, log_every=1),
    unet=replace(FULL.unet, steps=2, batch_size=4, warmup_steps=1, log_every=1),
    clip=replace(FULL.clip, steps=2, batch_size=4, warmup_steps=1, log_every=1),
    inception=replace(FULL.inception, steps=2, batch_size=4, warmup_steps=1, log_every=1),
)
