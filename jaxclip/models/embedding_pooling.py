"""Pooling a decoder's hidden states into one embedding per text.

- ``last``: the state of the final real token (Qwen3-Embedding): with left padding the last
  position, with right padding the position before the padding; found from the mask, so the
  side does not matter.
- ``mean``: the mean over real tokens.
- ``latent``: NV-Embed's latent-attention pooling (Lee et al. 2024, arXiv 2405.17428), below.

Latent-attention pooling, for hidden states H (L x d) and a trained latent array Z (r x d):

    Q = LN_q(H) W_q,  K = LN_z(Z) W_k,  V = LN_z(Z) W_v           (per head, h heads of size e)
    A = H + concat_heads(softmax(Q K^T / sqrt(e)) V) W_o           (tokens attend to latents)
    O = A + W_2 (x * gelu(g)) + b_2,  [x, g] = LN_m(A) W_1 + b_1   (GEGLU MLP, width 4d)
    embedding = sum_t mask_t O_t / sum_t mask_t

The layer and tensor names follow NV-Embed-v2's checkpoint (``latent_attention_model.*``, read
from its published modeling code and Hugging Face's candle port, which loads the real weights;
the checkpoint's own safetensors index could not be read here): ``latents``,
``cross_attend_blocks.0.{norm,norm_context}`` (LayerNorms with bias), ``cross_attend_blocks.0.fn.
{to_q,to_kv,to_out}`` (no bias; to_kv holds K then V), ``cross_attend_blocks.1.norm`` and
``cross_attend_blocks.1.fn.net.{0,2}`` (the GEGLU MLP, with biases; net.0 holds x then g).
The keys and values depend only on the latents, so they are computed once per call, not per
text as the reference code does (same numbers, less work).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxclip.models import hf_checkpoint, layers

Array = jax.Array
DType = Any
POOLINGS = ("last", "mean", "latent")
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which NV-Embed uses


def last_token_pool(states: Array, mask: Array) -> Array:
    """(B, L, D) -> (B, D) float32: the state at each row's last real token."""
    length = mask.shape[1]
    last = length - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=1)  # an empty row gives L - 1
    return jnp.take_along_axis(states, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def mean_pool(states: Array, mask: Array) -> Array:
    """(B, L, D) -> (B, D) float32: the mean over real tokens (zeros for an empty row)."""
    m = mask.astype(jnp.float32)[..., None]
    return (states.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


@dataclasses.dataclass(frozen=True)
class LatentAttentionConfig:
    """NV-Embed's ``latent_attention_config``; the defaults are its configuration class's."""

    hidden_size: int = 4096
    num_latents: int = 512
    num_heads: int = 8
    head_dim: int = 4096
    mlp_mult: int = 4  # the GEGLU MLP is mlp_mult * hidden_size wide (fixed in NV-Embed's code)
    output_normalize: bool = True

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], path: str = "config.json") -> LatentAttentionConfig:
        hidden = int(raw.get("hidden_dim", cls.hidden_size))
        latent = int(raw.get("latent_dim", cls.hidden_size))
        if latent != hidden:
            # NV-Embed's layer norms the token states with a latent_dim-wide LayerNorm: it only
            # runs when the two are equal.
            raise ValueError(f"{path}: latent_dim {latent} != hidden_dim {hidden} is not supported")
        return cls(
            hidden_size=hidden,
            num_latents=int(raw.get("num_latents_value", cls.num_latents)),
            num_heads=int(raw.get("num_cross_heads", cls.num_heads)),
            head_dim=int(raw.get("cross_dim_head", cls.head_dim)),
            output_normalize=bool(raw.get("output_normalize", cls.output_normalize)),
        )


