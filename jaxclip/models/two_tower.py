"""The CLIP two-tower model (image + text encoders, learned temperature) and param counting."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxclip.models.layers import DType, const_param, l2_normalize
from jaxclip.models.text import TextTransformer
from jaxclip.models.vit import VisionTransformer

Array = jax.Array


class TwoTower(nnx.Module):
    """CLIP: L2-normalized image/text embeddings plus a learned logit scale (and optional bias)."""

    def __init__(
        self,
        image: VisionTransformer,
        text: TextTransformer,
        *,
        init_logit_scale: float = math.log(1 / 0.07),
        logit_bias: float | None = None,
    ):
        if text.out_dim != image.out_dim:
            raise ValueError(f"image out_dim {image.out_dim} != text out_dim {text.out_dim}")
        self.image = image
        self.text = text
        # The scale is stored in log space; scale() exponentiates it.
        self.logit_scale = const_param((), init_logit_scale, ())
        self.logit_bias = None if logit_bias is None else const_param((), logit_bias, ())

    def encode_image(self, images: Array, *, rng: Array | None = None) -> Array:
        """(B, H, W, 3) -> unit-norm float32 (B, D); `rng` turns on patch dropout."""
        features, _ = self.image(images, rng=rng)
        return l2_normalize(features)

    def encode_patches(self, images: Array) -> Array:
        """(B, H, W, 3) -> the image tower's per-patch features (B, N, width) float32: final
        token states after ln_post, class token dropped, before pooling and projection."""
        return self.image.encode_patches(images)

    def encode_text(self, tokens: Array, mask: Array) -> Array:
        """int (B, L) tokens and mask -> unit-norm float32 (B, D)."""
        features, _ = self.text(tokens, mask)
        return l2_normalize(features)

    def scale(self) -> Array:
        """exp(logit_scale). The train step keeps the parameter at most log(max_logit_scale)
        after every update, so its gradient is never cut off at the bound."""
        return jnp.exp(self.logit_scale[...].astype(jnp.float32))

    def bias(self) -> Array | None:
        return None if self.logit_bias is None else self.logit_bias[...].astype(jnp.float32)

    def __call__(
        self, images: Array, tokens: Array, mask: Array, *, rng: Array | None = None
    ) -> dict[str, Any]:
        """Both towers -> dict(image, text, scale, bias). `rng` (training only) draws the
        image tower's patch dropout."""
        return dict(
            image=self.encode_image(images, rng=rng),
            text=self.encode_text(tokens, mask),
            scale=self.scale(),
            bias=self.bias(),
        )


def count_params(module_or_state: Any) -> int:
    """Number of scalar parameters in an nnx.Module (possibly abstract), an nnx.State or pytree."""
    if isinstance(module_or_state, nnx.Module):
        module_or_state = nnx.state(module_or_state, nnx.Param)
    # Leaves may be arrays or ShapeDtypeStructs (from nnx.eval_shape); only shapes are needed.
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(module_or_state))


def param_counts(model: TwoTower) -> dict[str, int]:
    """dict(image=..., text=..., other=..., total=...); works on nnx.eval_shape models."""
    total = count_params(model)
    image = count_params(model.image)
    text = count_params(model.text)
    return dict(image=image, text=text, other=total - image - text, total=total)


def build_clip(
    image_variant: str = "B/16",
    *,
    image_size: int = 224,
    embed_dim: int = 512,
    pool: str = "cls",
    text_width: int = 512,
    text_depth: int = 12,
    text_heads: int = 8,
    vocab_size: int = 49408,
    context_length: int = 77,
    act: str = "quick_gelu",
    scan: bool = True,
    remat: bool = False,
    remat_policy: str = "nothing_saveable",
    attention: str = "einsum",
    patch_dropout: float = 0.0,
    dtype: DType = jnp.float32,
    param_dtype: DType = jnp.float32,
    init_logit_scale: float = math.log(1 / 0.07),
    logit_bias: float | None = None,
    rngs: nnx.Rngs | None = None,
    **image_overrides: Any,
) -> TwoTower:
    """Build a CLIP TwoTower; the defaults give OpenAI's ViT-B/16 (149,620,737 params).

    `image_overrides` passes width/depth/
    heads/mlp_dim/ln_pre through to VisionTransformer. Wrap in `nnx.eval_shape(lambda: ...)`
    for an abstract model without allocating.
    """
    rngs = nnx.Rngs(0) if rngs is None else rngs
    common = dict(act=act, scan=scan, remat=remat, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    common.update(remat_policy=remat_policy, attention=attention)
    image = VisionTransformer(
        image_variant,
        image_size=image_size,
        pool=pool,
        proj_dim=embed_dim,
        patch_dropout=patch_dropout,
        **common,
        **image_overrides,
    )
    text = TextTransformer(
        vocab_size=vocab_size,
        context_length=context_length,
        width=text_width,
        depth=text_depth,
        heads=text_heads,
        proj_dim=embed_dim,
        **common,
    )
    return TwoTower(
        image,
        text,
        init_logit_scale=init_logit_scale,
        logit_bias=logit_bias,
    )
