"""SigLIP's sigmoid loss against a float64 numpy reference, on sharded meshes, both impls."""

import math

import jax
import jax.numpy as jnp
import loss_references as ref
import numpy as np
import pytest
from flax import nnx

from jaxclip import config as config_lib
from jaxclip.losses import objective, positive_pair_loss, sigmoid_loss
from jaxclip.models.build import build_clip_model

BATCH, DIM = 32, 16
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
PAPER_INIT = (10.0, -10.0)  # t = exp(log 10), b = -10


def _loss_and_grads(u, v, t, b, *, mesh, impl="gather", chunk_size=None):
    """Loss, metrics and gradients w.r.t. (image, text, log t, bias): t is learned as log t."""

    def f(u, v, log_t, b):
        return sigmoid_loss(u, v, jnp.exp(log_t), b, mesh=mesh, impl=impl, chunk_size=chunk_size)

    fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))
    (loss, metrics), grads = fn(u, v, jnp.float32(math.log(t)), jnp.float32(b))
    return loss, metrics, grads


@pytest.mark.parametrize("impl", ["gather", "ring"])
@pytest.mark.parametrize(("t", "b"), [PAPER_INIT, (4.0, -1.5)])
@pytest.mark.parametrize("shape", ref.MESH_SHAPES)
def test_loss_and_grads_match_float64_reference(shape, t, b, impl):
    mesh = ref.mesh(shape)
    u, v = ref.embeddings(BATCH, DIM, seed=1, noise=0.7)
    loss, _, grads = _loss_and_grads(*ref.place(mesh, u, v), t, b, mesh=mesh, impl=impl)
    want = ref.sigmoid_grads(u, v, t, b)
    np.testing.assert_allclose(loss, ref.sigmoid_loss(u, v, t, b), **LOSS_TOL)
    for got, key in zip(grads, ("u", "v", "log_t", "bias"), strict=True):
        np.testing.assert_allclose(got, want[key], err_msg=key, **GRAD_TOL)


@pytest.mark.parametrize(("impl", "chunk_size"), [("gather", None), ("gather", 5), ("ring", 3)])
def test_metrics_match_float64_reference(impl, chunk_size):
    mesh = ref.mesh((2, 2, 2))
    u, v = ref.embeddings(BATCH, DIM, seed=5, noise=0.9)
    want = ref.metrics(u, v)
    assert 0.0 < want["i2t_top1"] < 1.0 and 0.0 < want["t2i_top1"] < 1.0
    place = ref.place(mesh, u, v)
    _, metrics, _ = _loss_and_grads(
        *place, *PAPER_INIT, mesh=mesh, impl=impl, chunk_size=chunk_size
    )
    for key, value in want.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(metrics["logit_scale"], 10.0, rtol=1e-6)
    np.testing.assert_allclose(metrics["logit_bias"], -10.0)
    np.testing.assert_allclose(metrics["loss"], ref.sigmoid_loss(u, v, *PAPER_INIT), **LOSS_TOL)


def test_the_bias_changes_the_loss_and_none_means_zero():
    u, v = ref.embeddings(BATCH, DIM, seed=2, noise=0.7)
    mesh = ref.mesh((4, 2, 1))
    u, v = ref.place(mesh, u, v)
    loss = jax.jit(lambda b: sigmoid_loss(u, v, 10.0, b, mesh=mesh))
    with_bias, _ = loss(-10.0)
    zero_bias, _ = loss(0.0)
    no_bias, metrics = jax.jit(lambda: sigmoid_loss(u, v, 10.0, None, mesh=mesh))()
    assert abs(float(with_bias) - float(zero_bias)) > 1.0
    np.testing.assert_allclose(no_bias, zero_bias, rtol=1e-6)
    assert "logit_bias" not in metrics


def test_reference_with_shifted_labels_does_not_match():
    # Proves the comparison can fail: a wrongly labelled loss is far from the implementation.
    mesh = ref.mesh((4, 2, 1))
    u, v = ref.embeddings(BATCH, DIM, seed=6, noise=0.5)
    loss, _, _ = _loss_and_grads(*ref.place(mesh, u, v), 4.0, -1.5, mesh=mesh, impl="ring")
    wrong = ref.sigmoid_loss(u, v, 4.0, -1.5, labels=np.roll(np.arange(BATCH), 1))
    assert not np.isclose(float(loss), wrong, rtol=1e-3)


def test_siglip_objective_adds_the_weighted_positive_pair_term():
    mesh = ref.mesh((8, 1, 1))
    u, v = ref.place(mesh, *ref.embeddings(BATCH, DIM, seed=9, noise=1.0))
    total, metrics = jax.jit(
        lambda u, v: objective(
            u, v, 10.0, -10.0, mesh=mesh, kind="siglip", impl="ring", positive_weight=0.5
        )
    )(u, v)
    base, _ = jax.jit(lambda u, v: sigmoid_loss(u, v, 10.0, -10.0, mesh=None))(u, v)
    pos = jax.jit(positive_pair_loss)(u, v)
    np.testing.assert_allclose(total, base + 0.5 * pos, **LOSS_TOL)
    np.testing.assert_allclose(metrics["loss"], base, **LOSS_TOL)
    np.testing.assert_allclose(metrics["total"], total, **LOSS_TOL)


@pytest.mark.parametrize("name", ["demo_siglip", "vit_b16_siglip"])
def test_siglip_configs_start_at_the_papers_temperature_and_bias(name):
    cfg = config_lib.load_config(name)
    assert cfg.loss.kind == "siglip"
    # The towers shrunk (the scale and bias do not depend on them), built as training does.
    tiny = {"image.variant": "mu/8", "embed_dim": 32, "text.width": 32, "text.depth": 1}
    config_lib.apply_overrides(cfg, [(f"model.{k}", str(v)) for k, v in tiny.items()])

    def scale_and_bias():
        model = build_clip_model(cfg.model, image_size=32, vocab_size=64, rngs=nnx.Rngs(0))
        return model.scale(), model.bias()

    scale, bias = jax.jit(scale_and_bias)()
    np.testing.assert_allclose(scale, 10.0, rtol=1e-6)
    np.testing.assert_allclose(bias, -10.0)
