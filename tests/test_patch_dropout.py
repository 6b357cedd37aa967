"""Patch dropout (FLIP) and remat policies: what training changes and evaluation does not."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import tiny_config

from jaxclip import mesh as mesh_lib
from jaxclip import run_setup
from jaxclip.models.layers import REMAT_POLICIES
from jaxclip.models.vit import VisionTransformer
from jaxclip.train_step import make_train_step


def vit(patch_dropout: float = 0.0, **kwargs) -> VisionTransformer:
    # 32 px, patch 4: 64 patch tokens.
    return VisionTransformer(
        "mu/4", image_size=32, proj_dim=16, patch_dropout=patch_dropout, rngs=nnx.Rngs(0), **kwargs
    )


def images(batch: int = 4) -> jax.Array:
    return jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))


@pytest.mark.parametrize("fraction,kept", [(0.5, 32), (0.75, 16), (0.9, 6)])
def test_training_keeps_the_requested_fraction_of_patches(fraction, kept):
    model = vit(fraction)
    assert model.patches_kept == kept
    ids = jnp.broadcast_to(jnp.arange(64.0)[None, :, None], (8, 64, 1))  # token i holds i
    out = np.asarray(model.drop_patches(ids, jax.random.key(3)))[..., 0]
    assert out.shape == (8, kept)
    for row in out:  # distinct patches, in their original order
        assert len(set(row)) == kept and np.all(np.diff(row) > 0)
    assert len({tuple(row) for row in out}) > 1  # each example draws its own subset
    _, inter = model(images(), rng=jax.random.key(3))
    assert inter["tokens"].shape == (4, kept, model.width)  # class token kept apart


def test_the_drop_is_a_function_of_the_key():
    model = vit(0.5)
    a, _ = model(images(), rng=jax.random.key(7))
    b, _ = model(images(), rng=jax.random.key(7))
    c, _ = model(images(), rng=jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_evaluation_keeps_every_patch():
    dropped = vit(0.5)
    plain = vit(0.0)
    out, inter = dropped(images())  # no rng: evaluation
    ref, _ = plain(images())
    assert inter["tokens"].shape[1] == 64
    np.testing.assert_array_equal(out, ref)


def test_out_of_range_fraction_is_refused():
    with pytest.raises(ValueError, match="fraction of patches dropped"):
        vit(1.0)


def _step_loss(cfg) -> float:
    setup = run_setup.build(cfg, jax.devices()[:1])
    state = run_setup.init_state(setup)
    rng = np.random.default_rng(0)
    b, s, length = cfg.data.batch_size, cfg.data.image_size, cfg.data.context_length
    batch = {
        "image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
        "tokens": rng.integers(1, 8, (b, length)).astype(np.int32),
        "mask": np.ones((b, length), np.int32),
    }
    _, metrics = make_train_step(setup)(state, mesh_lib.global_batch(setup.mesh, batch))
    return float(metrics["loss"])


def test_the_train_step_drops_patches_deterministically_from_the_step():
    plain = _step_loss(tiny_config())
    dropped = _step_loss(tiny_config(**{"model.image.patch_dropout": 0.5}))
    again = _step_loss(tiny_config(**{"model.image.patch_dropout": 0.5}))
    assert dropped == again
    assert dropped != plain


def _grads(model: VisionTransformer):
    def loss(m):
        features, _ = m(images(2))
        return jnp.sum(jnp.sin(features))

    return nnx.grad(loss)(model)


@pytest.mark.parametrize("policy", REMAT_POLICIES)
def test_every_remat_policy_gives_the_plain_gradients(policy):
    reference = _grads(vit())
    grads = _grads(vit(remat=True, remat_policy=policy))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_unknown_remat_policy_lists_the_valid_ones():
    with pytest.raises(ValueError, match="dots_saveable"):
        vit(remat=True, remat_policy="save_all")