def _param(shape, axes, dtype, init: float | None, rngs: nnx.Rngs) -> nnx.Param:
    if init is None:
        value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    else:
        value = jnp.full(shape, init, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


class LatentAttentionPooling(nnx.Module):
    """(states (B, L, D), pool mask (B, L)) -> (B, D) float32, not normalized."""

    def __init__(self, cfg: LatentAttentionConfig, *, dtype: DType = jnp.float32, rngs=None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        D, R, H, E = cfg.hidden_size, cfg.num_latents, cfg.num_heads, cfg.head_dim
        M = cfg.mlp_mult * D

        def param(shape, axes, init=None):
            return _param(shape, axes, dtype, init, rngs)

        self.latents = param((R, D), (None, "embed"))
        self.query_norm_scale = param((D,), ("norm",), 1.0)
        self.query_norm_bias = param((D,), ("norm",), 0.0)
        self.latent_norm_scale = param((D,), ("norm",), 1.0)
        self.latent_norm_bias = param((D,), ("norm",), 0.0)
        self.q_kernel = param((D, H, E), ("embed", "heads", "kv"))
        self.k_kernel = param((D, H, E), ("embed", "heads", "kv"))
        self.v_kernel = param((D, H, E), ("embed", "heads", "kv"))
        self.o_kernel = param((H, E, D), ("heads", "kv", "embed"))
        self.mlp_norm_scale = param((D,), ("norm",), 1.0)
        self.mlp_norm_bias = param((D,), ("norm",), 0.0)
        self.value_kernel = param((D, M), ("embed", "mlp"))
        self.value_bias = param((M,), ("mlp",), 0.0)
        self.gate_kernel = param((D, M), ("embed", "mlp"))
        self.gate_bias = param((M,), ("mlp",), 0.0)
        self.down_kernel = param((M, D), ("mlp", "embed"))
        self.down_bias = param((D,), ("embed",), 0.0)

    def _p(self, name: str) -> Array:
        return getattr(self, name)[...].astype(self.dtype)

    def __call__(self, states: Array, mask: Array) -> Array:
        p, eps = self._p, LAYER_NORM_EPS
        x = states.astype(self.dtype)
        h = layers.layer_norm(x, p("query_norm_scale"), p("query_norm_bias"), eps)
        z = layers.layer_norm(p("latents"), p("latent_norm_scale"), p("latent_norm_bias"), eps)
        q = jnp.einsum("bld,dhe->blhe", h, p("q_kernel"))
        k = jnp.einsum("rd,dhe->rhe", z, p("k_kernel"))
        v = jnp.einsum("rd,dhe->rhe", z, p("v_kernel"))
        q = q * jnp.asarray(self.cfg.head_dim**-0.5, q.dtype)
        logits = jnp.einsum("blhe,rhe->bhlr", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        attended = jnp.einsum("bhlr,rhe->blhe", probs, v)
        x = x + jnp.einsum("blhe,hed->bld", attended, p("o_kernel"))
        h = layers.layer_norm(x, p("mlp_norm_scale"), p("mlp_norm_bias"), eps)
        value = h @ p("value_kernel") + p("value_bias")
        gate = h @ p("gate_kernel") + p("gate_bias")
        x = x + (value * layers.exact_gelu(gate)) @ p("down_kernel") + p("down_bias")
        return mean_pool(x, mask)


def latent_hf_placements(
    cfg: LatentAttentionConfig, prefix: str = "latent_attention_model."
) -> dict[str, hf_checkpoint.Placement]:
    """Parameter name -> NV-Embed checkpoint tensor (see the module docstring for the names)."""
    S, one = hf_checkpoint.Source, hf_checkpoint.single
    E, M = cfg.head_dim, cfg.mlp_mult * cfg.hidden_size
    inner = cfg.num_heads * E
    attn, mlp = f"{prefix}cross_attend_blocks.0.", f"{prefix}cross_attend_blocks.1."
    heads = dict(layout="split_heads", head_dim=E)
    return {
        "latents": one(S(f"{prefix}latents")),
        "query_norm_scale": one(S(f"{attn}norm.weight")),
        "query_norm_bias": one(S(f"{attn}norm.bias")),
        "latent_norm_scale": one(S(f"{attn}norm_context.weight")),
        "latent_norm_bias": one(S(f"{attn}norm_context.bias")),
        "q_kernel": one(S(f"{attn}fn.to_q.weight", **heads)),
        "k_kernel": one(S(f"{attn}fn.to_kv.weight", **heads, rows=2 * inner)),
        "v_kernel": one(S(f"{attn}fn.to_kv.weight", **heads, row_offset=inner, rows=2 * inner)),
        "o_kernel": one(S(f"{attn}fn.to_out.weight", layout="merge_heads", head_dim=E)),
        "mlp_norm_scale": one(S(f"{mlp}norm.weight")),
        "mlp_norm_bias": one(S(f"{mlp}norm.bias")),
        "value_kernel": one(S(f"{mlp}fn.net.0.weight", layout="transpose", rows=2 * M)),
        "value_bias": one(S(f"{mlp}fn.net.0.bias", rows=2 * M)),
        "gate_kernel": one(
            S(f"{mlp}fn.net.0.weight", layout="transpose", row_offset=M, rows=2 * M)
        ),
        "gate_bias": one(S(f"{mlp}fn.net.0.bias", row_offset=M, rows=2 * M)),
        "down_kernel": one(S(f"{mlp}fn.net.2.weight", layout="transpose")),
        "down_bias": one(S(f"{mlp}fn.net.2.bias")),
    }
