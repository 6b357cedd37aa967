"""Small building blocks shared by the vision and text towers.

Every parameter is an ``nnx.Param`` carrying a ``logical_axes`` tuple (one name or None per
dimension). The sharding code maps those names onto a device mesh later; the models themselves
never mention devices. There is no dropout and no RNG state, so a model's whole state is params.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
DType = Any
LAYER_NORM_EPS = 1e-5  # OpenAI CLIP's nn.LayerNorm default.


# ---------------------------------------------------------------------------------------------
# Parameter helpers
# ---------------------------------------------------------------------------------------------


def normal_param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    std: float,
    logical_axes: tuple[str | None, ...],
    dtype: DType = jnp.float32,
) -> nnx.Param:
    """A parameter drawn from N(0, std^2), tagged with its logical axis names."""
    assert len(shape) == len(logical_axes), (shape, logical_axes)
    value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=tuple(logical_axes))


def const_param(
    shape: tuple[int, ...],
    fill: float,
    logical_axes: tuple[str | None, ...],
    dtype: DType = jnp.float32,
) -> nnx.Param:
    """A parameter filled with a constant (biases 0, LayerNorm gains 1, the logit scale)."""
    assert len(shape) == len(logical_axes), (shape, logical_axes)
    return nnx.Param(jnp.full(shape, fill, dtype), logical_axes=tuple(logical_axes))


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


def layer_norm(x: Array, scale: Array, bias: Array, eps: float = LAYER_NORM_EPS) -> Array:
    """LayerNorm over the last axis; statistics in float32 for bf16 stability, result in x.dtype."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def quick_gelu(x: Array) -> Array:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: Array) -> Array:
    """GELU with the erf formulation (PyTorch's default)."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {"gelu": exact_gelu, "quick_gelu": quick_gelu}


def get_activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-6) -> Array:
    """Unit-norm along `axis` in float32; eps keeps all-zero vectors finite."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) + eps * eps)


def attention(
    x: Array, p: dict[str, Array], *, causal: bool, dtype: DType
) -> Array:  # (B, L, D) -> (B, L, D)
    """Multi-head self-attention with biases; logits and softmax in float32.

    An explicit einsum is used (rather than a fused kernel) so CPU and GPU run the same math
    and the causal mask is trivial to express.
    """
    q = jnp.einsum("bld,dhk->blhk", x, p["q_kernel"]) + p["q_bias"]
    k = jnp.einsum("bld,dhk->blhk", x, p["k_kernel"]) + p["k_bias"]
    v = jnp.einsum("bld,dhk->blhk", x, p["v_kernel"]) + p["v_bias"]
    head_dim = q.shape[-1]
    q = q * jnp.asarray(head_dim**-0.5, dtype)
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32)
    if causal:
        length = x.shape[1]
        allowed = jnp.tril(jnp.ones((length, length), dtype=bool))
        logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bhqs,bshk->bqhk", probs, v)
    return jnp.einsum("blhk,hkd->bld", out, p["out_kernel"]) + p["out_bias"]


def transformer_block(
    x: Array, p: dict[str, Array], *, causal: bool, act: str, dtype: DType
) -> Array:
    """One pre-norm residual block: x + attn(ln1(x)), then x + mlp(ln2(x)).

    `p` holds ONE layer's parameters (the stacked leading dim already removed).
    """
    p = {name: value.astype(dtype) for name, value in p.items()}  # cast at use, per layer
    x = x + attention(layer_norm(x, p["ln1_scale"], p["ln1_bias"]), p, causal=causal, dtype=dtype)
    h = layer_norm(x, p["ln2_scale"], p["ln2_bias"])
    h = get_activation(act)(h @ p["fc1_kernel"] + p["fc1_bias"])
    return x + (h @ p["fc2_kernel"] + p["fc2_bias"])


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class LayerNorm(nnx.Module):
    """LayerNorm with gain and bias, logical axis "norm"."""

    def __init__(self, dim: int, *, param_dtype: DType = jnp.float32):
        self.scale = const_param((dim,), 1.0, ("norm",), param_dtype)
        self.bias = const_param((dim,), 0.0, ("norm",), param_dtype)

    def __call__(self, x: Array) -> Array:
        return layer_norm(x, self.scale[...], self.bias[...])


