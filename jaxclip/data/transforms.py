"""Image normalization, applied on device inside jitted functions."""

from __future__ import annotations

import jax.numpy as jnp

# The per-channel statistics CLIP's published preprocessing uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_images(images, dtype=jnp.float32):
    """uint8 (B, H, W, 3) -> normalized floats in the model's compute dtype."""
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
    return x.astype(dtype)
