"""The squared similarity loss against a float64 reference, on one and on 8 devices."""

import jax
import jax.numpy as jnp
import loss_references as ref
import numpy as np
import pytest

from jaxclip.losses import objective, squared_loss

BATCH, DIM, SCALE = 32, 16, 3.0
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def reference_loss(u, v, s) -> float:
    """mean over all (i, j) of (s u_i.v_j - [i = j])^2, in float64, from the B x B matrix."""
    z = s * np.float64(u) @ np.float64(v).T
    return float(np.mean((z - np.eye(len(z))) ** 2))


def reference_grads(u, v, s) -> dict[str, np.ndarray]:
    u, v = np.float64(u), np.float64(v)
    sims = u @ v.T
    g = 2.0 * (s * sims - np.eye(len(u))) / len(u) ** 2  # dL/dZ
    return {"u": s * g @ v, "v": s * g.T @ u, "scale": float(np.sum(g * sims))}


def objective_and_grads(u, v, *, mesh, impl="gather", bias=0.5):
    def f(u, v, s, b):
        return objective(u, v, s, b, mesh=mesh, kind="squared", impl=impl)

    fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))
    return fn(u, v, jnp.float32(SCALE), jnp.float32(bias))


@pytest.mark.parametrize("impl", ["gather", "ring"])
@pytest.mark.parametrize("shape", [None, *ref.MESH_SHAPES])
def test_loss_and_grads_match_float64_reference_on_a_sharded_batch(shape, impl):
    mesh = None if shape is None else ref.mesh(shape)
    u, v = ref.embeddings(BATCH, DIM, seed=1, noise=0.5)
    (total, metrics), grads = objective_and_grads(*ref.place(mesh, u, v), mesh=mesh, impl=impl)
    np.testing.assert_allclose(total, reference_loss(u, v, SCALE), **LOSS_TOL)
    np.testing.assert_allclose(metrics["loss"], total)
    want = reference_grads(u, v, SCALE)
    np.testing.assert_allclose(grads[0], want["u"], **GRAD_TOL)
    np.testing.assert_allclose(grads[1], want["v"], **GRAD_TOL)
    np.testing.assert_allclose(grads[2], want["scale"], **GRAD_TOL)
    assert float(grads[3]) == 0.0  # no bias in the formula
    for key, value in ref.metrics(u, v).items():  # InfoNCE's metrics, on the same pairs
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_orthonormal_matched_pairs_at_scale_one_have_zero_loss():
    u = np.eye(DIM, dtype=np.float32)[:8]
    assert float(squared_loss(u, u, 1.0, mesh=None)) == 0.0
    # At another scale every matched pair misses its target by (s - 1).
    np.testing.assert_allclose(squared_loss(u, u, 3.0, mesh=None), 8 * 2.0**2 / 64, rtol=1e-6)


def test_pairing_matters():
    u, v = ref.embeddings(BATCH, DIM, seed=2, noise=0.3)
    shuffled = v[np.roll(np.arange(BATCH), 1)]
    paired = float(squared_loss(u, v, SCALE, mesh=None))
    assert paired < float(squared_loss(u, shuffled, SCALE, mesh=None)) - 0.1
    np.testing.assert_allclose(
        squared_loss(u, shuffled, SCALE, mesh=None), reference_loss(u, shuffled, SCALE), rtol=1e-5
    )


def test_positive_pair_term_is_added_when_weighted():
    u, v = ref.embeddings(BATCH, DIM, seed=3, noise=0.5)
    total, metrics = objective(u, v, SCALE, mesh=None, kind="squared", positive_weight=0.5)
    pos = np.mean(1.0 - np.sum(np.float64(u) * v, axis=-1))
    np.testing.assert_allclose(total, reference_loss(u, v, SCALE) + 0.5 * pos, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], reference_loss(u, v, SCALE), rtol=1e-5)