class TransformerStack(nnx.Module):
    """`depth` pre-norm transformer blocks whose parameters are stacked on a "layers" axis.

    Stacking lets `jax.lax.scan` compile one block instead of `depth` copies (scan=True); the
    Python-loop path (scan=False) gives identical results and is handy for debugging.
    `remat=True` recomputes each block's activations in the backward pass to save memory.
    """

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        causal: bool,
        *,
        act: str = "quick_gelu",
        scan: bool = True,
        remat: bool = False,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        get_activation(act)  # validate early
        self.width, self.depth, self.heads, self.mlp_dim = width, depth, heads, mlp_dim
        self.causal, self.act, self.scan, self.remat = causal, act, scan, remat
        self.dtype = dtype
        head_dim = width // heads

        # CLIP's init: attention std width^-0.5, residual-branch outputs shrunk by (2*depth)^-0.5.
        attn_std = width**-0.5
        proj_std = attn_std * (2 * depth) ** -0.5
        fc1_std = (2 * width) ** -0.5
        L, D, H, K, M = depth, width, heads, head_dim, mlp_dim

        def normal(shape, std, axes):
            return normal_param(rngs, shape, std, axes, param_dtype)

        def const(shape, fill, axes):
            return const_param(shape, fill, axes, param_dtype)

        qkv_axes = ("layers", "embed", "heads", "kv")
        self.ln1_scale = const((L, D), 1.0, ("layers", "norm"))
        self.ln1_bias = const((L, D), 0.0, ("layers", "norm"))
        self.q_kernel = normal((L, D, H, K), attn_std, qkv_axes)
        self.k_kernel = normal((L, D, H, K), attn_std, qkv_axes)
        self.v_kernel = normal((L, D, H, K), attn_std, qkv_axes)
        self.q_bias = const((L, H, K), 0.0, ("layers", "heads", "kv"))
        self.k_bias = const((L, H, K), 0.0, ("layers", "heads", "kv"))
        self.v_bias = const((L, H, K), 0.0, ("layers", "heads", "kv"))
        self.out_kernel = normal((L, H, K, D), proj_std, ("layers", "heads", "kv", "embed"))
        self.out_bias = const((L, D), 0.0, ("layers", "embed"))
        self.ln2_scale = const((L, D), 1.0, ("layers", "norm"))
        self.ln2_bias = const((L, D), 0.0, ("layers", "norm"))
        self.fc1_kernel = normal((L, D, M), fc1_std, ("layers", "embed", "mlp"))
        self.fc1_bias = const((L, M), 0.0, ("layers", "mlp"))
        self.fc2_kernel = normal((L, M, D), proj_std, ("layers", "mlp", "embed"))
        self.fc2_bias = const((L, D), 0.0, ("layers", "embed"))

    PARAM_NAMES = (
        "ln1_scale",
        "ln1_bias",
        "q_kernel",
        "k_kernel",
        "v_kernel",
        "q_bias",
        "k_bias",
        "v_bias",
        "out_kernel",
        "out_bias",
        "ln2_scale",
        "ln2_bias",
        "fc1_kernel",
        "fc1_bias",
        "fc2_kernel",
        "fc2_bias",
    )

    def stacked_params(self) -> dict[str, Array]:
        """The raw stacked arrays, each with leading dim `depth`."""
        return {name: getattr(self, name)[...] for name in self.PARAM_NAMES}

    def __call__(self, x: Array) -> Array:
        """(B, L, width) -> (B, L, width), computed in self.dtype."""
        x = x.astype(self.dtype)
        params = self.stacked_params()

        def block(h: Array, layer_params: dict[str, Array]) -> Array:
            return transformer_block(
                h, layer_params, causal=self.causal, act=self.act, dtype=self.dtype
            )

        if self.remat:
            block = jax.checkpoint(block)

        if self.scan:
            x, _ = jax.lax.scan(lambda h, lp: (block(h, lp), None), x, params)
            return x
        for i in range(self.depth):
            x = block(x, jax.tree.map(lambda a, i=i: a[i], params))
        return x
