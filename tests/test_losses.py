"""InfoNCE, the positive-pair term and `objective` against independent float64 references."""

import jax
import jax.numpy as jnp
import loss_references as ref
import numpy as np
import pytest

from jaxclip.losses import contrastive_loss, objective, positive_pair_loss

BATCH, DIM, SCALE = 32, 16, 10.0
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-5, atol=1e-5)


def _embeddings(seed: int = 0, noise: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    return ref.embeddings(BATCH, DIM, seed, noise)


_mesh, _place = ref.mesh, ref.place
ref_loss, ref_grads, ref_metrics = ref.infonce_loss, ref.infonce_grads, ref.metrics


def _loss_and_grads(u, v, scale, bias=None, *, mesh, chunk_size=None, impl="gather"):
    """Jitted loss, metrics and gradients w.r.t. (image, text, scale[, bias])."""
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)

    def f(u, v, s, *b):
        return contrastive_loss(u, v, s, *b, mesh=mesh, chunk_size=chunk_size, impl=impl)

    fn = jax.jit(jax.value_and_grad(f, argnums=argnums, has_aux=True))
    args = (u, v, jnp.float32(scale)) + (() if bias is None else (jnp.float32(bias),))
    (loss, metrics), grads = fn(*args)
    return loss, metrics, grads


# ---------------------------------------------------------------- contrastive loss


@pytest.mark.parametrize("impl", ["gather", "ring"])
@pytest.mark.parametrize("bias", [None, -2.5])
@pytest.mark.parametrize("shape", ref.MESH_SHAPES)
def test_sharded_loss_and_grads_match_float64_reference(shape, bias, impl):
    mesh = _mesh(shape)
    u, v = _embeddings(seed=1)
    loss, _, grads = _loss_and_grads(*_place(mesh, u, v), SCALE, bias, mesh=mesh, impl=impl)
    b = 0.0 if bias is None else bias
    want = ref_grads(u, v, SCALE, b)
    np.testing.assert_allclose(loss, ref_loss(u, v, SCALE, b), **LOSS_TOL)
    np.testing.assert_allclose(grads[0], want["u"], **GRAD_TOL)
    np.testing.assert_allclose(grads[1], want["v"], **GRAD_TOL)
    np.testing.assert_allclose(grads[2], want["scale"], **GRAD_TOL)
    if bias is not None:  # the bias cancels in the softmax: its reference gradient is ~0
        np.testing.assert_allclose(grads[3], want["bias"], **GRAD_TOL)


def test_gradients_keep_the_batch_sharding_of_the_inputs():
    mesh = _mesh((4, 2, 1))
    u, v = _place(mesh, *_embeddings(seed=2))
    _, _, grads = _loss_and_grads(u, v, SCALE, mesh=mesh)
    assert grads[0].sharding.is_equivalent_to(u.sharding, 2)
    assert grads[1].sharding.is_equivalent_to(v.sharding, 2)


def test_single_device_path_matches_float64_reference():
    u, v = _embeddings(seed=3)
    loss, _, grads = _loss_and_grads(jnp.asarray(u), jnp.asarray(v), SCALE, mesh=None)
    want = ref_grads(u, v, SCALE)
    np.testing.assert_allclose(loss, ref_loss(u, v, SCALE), **LOSS_TOL)
    np.testing.assert_allclose(grads[0], want["u"], **GRAD_TOL)
    np.testing.assert_allclose(grads[1], want["v"], **GRAD_TOL)
    np.testing.assert_allclose(grads[2], want["scale"], **GRAD_TOL)


@pytest.mark.parametrize("shape", [None, (4, 2, 1)])
@pytest.mark.parametrize("chunk_size", [4, 8])
def test_chunked_loss_and_grads_equal_unchunked(shape, chunk_size):
    mesh = None if shape is None else _mesh(shape)
    u, v = _place(mesh, *_embeddings(seed=4, noise=1.0))
    full = _loss_and_grads(u, v, SCALE, 0.3, mesh=mesh)
    chunked = _loss_and_grads(u, v, SCALE, 0.3, mesh=mesh, chunk_size=chunk_size)
    np.testing.assert_allclose(chunked[0], full[0], **LOSS_TOL)
    for got, want in zip(chunked[2], full[2], strict=True):
        np.testing.assert_allclose(got, want, **GRAD_TOL)
    for key in full[1]:
        np.testing.assert_allclose(chunked[1][key], full[1][key], **LOSS_TOL)


@pytest.mark.parametrize(("shape", "chunk_size"), [(None, None), ((2, 2, 2), None), ((8, 1, 1), 8)])
def test_metrics_match_float64_reference(shape, chunk_size):
    mesh = None if shape is None else _mesh(shape)
    # Noisy copies give a top-1 strictly between 0 and 1, so index bookkeeping errors show.
    u, v = _embeddings(seed=5, noise=0.9)
    want = ref_metrics(u, v)
    assert 0.0 < want["i2t_top1"] < 1.0 and 0.0 < want["t2i_top1"] < 1.0
    _, metrics, _ = _loss_and_grads(*_place(mesh, u, v), SCALE, mesh=mesh, chunk_size=chunk_size)
    for key, value in want.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(metrics["logit_scale"], SCALE)
    np.testing.assert_allclose(metrics["loss"], ref_loss(u, v, SCALE), **LOSS_TOL)
    assert all(m.dtype == jnp.float32 and m.shape == () for m in metrics.values())


def test_reference_with_shifted_labels_does_not_match():
    # Proves the comparison can fail: a wrongly labelled loss is far from the implementation.
    mesh = _mesh((4, 2, 1))
    u, v = _embeddings(seed=6, noise=0.5)
    loss, _, _ = _loss_and_grads(*_place(mesh, u, v), SCALE, mesh=mesh)
    wrong = ref_loss(u, v, SCALE, labels=np.roll(np.arange(BATCH), 1))
    assert not np.isclose(float(loss), wrong, rtol=1e-3)


