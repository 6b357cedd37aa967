"""Attention implementations: each one that runs here equals the einsum reference, and the
reference equals a float64 numpy computation, with padding and causal masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxclip.models import attention as attn
from jaxclip.models.text import TextTransformer
from jaxclip.models.vit import VisionTransformer

B, L, H, K = 3, 13, 2, 16
LENGTHS = np.array([13, 7, 1])  # one full row, one padded, one with a single real key


def qkv(seed: int = 0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((B, L, H, K)), dtype) for _ in range(3))


def numpy_attention(q, k, v, causal: bool, lengths) -> np.ndarray:
    """Float64, one (example, head) at a time, masks applied by index."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            logits = q[b, :, h] @ k[b, :, h].T / np.sqrt(q.shape[-1])
            for i in range(logits.shape[0]):
                for j in range(logits.shape[1]):
                    if j >= lengths[b] or (causal and j > i):
                        logits[i, j] = -np.inf
            logits -= logits.max(-1, keepdims=True)
            probs = np.exp(logits)
            out[b, :, h] = (probs / probs.sum(-1, keepdims=True)) @ v[b, :, h]
    return out


def implementations_here() -> list[str]:
    """Everything that runs on this platform: pallas in interpret mode off TPU."""
    names = ["einsum", "xla", "pallas"]
    if jax.default_backend() in ("gpu", "cuda"):
        names.append("cudnn")
    return names


@pytest.mark.parametrize("causal", [False, True])
def test_einsum_reference_matches_float64_numpy(causal):
    q, k, v = qkv()
    out = attn.einsum_attention(q, k, v, causal=causal, kv_lengths=jnp.asarray(LENGTHS))
    ref = numpy_attention(q, k, v, causal, LENGTHS)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["padding", "causal+padding"])
@pytest.mark.parametrize("name", implementations_here())
def test_implementation_equals_einsum_reference_in_value_and_gradient(name, causal):
    q, k, v = qkv(seed=1)
    lengths = jnp.asarray(LENGTHS)
    fn = attn.attention_fn(name, jnp.float32 if name != "cudnn" else jnp.bfloat16)

    def loss(f, q, k, v):
        out = f(q, k, v, causal=causal, kv_lengths=lengths)
        return jnp.sum(jnp.sin(out.astype(jnp.float32)))

    ref_out = attn.einsum_attention(q, k, v, causal=causal, kv_lengths=lengths)
    out = fn(q, k, v, causal=causal, kv_lengths=lengths)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    ref_grads = jax.grad(lambda *a: loss(attn.einsum_attention, *a), argnums=(0, 1, 2))(q, k, v)
    grads = jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_causal_without_padding_sees_only_the_past():
    q, k, v = qkv(seed=2)
    out = attn.attention_fn("xla", jnp.float32)(q, k, v, causal=True)
    changed = attn.attention_fn("xla", jnp.float32)(q, k.at[:, 7:].add(1.0), v, causal=True)
    np.testing.assert_allclose(out[:, :7], changed[:, :7], rtol=1e-6)
    assert not np.allclose(out[:, 7:], changed[:, 7:])


def test_auto_on_cpu_picks_an_implementation_that_runs():
    chosen = attn.resolve("auto", "cpu", jnp.float32)
    assert chosen in ("einsum", "xla")
    q, k, v = qkv()
    out = attn.attention_fn("auto", jnp.float32)(q, k, v, causal=False)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, False, [L] * B), atol=1e-5)


def test_auto_picks_the_fused_kernels_on_accelerators():
    # cuDNN where a GPU is attached; an ahead-of-time GPU compile from here gets xla.
    gpu_bf16 = "cudnn" if attn.cudnn_present() else "xla"
    assert attn.resolve("auto", "gpu", jnp.bfloat16) == gpu_bf16
    assert attn.resolve("auto", "gpu", jnp.float32) == "xla"  # cuDNN flash needs 16-bit
    assert attn.resolve("auto", "tpu", jnp.bfloat16) == "pallas"


@pytest.mark.parametrize(
    "name,platform,dtype,words",
    [
        ("cudnn", "cpu", jnp.bfloat16, "only on NVIDIA GPUs"),
        ("cudnn", "gpu", jnp.float32, "bfloat16 or float16"),
        pytest.param(
            "cudnn",
            "gpu",
            jnp.bfloat16,
            "this host has no GPU",
            marks=pytest.mark.skipif(attn.cudnn_present(), reason="a GPU is attached"),
        ),
        ("flash", "cpu", jnp.float32, "must be one of"),
    ],
)
def test_unusable_implementation_names_the_ones_that_run(name, platform, dtype, words):
    with pytest.raises(ValueError, match=words):
        attn.resolve(name, platform, dtype)


@pytest.mark.parametrize("name", ["xla", "pallas"])
def test_towers_give_the_einsum_towers_features(name):
    """The whole image and (causal) text towers, not only the kernel."""
    image_kw = dict(image_size=16, proj_dim=16)
    text_kw = dict(vocab_size=50, context_length=12, width=32, depth=2, heads=2, proj_dim=16)
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 1, 50)
    mask = (jnp.arange(12)[None] < jnp.array([[5], [12]])).astype(jnp.int32)
    for make, args in (
        (lambda a: VisionTransformer("mu/4", attention=a, rngs=nnx.Rngs(0), **image_kw), (images,)),
        (lambda a: TextTransformer(attention=a, rngs=nnx.Rngs(1), **text_kw), (tokens, mask)),
    ):
        ref, _ = make("einsum")(*args)
        out, _ = make(name)(*args)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
