"""Model tower tests: shapes, parameter counts, pooling, precision, and a numpy reference."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxclip.models.layers import TransformerStack
from jaxclip.models.lift import LiftModel
from jaxclip.models.text import TextTransformer
from jaxclip.models.two_tower import build_clip, count_params, param_counts
from jaxclip.models.vit import VisionTransformer, decode_variant

TINY_TEXT = dict(vocab_size=50, context_length=12, width=32, depth=2, heads=2, proj_dim=16)


def tiny_vit(**kwargs) -> VisionTransformer:
    cfg = dict(image_size=16, proj_dim=16, rngs=nnx.Rngs(0))
    cfg.update(kwargs)
    return VisionTransformer("mu/4", **cfg)


def tiny_text(**kwargs) -> TextTransformer:
    cfg = dict(TINY_TEXT, rngs=nnx.Rngs(1))
    cfg.update(kwargs)
    return TextTransformer(**cfg)


def randomize_biases(model: nnx.Module, seed: int = 0) -> None:
    """Zero biases / unit LN gains would hide bugs in how they are applied; perturb them."""
    key = jax.random.key(seed)
    changed = 0
    for path, var in nnx.iter_graph(model):
        name = str(path[-1]) if path else ""
        if isinstance(var, nnx.Param) and ("bias" in name or "scale" in name):
            key, sub = jax.random.split(key)
            var[...] = var[...] + 0.1 * jax.random.normal(sub, var[...].shape)
            changed += 1
    assert changed


def images(batch: int = 2, size: int = 16, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


# ---------------------------------------------------------------------------------------------
# Parameter counts and metadata
# ---------------------------------------------------------------------------------------------


def test_clip_b16_param_count_abstract():
    model = nnx.eval_shape(lambda: build_clip("B/16", image_size=224, embed_dim=512))
    # Abstract: the leaves are shape structs, nothing was allocated.
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert param_counts(model) == dict(
        image=86_192_640, text=63_428_096, other=1, total=149_620_737
    )


def test_every_param_has_logical_axes_of_right_length():
    model = build_clip(
        "mu/4", image_size=16, embed_dim=16, logit_bias=-10.0, **_text_kwargs_for_build()
    )
    params = [(p, v) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]
    assert params
    for path, var in params:
        axes = var.get_metadata().get("logical_axes")
        assert isinstance(axes, tuple), path
        assert len(axes) == var[...].ndim, (path, axes, var[...].shape)


def test_state_is_params_only():
    model = build_clip("mu/4", image_size=16, embed_dim=16, **_text_kwargs_for_build())
    _, state = nnx.split(model)
    assert count_params(state) == count_params(nnx.state(model, nnx.Param))
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_decode_variant():
    assert decode_variant("B/16") == dict(width=768, depth=12, heads=12, mlp_dim=3072, patch=16)
    assert decode_variant("demo/8")["width"] == 128
    with pytest.raises(ValueError, match="valid names"):
        decode_variant("X/16")
    with pytest.raises(ValueError):
        decode_variant("B")


# ---------------------------------------------------------------------------------------------
# Scan / loop / remat equivalence
# ---------------------------------------------------------------------------------------------


def test_scan_and_loop_give_same_output():
    scanned = tiny_vit(scan=True)
    randomize_biases(scanned)
    looped = tiny_vit(scan=False)
    nnx.update(looped, nnx.state(scanned))
    x = images()
    a, inter_a = scanned(x)
    b, inter_b = looped(x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inter_a["tokens"], inter_b["tokens"], rtol=1e-5, atol=1e-6)


def _loss_and_grads(model: nnx.Module, x: jax.Array):
    def loss_fn(m):
        features, _ = m(x)
        return jnp.sum(jnp.sin(features))

    return nnx.value_and_grad(loss_fn)(model)


@pytest.mark.parametrize("scan", [True, False])
def test_remat_gives_same_output_and_gradients(scan):
    plain = tiny_vit(scan=scan)
    randomize_biases(plain)
    remat = tiny_vit(scan=scan, remat=True)
    nnx.update(remat, nnx.state(plain))
    x = images()
    loss_a, grads_a = _loss_and_grads(plain, x)
    loss_b, grads_b = _loss_and_grads(remat, x)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Text tower
# ---------------------------------------------------------------------------------------------


def _text_batch(lengths=(5, 9), seq_len: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, TINY_TEXT["vocab_size"], size=(len(lengths), seq_len))
    mask = (np.arange(seq_len)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    tokens = np.where(mask, tokens, 0)
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)


def test_text_padding_tokens_do_not_change_feature():
    model = tiny_text()
    tokens, mask = _text_batch()
    feats, inter = model(tokens, mask)
    np.testing.assert_array_equal(inter["eot_index"], [4, 8])
    # Replace the padding (positions at/after each length) with arbitrary ids.
    junk = jnp.asarray(np.random.default_rng(1).integers(1, 50, size=tokens.shape), jnp.int32)
    feats2, _ = model(jnp.where(mask.astype(bool), tokens, junk), mask)
    np.testing.assert_allclose(feats, feats2, rtol=1e-5, atol=1e-6)


def test_text_feature_independent_of_padded_length():
    model = tiny_text()
    tokens, mask = _text_batch(seq_len=12)
    short_feats, _ = model(tokens[:, :9], mask[:, :9])  # L < context_length
    long_feats, _ = model(tokens, mask)
    np.testing.assert_allclose(short_feats, long_feats, rtol=1e-5, atol=1e-6)


def test_text_attention_is_causal():
    model = tiny_text()
    tokens, mask = _text_batch(lengths=(12, 12))
    _, inter = model(tokens, mask)
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 50)
    _, inter2 = model(changed, mask)
    np.testing.assert_allclose(
        inter["tokens"][:, :7], inter2["tokens"][:, :7], rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(inter["tokens"][:, 7:], inter2["tokens"][:, 7:])


def test_text_default_param_count():
    model = nnx.eval_shape(lambda: TextTransformer(rngs=nnx.Rngs(0)))
    assert count_params(model) == 63_428_096


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------


def test_mean_pool_vit_has_no_class_token_and_width_out_dim():
    vit = tiny_vit(pool="mean", proj_dim=None)
    assert vit.class_token is None
    assert vit.out_dim == 32
    assert vit.pos_embed[...].shape == (16, 32)  # (16/4)^2 patches, no extra token
    feats, inter = vit(images())
    assert feats.shape == (2, 32) and feats.dtype == jnp.float32
    assert inter["tokens"].shape == (2, 16, 32)
    np.testing.assert_allclose(feats, inter["pooled"], rtol=1e-6)


def test_cls_pool_vit_shapes():
    vit = tiny_vit()
    feats, inter = vit(images())
    assert vit.out_dim == 16 and feats.shape == (2, 16)
    assert inter["tokens"].shape == (2, 16, 32) and inter["pooled"].shape == (2, 32)


def test_wrong_image_size_raises():
    with pytest.raises(ValueError):
        tiny_vit()(images(size=20))


# ---------------------------------------------------------------------------------------------
# Two-tower model
# ---------------------------------------------------------------------------------------------


def _text_kwargs_for_build():
    return dict(text_width=32, text_depth=2, text_heads=2, vocab_size=50, context_length=12)


def test_embeddings_are_unit_norm():
    model = build_clip("mu/4", image_size=16, embed_dim=16, **_text_kwargs_for_build())
    tokens, mask = _text_batch()
    out = model(images(), tokens, mask)
    np.testing.assert_allclose(jnp.linalg.norm(out["image"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(out["text"], axis=-1), 1.0, rtol=1e-5)
    assert out["image"].dtype == jnp.float32 and out["bias"] is None
    np.testing.assert_allclose(out["scale"], 1 / 0.07, rtol=1e-5)


def test_scale_is_the_exponential_of_the_parameter_unclamped():
    """The bound on the scale is the train step's (after each update), not the forward's:
    a forward clamp would cut the parameter's gradient off above the bound."""
    model = build_clip("mu/4", image_size=16, embed_dim=16, **_text_kwargs_for_build())
    model.logit_scale[...] = jnp.asarray(math.log(1000.0))
    np.testing.assert_allclose(model.scale(), 1000.0, rtol=1e-5)