def test_permuting_text_rows_changes_the_loss():
    mesh = _mesh((8, 1, 1))
    u, v = _embeddings(seed=7, noise=0.5)
    perm = np.random.default_rng(0).permutation(BATCH)
    loss, _, _ = _loss_and_grads(*_place(mesh, u, v), SCALE, mesh=mesh)
    permuted, _, _ = _loss_and_grads(*_place(mesh, u, v[perm]), SCALE, mesh=mesh)
    assert float(permuted) > float(loss) + 0.1


def test_chunk_size_not_dividing_the_batch_is_a_shorter_last_tile():
    mesh = _mesh((8, 1, 1))
    u, v = _place(mesh, *_embeddings(seed=10, noise=1.0))
    full = _loss_and_grads(u, v, SCALE, mesh=mesh)
    chunked = _loss_and_grads(u, v, SCALE, mesh=mesh, chunk_size=5)  # 32 = 6 x 5 + 2
    np.testing.assert_allclose(chunked[0], full[0], **LOSS_TOL)
    for got, want in zip(chunked[2], full[2], strict=True):
        np.testing.assert_allclose(got, want, **GRAD_TOL)


def test_chunk_size_must_be_positive():
    u, v = _embeddings()
    with pytest.raises(ValueError, match="chunk_size"):
        contrastive_loss(u, v, SCALE, mesh=_mesh((8, 1, 1)), chunk_size=0)


# ---------------------------------------------------------------- positive-pair / objective


def test_positive_pair_loss_gradient_is_that_of_mean_one_minus_cos():
    rng = np.random.default_rng(8)
    # Not unit length on purpose: the true cosine's gradient differs from the dot product's.
    u = rng.normal(size=(BATCH, DIM)).astype(np.float32)
    v = rng.normal(size=(BATCH, DIM)).astype(np.float32)
    loss, (gu, gv) = jax.jit(jax.value_and_grad(positive_pair_loss, argnums=(0, 1)))(u, v)
    u64, v64 = np.float64(u), np.float64(v)
    nu = np.linalg.norm(u64, axis=1, keepdims=True)
    nv = np.linalg.norm(v64, axis=1, keepdims=True)
    cos = np.sum(u64 * v64, axis=1, keepdims=True) / (nu * nv)
    # d cos / du = v / (|u||v|) - cos * u / |u|^2; loss = mean(1 - cos) flips the sign.
    want_gu = -(v64 / (nu * nv) - cos * u64 / nu**2) / BATCH
    want_gv = -(u64 / (nu * nv) - cos * v64 / nv**2) / BATCH
    np.testing.assert_allclose(loss, np.mean(1.0 - cos), **LOSS_TOL)
    np.testing.assert_allclose(gu, want_gu, **GRAD_TOL)
    np.testing.assert_allclose(gv, want_gv, **GRAD_TOL)


def _objective_grads(kind, positive_weight=0.0, mesh=None):
    u, v = _place(mesh, *_embeddings(seed=9, noise=1.0))

    def f(u, v, s, b):
        return objective(u, v, s, b, mesh=mesh, kind=kind, positive_weight=positive_weight)

    fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))
    return u, v, fn(u, v, jnp.float32(SCALE), jnp.float32(0.5))


def test_cosine_objective_ignores_scale_and_reports_comparable_metrics():
    mesh = _mesh((4, 2, 1))
    u, v, ((total, metrics), grads) = _objective_grads("cosine", mesh=mesh)
    np.testing.assert_allclose(total, positive_pair_loss(u, v), **LOSS_TOL)
    np.testing.assert_allclose(metrics["total"], total)
    assert float(grads[2]) == 0.0 and float(grads[3]) == 0.0
    # Its embedding gradients are those of the cosine term alone.
    gu, gv = jax.grad(positive_pair_loss, argnums=(0, 1))(u, v)
    np.testing.assert_allclose(grads[0], gu, **GRAD_TOL)
    np.testing.assert_allclose(grads[1], gv, **GRAD_TOL)
    want = ref_metrics(np.asarray(u), np.asarray(v))
    for key, value in want.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(metrics["logit_scale"], SCALE)


def test_contrastive_objective_adds_weighted_positive_pair_term():
    weight = 0.7
    u, v, ((total, metrics), grads) = _objective_grads("contrastive", positive_weight=weight)
    (base, _), base_grads = jax.value_and_grad(
        lambda u, v: contrastive_loss(u, v, SCALE, 0.5, mesh=None), argnums=(0, 1), has_aux=True
    )(u, v)
    pos, pos_grads = jax.value_and_grad(positive_pair_loss, argnums=(0, 1))(u, v)
    np.testing.assert_allclose(total, base + weight * pos, **LOSS_TOL)
    np.testing.assert_allclose(metrics["loss"], base, **LOSS_TOL)
    np.testing.assert_allclose(metrics["positive_pair"], pos, **LOSS_TOL)
    np.testing.assert_allclose(metrics["total"], total, **LOSS_TOL)
    for i in range(2):
        np.testing.assert_allclose(grads[i], base_grads[i] + weight * pos_grads[i], **GRAD_TOL)


def test_unknown_objective_kind_raises_naming_valid_kinds():
    u, v = _embeddings()
    with pytest.raises(ValueError, match="contrastive.*siglip.*cosine"):
        objective(u, v, SCALE, mesh=None, kind="sigmoid")


def test_unknown_impl_raises_naming_valid_impls():
    u, v = _embeddings()
    with pytest.raises(ValueError, match="gather.*ring"):
        objective(u, v, SCALE, mesh=None, impl="allgather")
