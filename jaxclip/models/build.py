"""Builds the towers of each model kind from the `model` section of a config.

`jaxclip/model_kinds.py` decides which builder a run uses; these functions only turn config
values into modules.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxclip.models.lift import LiftModel
from jaxclip.models.two_tower import TwoTower, build_clip
from jaxclip.models.vit import VisionTransformer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(model_cfg: ml_collections.ConfigDict):
    if model_cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {model_cfg.dtype!r}.")
    return DTYPES[model_cfg.dtype]


def build_clip_model(
    model_cfg: ml_collections.ConfigDict, *, image_size: int, vocab_size: int, rngs: nnx.Rngs
) -> TwoTower:
    """CLIP: ViT + causal text transformer + logit scale."""
    image_cfg, text_cfg = model_cfg.image, model_cfg.text
    return build_clip(
        image_cfg.variant,
        image_size=image_size,
        embed_dim=model_cfg.embed_dim,
        pool=image_cfg.pool,
        text_width=text_cfg.width,
        text_depth=text_cfg.depth,
        text_heads=text_cfg.heads,
        vocab_size=vocab_size,
        context_length=text_cfg.context_length,
        act=model_cfg.act,
        scan=model_cfg.scan_layers,
        remat=model_cfg.remat,
        remat_policy=model_cfg.remat_policy,
        attention=model_cfg.attention,
        patch_dropout=image_cfg.patch_dropout,
        dtype=compute_dtype(model_cfg),
        init_logit_scale=model_cfg.init_logit_scale,
        logit_bias=model_cfg.logit_bias,
        rngs=rngs,
    )


def build_lift_model(
    model_cfg: ml_collections.ConfigDict, *, image_size: int, rngs: nnx.Rngs
) -> LiftModel:
    """LIFT: a projection-free ViT + a head into the frozen encoder's space + logit scale."""
    dtype = compute_dtype(model_cfg)
    image = VisionTransformer(
        model_cfg.image.variant,
        image_size=image_size,
        pool=model_cfg.image.pool,
        proj_dim=None,
        act=model_cfg.act,
        scan=model_cfg.scan_layers,
        remat=model_cfg.remat,
        remat_policy=model_cfg.remat_policy,
        attention=model_cfg.attention,
        patch_dropout=model_cfg.image.patch_dropout,
        dtype=dtype,
        rngs=rngs,
    )
    return LiftModel(
        image,
        embed_dim=model_cfg.embed_dim,
        init_logit_scale=model_cfg.init_logit_scale,
        logit_bias=model_cfg.logit_bias,
        dtype=dtype,
        rngs=rngs,
    )