def test_logit_bias_is_optional_param():
    with_bias = build_clip(
        "mu/4", image_size=16, embed_dim=16, logit_bias=-10.0, **_text_kwargs_for_build()
    )
    assert float(with_bias.bias()) == -10.0
    assert param_counts(with_bias)["other"] == 2


def test_lift_model_returns_what_clip_returns_with_the_stored_text_normalized():
    vit = VisionTransformer("mu/4", image_size=16, pool="mean", proj_dim=None, rngs=nnx.Rngs(0))
    model = LiftModel(vit, embed_dim=24, rngs=nnx.Rngs(1))
    stored = np.random.default_rng(0).normal(size=(2, 24)).astype(np.float16)
    out = model(images(), jnp.asarray(stored))
    assert sorted(out) == ["bias", "image", "scale", "text"] and out["bias"] is None
    assert out["image"].shape == out["text"].shape == (2, 24)
    want = stored.astype(np.float64) / np.linalg.norm(stored.astype(np.float64), axis=-1)[:, None]
    np.testing.assert_allclose(out["text"], want, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(out["image"], axis=-1), 1.0, rtol=1e-5)


def test_bfloat16_compute_close_to_float32():
    f32 = build_clip("mu/4", image_size=16, embed_dim=16, **_text_kwargs_for_build())
    bf16 = build_clip(
        "mu/4", image_size=16, embed_dim=16, dtype=jnp.bfloat16, **_text_kwargs_for_build()
    )
    nnx.update(bf16, nnx.state(f32))
    tokens, mask = _text_batch()
    a = f32(images(), tokens, mask)
    b = bf16(images(), tokens, mask)
    for key in ("image", "text"):
        assert b[key].dtype == jnp.float32
        assert np.all(np.isfinite(b[key]))
        np.testing.assert_allclose(a[key], b[key], atol=5e-2)
    # Params stay float32 regardless of compute dtype.
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(bf16)))


