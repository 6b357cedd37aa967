"""Scaled dot-product attention, one function per implementation behind one name.

`model.attention` picks the implementation: `einsum` (the reference: explicit logits and a
float32 softmax, the math every other one must reproduce), `xla` and `cudnn` through
`jax.nn.dot_product_attention` (cuDNN's fused flash attention on NVIDIA GPUs), `pallas`
(the Pallas splash-attention kernel on TPU) and `auto`, which resolves per platform when the
model is traced: cudnn on a GPU in 16-bit compute (xla when no GPU is attached, as in an
ahead-of-time compile), pallas on TPU, einsum on CPU. All take and return (batch, length,
heads, head_dim) arrays in the compute dtype; logits and softmax statistics are float32 in
every implementation.

Masks: `causal` (the text tower) and `kv_lengths`, the number of real keys per example
(right padding), so padded keys never receive weight.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxclip import mesh as mesh_lib

Array = jax.Array
IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn", "pallas")
# Splash attention tiles the sequence in blocks of this many tokens; shorter or ragged
# sequences are padded up to a multiple and the padding is masked with segment ids.
PALLAS_BLOCK = 128


def _unknown(name: str) -> ValueError:
    return ValueError(f"model.attention must be one of {IMPLEMENTATIONS}, got {name!r}.")


def _unavailable(name: str, platform: str, why: str) -> ValueError:
    return ValueError(
        f"model.attention={name!r} cannot run on {platform}: {why}. Use "
        f"--config.model.attention=auto (picks one that runs) or einsum."
    )


def resolve(name: str, platform: str, dtype) -> str:
    """The implementation `name` stands for on `platform` ("cpu", "gpu"/"cuda", "tpu")."""
    if name not in IMPLEMENTATIONS:
        raise _unknown(name)
    gpu = platform in ("gpu", "cuda")
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if name == "auto":
        if gpu and half and cudnn_present():
            return "cudnn"
        if platform == "tpu":
            return "pallas"
        # CPU: the einsum was 3 % faster than XLA's dot_product_attention in the demo's
        # step (docs/PERFORMANCE.md); float32 GPUs: XLA's.
        return "einsum" if platform == "cpu" else "xla"
    if name == "cudnn" and not gpu:
        raise _unavailable(name, platform, "cuDNN attention exists only on NVIDIA GPUs")
    if name == "cudnn" and not half:
        raise _unavailable(name, platform, "cuDNN flash attention needs bfloat16 or float16")
    if name == "cudnn" and not cudnn_present():
        why = "its lowering reads the local GPU's cuDNN version, and this host has no GPU"
        raise _unavailable(name, platform, why + " (an ahead-of-time compile gets xla)")
    return name


@functools.lru_cache(maxsize=1)
def cudnn_present() -> bool:
    """Whether this process has a GPU, which tracing cuDNN attention needs (it queries the
    cuDNN version and the compute capability); an ahead-of-time GPU compile has none."""
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def einsum_attention(
    q: Array, k: Array, v: Array, *, causal: bool, kv_lengths: Array | None = None
) -> Array:
    """The reference: float32 logits and softmax, probabilities cast back for the PV matmul."""
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32)
    allowed = _allowed(q.shape[1], k.shape[1], causal, kv_lengths)
    if allowed is not None:
        logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqs,bshk->bqhk", probs, v)


def _allowed(q_len: int, kv_len: int, causal: bool, kv_lengths: Array | None) -> Array | None:
    """Boolean (batch or 1, 1, q_len, kv_len) mask of the logits that count, or None."""
    allowed = None
    if causal:
        allowed = jnp.tril(jnp.ones((q_len, kv_len), bool))[None, None]
    if kv_lengths is not None:
        real = jnp.arange(kv_len)[None, :] < kv_lengths[:, None]
        real = real[:, None, None, :]
        allowed = real if allowed is None else allowed & real
    return allowed


def fused_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool,
    kv_lengths: Array | None = None,
    implementation: str,
) -> Array:
    """`jax.nn.dot_product_attention` with implementation "xla" or "cudnn"."""
    lengths = None if kv_lengths is None else kv_lengths.astype(jnp.int32)
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, key_value_seq_lengths=lengths, implementation=implementation
    )


def pallas_attention(
    q: Array, k: Array, v: Array, *, causal: bool, kv_lengths: Array | None = None
) -> Array:
    """Pallas splash attention (TPU). Off TPU the kernel runs in interpret mode, which is
    slow and only meant for tests. Under an activation-sharding context the kernel runs in
    `shard_map` over the batch and head axes, since XLA cannot partition a custom kernel."""
    platform = mesh_lib.current_platform()
    interpret = platform != "tpu"
    batch, length, heads, head_dim = q.shape
    padded = -(-length // PALLAS_BLOCK) * PALLAS_BLOCK
    lengths = jnp.full((batch,), length, jnp.int32) if kv_lengths is None else kv_lengths
    kernel = _splash_kernel(heads, padded, causal, interpret)

    def run(q, k, v, lengths):
        # Splash expects (heads, length, head_dim) per example and pre-scaled queries.
        q = q * jnp.asarray(head_dim**-0.5, q.dtype)
        pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
        q, k, v = (jnp.pad(t, pad).transpose(0, 2, 1, 3) for t in (q, k, v))
        positions = jnp.arange(padded)[None, :]
        # Segment 1 = real tokens, 0 = padding: padding attends only to padding.
        segments = (positions < lengths[:, None]).astype(jnp.int32)
        q_segments = (positions < length).astype(jnp.int32) * jnp.ones_like(segments)
        ids = _segment_ids(q_segments, segments)
        out = jax.vmap(kernel)(q, k, v, segment_ids=ids)
        return out.transpose(0, 2, 1, 3)[:, :length]

    return mesh_lib.map_over_shards(
        run,
        (q, k, v, lengths),
        in_names=(mesh_lib.ATTN_AXES, mesh_lib.ATTN_AXES, mesh_lib.ATTN_AXES, ("batch",)),
        out_names=mesh_lib.ATTN_AXES,
    )


def _segment_ids(q_segments: Array, kv_segments: Array):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    return splash.SegmentIds(q=q_segments, kv=kv_segments)


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, length: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    shape = (length, length)
    head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
    mask = splash.MultiHeadMask([head_mask] * heads)
    return splash.make_splash_mha(
        mask, head_shards=1, q_seq_shards=1, block_sizes=None, interpret=interpret
    )


def attention_fn(name: str, dtype) -> Callable[..., Array]:
    """The attention function for `model.attention=name`, resolved for the tracing platform."""
    chosen = resolve(name, mesh_lib.current_platform(), dtype)
    if chosen == "einsum":
        return einsum_attention
    if chosen == "pallas":
        return pallas_attention
    return functools.partial(fused_attention, implementation=chosen)
