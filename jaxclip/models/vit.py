"""Vision Transformer image tower (OpenAI CLIP layout: patchify, ln_pre, blocks, ln_post, proj)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxclip.mesh import constrain
from jaxclip.models.layers import TOKENS, DType, LayerNorm, TransformerStack, normal_param

Array = jax.Array

# name -> (width, depth, heads, mlp_dim). Sizes follow the usual ViT family table.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "mu": (32, 2, 2, 128),
    "demo": (128, 4, 4, 512),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}


def decode_variant(variant: str) -> dict[str, int]:
    """ "B/16" -> dict(width=768, depth=12, heads=12, mlp_dim=3072, patch=16)."""
    name, sep, patch = variant.partition("/")
    if name not in VARIANTS or not sep or not patch.isdigit() or int(patch) <= 0:
        valid = ", ".join(f"{n}/<patch>" for n in VARIANTS)
        raise ValueError(f"unknown ViT variant {variant!r}; valid names: {valid} (e.g. 'B/16')")
    width, depth, heads, mlp_dim = VARIANTS[name]
    return dict(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, patch=int(patch))


class VisionTransformer(nnx.Module):
    """ViT image encoder.

    pool="cls" prepends a learned class token and pools token 0 (OpenAI CLIP);
    pool="mean" has no class token and averages the patch tokens.
    proj_dim=None drops the output projection, so features are the ln_post output (width-dim).
    Explicit width/depth/heads/mlp_dim override the variant's values.
    patch_dropout (FLIP) drops that fraction of the patch tokens, a fresh random subset per
    example, whenever the call is given an `rng` (training); without one (evaluation) every
    patch is kept.
    """

    def __init__(
        self,
        variant: str,
        *,
        image_size: int,
        pool: str = "cls",
        proj_dim: int | None = 512,
        ln_pre: bool = True,
        act: str = "quick_gelu",
        scan: bool = True,
        remat: bool = False,
        remat_policy: str = "nothing_saveable",
        attention: str = "einsum",
        patch_dropout: float = 0.0,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
        width: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        mlp_dim: int | None = None,
    ):
        cfg = decode_variant(variant)
        overrides = dict(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim)
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        patch = cfg["patch"]
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not divisible by patch {patch}")
        if not 0.0 <= patch_dropout < 1.0:
            raise ValueError(
                f"patch_dropout is the fraction of patches dropped, in [0, 1); got {patch_dropout}"
            )

        self.variant, self.image_size, self.patch = variant, image_size, patch
        self.width, self.pool, self.proj_dim = cfg["width"], pool, proj_dim
        self.dtype, self.patch_dropout = dtype, float(patch_dropout)
        self.num_patches = (image_size // patch) ** 2
        self.out_dim = proj_dim if proj_dim is not None else cfg["width"]
        w = cfg["width"]
        scale = w**-0.5  # CLIP's std for class/positional embeddings and the projection

        # Conv with stride == kernel == patch, stored HWIO and applied as a matmul; no bias (CLIP).
        patch_std = (patch * patch * 3) ** -0.5
        self.patch_kernel = normal_param(
            rngs, (patch, patch, 3, w), patch_std, (None, None, None, "embed"), param_dtype
        )
        if pool == "cls":
            self.class_token = normal_param(rngs, (w,), scale, ("embed",), param_dtype)
        else:
            self.class_token = None
        n_tokens = self.num_patches + (1 if pool == "cls" else 0)
        self.pos_embed = normal_param(rngs, (n_tokens, w), scale, (None, "embed"), param_dtype)
        self.ln_pre = LayerNorm(w, param_dtype=param_dtype) if ln_pre else None
        self.blocks = TransformerStack(
            w,
            cfg["depth"],
            cfg["heads"],
            cfg["mlp_dim"],
            causal=False,
            act=act,
            scan=scan,
            remat=remat,
            remat_policy=remat_policy,
            attention=attention,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.ln_post = LayerNorm(w, param_dtype=param_dtype)
        if proj_dim is not None:
            self.proj = normal_param(rngs, (w, proj_dim), scale, ("embed", "proj"), param_dtype)
        else:
            self.proj = None

    def patchify(self, images: Array) -> Array:
        """(B, H, W, 3) -> (B, N, patch*patch*3), flattened in (row, col, channel) order."""
        b, h, w, c = images.shape
        p = self.patch
        if h != self.image_size or w != self.image_size or c != 3:
            raise ValueError(
                f"expected images (B, {self.image_size}, {self.image_size}, 3), got {images.shape}"
            )
        x = images.reshape(b, h // p, p, w // p, p, c)
        x = x.transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    @property
    def patches_kept(self) -> int:
        """Patch tokens per example that a training call (with an rng) keeps."""
        return max(1, int(self.num_patches * (1.0 - self.patch_dropout)))

    def drop_patches(self, x: Array, rng: Array) -> Array:
        """(B, N, width) patch tokens -> (B, kept, width), a uniform random subset per
        example (in the original order)."""
        scores = jax.random.uniform(rng, x.shape[:2])
        keep = jnp.sort(jnp.argsort(scores, axis=1)[:, : self.patches_kept], axis=1)
        return jnp.take_along_axis(x, keep[..., None], axis=1)

    def token_states(self, images: Array, *, rng: Array | None = None) -> Array:
        """images (B, H, W, 3) float -> the float32 residual stream after the last block,
        (B, 1 + N, width) with the class token first (pool="cls") or (B, N, width)."""
        dt = self.dtype
        kernel = self.patch_kernel[...].astype(dt).reshape(-1, self.width)
        x = self.patchify(images.astype(dt)) @ kernel
        # The residual stream is float32 from here to ln_post.
        x = constrain(x.astype(jnp.float32), TOKENS)
        pos = self.pos_embed[...]
        x = x + (pos[1:] if self.pool == "cls" else pos)
        if rng is not None and self.patch_dropout > 0:
            x = constrain(self.drop_patches(x, rng), TOKENS)
        if self.pool == "cls":
            cls = self.class_token[...] + pos[0]
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        return self.blocks(x)

    def encode_patches(self, images: Array, *, apply_ln_post: bool = True) -> Array:
        """images (B, H, W, 3) float -> per-patch features (B, N, width) float32, every patch
        kept, in patchify's row-major order; the class token (if any) is dropped.

        apply_ln_post=True (dense probes) normalizes each token with ln_post. The pooled
        feature is ln_post of the mean (pool="mean"), so with apply_ln_post=False the mean
        over patches, ln_post and the projection give exactly `__call__`'s features; the
        mean of the ln_post'ed tokens does not (a LayerNorm does not commute with a mean).
        """
        x = self.token_states(images)
        tokens = x[:, 1:] if self.pool == "cls" else x
        if not apply_ln_post:
            return tokens
        return self.ln_post(tokens, dtype=self.dtype).astype(jnp.float32)

    def __call__(
        self, images: Array, *, rng: Array | None = None
    ) -> tuple[Array, dict[str, Array]]:
        """images (B, H, W, 3) float -> (features (B, out_dim) float32, intermediates).

        `rng`: a key for patch dropout (training); None keeps every patch.
        intermediates: "tokens" = patch tokens after the last block (B, N, width), float32;
        "pooled" = pooled feature after ln_post, before the projection (B, width).
        """
        dt = self.dtype
        x = self.token_states(images, rng=rng)
        if self.pool == "cls":
            tokens, pooled = x[:, 1:], x[:, 0]
        else:
            tokens, pooled = x, x.mean(axis=1)
        pooled = constrain(self.ln_post(pooled, dtype=dt), ("batch", "act_embed"))
        features = pooled @ self.proj[...].astype(dt) if self.proj is not None else pooled
        intermediates: dict[str, Any] = {"tokens": tokens, "pooled": pooled}
        return features.astype(jnp.float32), intermediates