# ---------------------------------------------------------------------------------------------
# Independent float64 numpy reference for the ViT forward
# ---------------------------------------------------------------------------------------------


def _np_layer_norm(x, g, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def _np_block(x, p, i, heads):
    """One pre-norm block in plain numpy, written with fused 2-D matrices like PyTorch's CLIP."""
    n, width = x.shape
    hd = width // heads
    h = _np_layer_norm(x, p["ln1_scale"][i], p["ln1_bias"][i])
    qkv = []
    for name in ("q", "k", "v"):
        w = p[f"{name}_kernel"][i].reshape(width, width)
        qkv.append(h @ w + p[f"{name}_bias"][i].reshape(width))
    q, k, v = (t.reshape(n, heads, hd).transpose(1, 0, 2) for t in qkv)  # (H, N, hd)
    logits = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    attn = (probs @ v).transpose(1, 0, 2).reshape(n, width)
    x = x + attn @ p["out_kernel"][i].reshape(width, width) + p["out_bias"][i]
    h = _np_layer_norm(x, p["ln2_scale"][i], p["ln2_bias"][i])
    h = h @ p["fc1_kernel"][i] + p["fc1_bias"][i]
    h = h / (1 + np.exp(-1.702 * h))  # QuickGELU
    return x + h @ p["fc2_kernel"][i] + p["fc2_bias"][i]


def _np_vit(vit: VisionTransformer, img: np.ndarray) -> np.ndarray:
    def f64(v):
        return np.asarray(v[...], np.float64)

    p = {name: f64(getattr(vit.blocks, name)) for name in TransformerStack.PARAM_NAMES}
    patch, out = vit.patch, []
    kernel = f64(vit.patch_kernel)  # (p, p, 3, width)
    for image in img:
        s = image.shape[0] // patch
        # Strided convolution written as explicit loops over the patch grid.
        tokens = np.stack(
            [
                np.einsum(
                    "hwc,hwcd->d",
                    image[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch],
                    kernel,
                )
                for r in range(s)
                for c in range(s)
            ]
        )
        x = np.concatenate([f64(vit.class_token)[None], tokens]) + f64(vit.pos_embed)
        x = _np_layer_norm(x, f64(vit.ln_pre.scale), f64(vit.ln_pre.bias))
        for i in range(vit.blocks.depth):
            x = _np_block(x, p, i, vit.blocks.heads)
        pooled = _np_layer_norm(x[0], f64(vit.ln_post.scale), f64(vit.ln_post.bias))
        out.append(pooled @ f64(vit.proj))
    return np.stack(out)


def test_vit_matches_numpy_float64_reference():
    vit = tiny_vit()
    randomize_biases(vit, seed=3)
    x = images(seed=5)
    feats, _ = vit(x)
    ref = _np_vit(vit, np.asarray(x, np.float64))
    np.testing.assert_allclose(np.asarray(feats, np.float64), ref, rtol=1e-4, atol=1e-4)
