"""Builds a model from the `model` section of a config."""

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


MODEL_KINDS = ("clip", "lift")


def build_model(
    model_cfg: ml_collections.ConfigDict, *, image_size: int, vocab_size: int, rngs: nnx.Rngs
) -> TwoTower | LiftModel:
    """CLIP (ViT + causal text transformer + logit scale) or LIFT (ViT + head + logit scale)."""
    if model_cfg.kind not in MODEL_KINDS:
        raise ValueError(f"model.kind must be one of {MODEL_KINDS}, got {model_cfg.kind!r}.")
    dtype = compute_dtype(model_cfg)
    image_cfg, text_cfg = model_cfg.image, model_cfg.text
    if model_cfg.kind == "clip":
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
            dtype=dtype,
            init_logit_scale=model_cfg.init_logit_scale,
            max_logit_scale=model_cfg.max_logit_scale,
            logit_bias=model_cfg.logit_bias,
            rngs=rngs,
        )
    # LIFT: a projection-free tower; the head maps into the frozen encoder's space.
    image = VisionTransformer(
        image_cfg.variant,
        image_size=image_size,
        pool=image_cfg.pool,
        proj_dim=None,
        act=model_cfg.act,
        scan=model_cfg.scan_layers,
        remat=model_cfg.remat,
        remat_policy=model_cfg.remat_policy,
        attention=model_cfg.attention,
        patch_dropout=image_cfg.patch_dropout,
        dtype=dtype,
        rngs=rngs,
    )
    return LiftModel(
        image,
        embed_dim=model_cfg.embed_dim,
        init_logit_scale=model_cfg.init_logit_scale,
        max_logit_scale=model_cfg.max_logit_scale,
        logit_bias=model_cfg.logit_bias,
        dtype=dtype,
        rngs=rngs,
    )
