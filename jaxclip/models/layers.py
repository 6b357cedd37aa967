"""Small building blocks shared by the vision and text towers.

Every parameter is an ``nnx.Param`` carrying a ``logical_axes`` tuple (one name or None per
dimension). The sharding code maps those names onto a device mesh later; the models themselves
never mention devices. Activations are named too (`constrain(x, ("batch", "length",
"act_embed"))`), which pins them to the mesh only while the train step traces the model.
There is no RNG state (patch dropout takes its key as an argument), so a model's whole state
is params.

Precision policy: parameters are float32 and cast to the compute dtype where a matmul uses
them; the residual stream stays float32 across all layers; LayerNorm statistics and gains
and the attention softmax are float32; only matmul inputs (and the MLP activation between
them) are in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxclip.mesh import constrain
from jaxclip.models.attention import IMPLEMENTATIONS, attention_fn

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


def layer_norm(
    x: Array, scale: Array, bias: Array, eps: float = LAYER_NORM_EPS, dtype: DType | None = None
) -> Array:
    """LayerNorm over the last axis with statistics and gains in float32; the result in
    `dtype` (default x.dtype), the matmul input dtype where a matmul follows."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype if dtype is None else dtype)


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


TOKENS = ("batch", "length", "act_embed")  # logical names of a (B, L, width) activation
HEADS = ("batch", "length", "act_heads", "act_kv")  # (B, L, heads, head_dim)


def attention(
    x: Array,
    p: dict[str, Array],
    *,
    causal: bool,
    implementation: str,
    dtype: DType,
    kv_lengths: Array | None = None,
) -> Array:  # (B, L, D) -> (B, L, D)
    """Multi-head self-attention with biases; `x` and the kernels in the compute dtype."""
    # One matmul for q, k and v (stacked on a new axis, so a heads-sharded layout stays).
    kernel = jnp.stack([p["q_kernel"], p["k_kernel"], p["v_kernel"]], axis=1)  # (D, 3, H, K)
    bias = jnp.stack([p["q_bias"], p["k_bias"], p["v_bias"]])  # (3, H, K)
    qkv = jnp.einsum("bld,dthk->tblhk", x, kernel) + bias[:, None, None]
    q, k, v = (constrain(t, HEADS) for t in qkv)
    attend = attention_fn(implementation, dtype)
    out = constrain(attend(q, k, v, causal=causal, kv_lengths=kv_lengths), HEADS)
    return jnp.einsum("blhk,hkd->bld", out, p["out_kernel"]) + p["out_bias"]


def transformer_block(
    x: Array,
    p: dict[str, Array],
    *,
    causal: bool,
    act: str,
    dtype: DType,
    attention_impl: str = "einsum",
) -> Array:
    """One pre-norm residual block: x + attn(ln1(x)), then x + mlp(ln2(x)).

    `x` is the float32 residual stream; `p` holds ONE layer's float32 parameters (the stacked
    leading dim already removed). Each branch computes in `dtype` and is added back in float32.
    """
    w = {k: v.astype(dtype) for k, v in p.items() if not k.startswith("ln")}
    h = layer_norm(x, p["ln1_scale"], p["ln1_bias"], dtype=dtype)
    h = attention(h, w, causal=causal, implementation=attention_impl, dtype=dtype)
    x = constrain(x + h.astype(jnp.float32), TOKENS)
    h = layer_norm(x, p["ln2_scale"], p["ln2_bias"], dtype=dtype)
    h = constrain(h @ w["fc1_kernel"] + w["fc1_bias"], ("batch", "length", "act_mlp"))
    h = get_activation(act)(h) @ w["fc2_kernel"] + w["fc2_bias"]
    return constrain(x + h.astype(jnp.float32), TOKENS)


# Remat policies by name (`model.remat_policy`): what the backward pass may keep instead of
# recomputing. nothing_saveable recomputes the whole block (least memory).
REMAT_POLICIES = (
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
)


def checkpoint_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"model.remat_policy must be one of {REMAT_POLICIES}, got {name!r}.")
    return getattr(jax.checkpoint_policies, name)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class LayerNorm(nnx.Module):
    """LayerNorm with gain and bias, logical axis "norm"."""

    def __init__(self, dim: int, *, param_dtype: DType = jnp.float32):
        self.scale = const_param((dim,), 1.0, ("norm",), param_dtype)
        self.bias = const_param((dim,), 0.0, ("norm",), param_dtype)

    def __call__(self, x: Array, dtype: DType | None = None) -> Array:
        return layer_norm(x, self.scale[...], self.bias[...], dtype=dtype)


class TransformerStack(nnx.Module):
    """`depth` pre-norm transformer blocks whose parameters are stacked on a "layers" axis.

    Stacking lets `jax.lax.scan` compile one block instead of `depth` copies (scan=True); the
    Python-loop path (scan=False) gives identical results and is handy for debugging.
    `remat=True` recomputes each block's activations in the backward pass to save memory,
    keeping what `remat_policy` allows. `attention` names the implementation
    (`jaxclip.models.attention`). Input and output are the float32 residual stream.
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
        remat_policy: str = "nothing_saveable",
        attention: str = "einsum",
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        get_activation(act)  # validate early
        self.policy = checkpoint_policy(remat_policy)
        if attention not in IMPLEMENTATIONS:  # validated here, resolved when traced
            raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {attention!r}")
        self.width, self.depth, self.heads, self.mlp_dim = width, depth, heads, mlp_dim
        self.causal, self.act, self.scan, self.remat = causal, act, scan, remat
        self.attention, self.dtype = attention, dtype
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
        """(B, L, width) float32 residual stream -> (B, L, width) float32."""
        x = constrain(x.astype(jnp.float32), TOKENS)
        params = self.stacked_params()

        def block(h: Array, layer_params: dict[str, Array]) -> Array:
            return transformer_block(
                h,
                layer_params,
                causal=self.causal,
                act=self.act,
                dtype=self.dtype,
                attention_impl=self.attention,
            )

        if self.remat:
            block = jax.checkpoint(block, policy=self.policy)

        if self.scan:
            x, _ = jax.lax.scan(lambda h, lp: (block(h, lp), None), x, params)
            return x
        for i in range(self.depth):
            x = block(x, jax.tree.map(lambda a, i=i: a[i], params))
        return x
