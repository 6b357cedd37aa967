"""Causal Transformer text tower (OpenAI CLIP layout), pooled at the end-of-text token."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxclip.mesh import constrain
from jaxclip.models.layers import TOKENS, DType, LayerNorm, TransformerStack, normal_param

Array = jax.Array


class TextTransformer(nnx.Module):
    """Token + learned positional embeddings -> causal blocks -> ln_final -> EOT pooling -> proj.

    The pooled position is the last real token, found from the attention mask as
    sum(mask) - 1. (OpenAI takes argmax of the token ids, which only works because their EOT id is
    the largest; the mask works for any tokenizer.)
    """

    def __init__(
        self,
        *,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 512,
        depth: int = 12,
        heads: int = 8,
        mlp_dim: int | None = None,
        proj_dim: int | None = 512,
        act: str = "quick_gelu",
        scan: bool = True,
        remat: bool = False,
        remat_policy: str = "nothing_saveable",
        attention: str = "einsum",
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.vocab_size, self.context_length, self.width = vocab_size, context_length, width
        self.proj_dim, self.dtype = proj_dim, dtype
        self.out_dim = proj_dim if proj_dim is not None else width
        mlp_dim = 4 * width if mlp_dim is None else mlp_dim

        self.token_embed = normal_param(
            rngs, (vocab_size, width), 0.02, ("vocab", "embed"), param_dtype
        )
        self.pos_embed = normal_param(
            rngs, (context_length, width), 0.01, (None, "embed"), param_dtype
        )
        self.blocks = TransformerStack(
            width,
            depth,
            heads,
            mlp_dim,
            causal=True,
            act=act,
            scan=scan,
            remat=remat,
            remat_policy=remat_policy,
            attention=attention,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.ln_final = LayerNorm(width, param_dtype=param_dtype)
        if proj_dim is not None:
            self.proj = normal_param(
                rngs, (width, proj_dim), width**-0.5, ("embed", "proj"), param_dtype
            )
        else:
            self.proj = None

    def __call__(self, tokens: Array, mask: Array) -> tuple[Array, dict[str, Array]]:
        """tokens, mask: int (B, L) with L <= context_length -> (features (B, out_dim) f32, inter).

        intermediates: "tokens" = ln_final output at every position (B, L, width);
        "pooled" = the end-of-text feature before projection (B, width); "eot_index" (B,).
        """
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"sequence length {length} > context_length {self.context_length}")
        dt = self.dtype
        # Gather from the embedding table (no one-hot); the residual stream is float32.
        x = jnp.take(self.token_embed[...], tokens, axis=0)
        x = constrain(x + self.pos_embed[...][:length], TOKENS)
        x = self.blocks(x)
        x = constrain(self.ln_final(x, dtype=dt), TOKENS)

        # Causal attention means padding after the EOT token cannot affect this position.
        eot = jnp.clip(jnp.sum(mask.astype(jnp.int32), axis=-1) - 1, 0, length - 1)
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        pooled = constrain(pooled, ("batch", "act_embed"))
        features = pooled @ self.proj[...].astype(dt) if self.proj is not None else pooled
        intermediates: dict[str, Any] = {"tokens": x, "pooled": pooled, "eot_index": eot}
        return features.astype(jnp.float32), intermediates
