"""LIFT's trainable side: a mean-pooled ViT and a two-layer head into a frozen text space.

The text side is a frozen encoder whose caption embeddings were computed offline, so the
model has no text tower: no text forward or backward happens in a LIFT step. The model
takes the stored embedding as its text input and returns what a CLIP model returns
(`image`, `text`, `scale`, `bias`), so the train step treats both alike. The head is
Linear(width -> d) -> GELU -> Linear(d -> d), d = the text encoder's dimension
(Yang et al. 2025, arXiv 2506.04209).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxclip.models.layers import const_param, l2_normalize, normal_param
from jaxclip.models.vit import VisionTransformer


class LiftHead(nnx.Module):
    """Linear(width -> d) -> GELU -> Linear(d -> d)."""

    def __init__(self, width: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.fc1 = normal_param(rngs, (width, dim), width**-0.5, ("embed", "mlp"))
        self.fc1_bias = const_param((dim,), 0.0, ("mlp",))
        self.fc2 = normal_param(rngs, (dim, dim), dim**-0.5, ("mlp", "proj"))
        self.fc2_bias = const_param((dim,), 0.0, ("proj",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        x = x.astype(dt) @ self.fc1[...].astype(dt) + self.fc1_bias[...].astype(dt)
        x = jax.nn.gelu(x, approximate=False)
        return x @ self.fc2[...].astype(dt) + self.fc2_bias[...].astype(dt)


class LiftModel(nnx.Module):
    def __init__(
        self,
        image: VisionTransformer,
        *,
        embed_dim: int,
        init_logit_scale: float = math.log(1 / 0.07),
        logit_bias: float | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if image.out_dim != image.width:
            raise ValueError("LIFT's image tower has no projection of its own: use proj_dim=None.")
        self.dtype = dtype
        self.image = image
        self.head = LiftHead(image.width, embed_dim, dtype=dtype, rngs=rngs)
        self.logit_scale = const_param((), init_logit_scale, ())
        self.logit_bias = None if logit_bias is None else const_param((), logit_bias, ())
        self.out_dim = embed_dim

    def encode_image(self, images: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        features, _ = self.image(images, rng=rng)
        return l2_normalize(self.head(features).astype(jnp.float32))

    def encode_patches(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) -> the ViT's per-patch features (B, N, width) float32, after ln_post
        and before pooling and the head."""
        return self.image.encode_patches(images)

    def scale(self) -> jax.Array:
        return jnp.exp(self.logit_scale[...].astype(jnp.float32))  # bounded by the train step

    def bias(self) -> jax.Array | None:
        return None if self.logit_bias is None else self.logit_bias[...].astype(jnp.float32)

    def __call__(
        self, images: jax.Array, text_emb: jax.Array, *, rng: jax.Array | None = None
    ) -> dict:
        """Images and the captions' stored embeddings -> dict(image, text, scale, bias).
        `rng` (training only) draws the image tower's patch dropout."""
        return {
            "image": self.encode_image(images, rng=rng),
            "text": l2_normalize(text_emb.astype(jnp.float32)),
            "scale": self.scale(),
            "bias": self.bias(),
        }
