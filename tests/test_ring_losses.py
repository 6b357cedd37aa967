"""The ring losses equal the gather losses, and their memory does not grow with the batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import loss_references as ref
import numpy as np
import pytest

from jaxclip import loss_memory
from jaxclip.losses import contrastive_loss, sigmoid_loss

DIM, SCALE = 16, 10.0
LOSSES = {"contrastive": contrastive_loss, "siglip": sigmoid_loss}
TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def _both_impls(kind, u, v, bias, *, mesh, chunk_size):
    """(loss, metrics, grads) of the gather form and the ring form, in one jitted program."""
    loss = LOSSES[kind]
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)

    def value_and_grads(impl):
        def f(u, v, s, *b):
            return loss(u, v, s, *b, mesh=mesh, chunk_size=chunk_size, impl=impl)

        return jax.value_and_grad(f, argnums=argnums, has_aux=True)

    args = (u, v, jnp.float32(SCALE)) + (() if bias is None else (jnp.float32(bias),))
    both = jax.jit(lambda *a: (value_and_grads("gather")(*a), value_and_grads("ring")(*a)))
    return both(*args)


# Global batches that are (32 = 8 x 4) and are not (40 = 8 x 5) multiples of the chunk.
CASES = [(32, 4, None), (40, 3, -2.5), (32, None, 0.7)]


@pytest.mark.parametrize(("batch", "chunk_size", "bias"), CASES)
@pytest.mark.parametrize("shape", ref.MESH_SHAPES)
@pytest.mark.parametrize("kind", ["contrastive", "siglip"])
def test_ring_equals_gather(kind, shape, batch, chunk_size, bias):
    mesh = ref.mesh(shape)
    u, v = ref.place(mesh, *ref.embeddings(batch, DIM, seed=batch, noise=0.9))
    ((g_loss, g_metrics), g_grads), ((r_loss, r_metrics), r_grads) = _both_impls(
        kind, u, v, bias, mesh=mesh, chunk_size=chunk_size
    )
    np.testing.assert_allclose(r_loss, g_loss, **TOL)
    assert r_metrics.keys() == g_metrics.keys()
    for key in g_metrics:
        np.testing.assert_allclose(r_metrics[key], g_metrics[key], err_msg=key, **TOL)
    for i, (got, want) in enumerate(zip(r_grads, g_grads, strict=True)):
        np.testing.assert_allclose(got, want, err_msg=f"argument {i}", **GRAD_TOL)
    assert 0.0 < float(g_metrics["i2t_top1"]) < 1.0  # bookkeeping errors would show


@pytest.mark.parametrize("kind", ["contrastive", "siglip"])
def test_ties_go_to_the_first_index_as_in_argmax(kind):
    mesh = ref.mesh((2, 2, 2))
    # 8 pairs repeated 4 times: pair i ties with pairs i + 8, i + 16, i + 24, which sit on the
    # other devices (8 rows each), and the ring meets them in another order than argmax.
    u, v = (np.tile(x, (4, 1)) for x in ref.embeddings(8, DIM, seed=3, noise=0.1))
    want = ref.metrics(u, v)
    assert 0.0 < want["i2t_top1"] < 1.0
    gather_out, ring_out = _both_impls(kind, *ref.place(mesh, u, v), None, mesh=mesh, chunk_size=3)
    (_, gather), (_, ring) = gather_out[0], ring_out[0]
    for key in ("i2t_top1", "t2i_top1"):
        np.testing.assert_allclose(ring[key], want[key], err_msg=key)
        np.testing.assert_allclose(gather[key], want[key], err_msg=key)


def test_ring_on_one_device_without_a_mesh_equals_gather():
    u, v = ref.embeddings(24, DIM, seed=4, noise=0.9)
    for kind in LOSSES:
        (gather, g_grads), (ring, r_grads) = _both_impls(
            kind, jnp.asarray(u), jnp.asarray(v), -1.0, mesh=None, chunk_size=5
        )
        np.testing.assert_allclose(ring[0], gather[0], **TOL)
        for got, want in zip(r_grads, g_grads, strict=True):
            np.testing.assert_allclose(got, want, **GRAD_TOL)


def test_ring_gradients_keep_the_batch_sharding_of_the_inputs():
    mesh = ref.mesh((4, 2, 1))
    u, v = ref.place(mesh, *ref.embeddings(32, DIM, seed=2))
    _, (_, grads) = _both_impls("siglip", u, v, -1.0, mesh=mesh, chunk_size=None)
    assert grads[0].sharding.is_equivalent_to(u.sharding, 2)
    assert grads[1].sharding.is_equivalent_to(v.sharding, 2)


def test_ring_memory_does_not_grow_with_the_global_batch():
    """Compiled temporaries of loss + gradients at a fixed local batch, 1 -> 8 devices."""
    local, dim, chunk = 256, 64, 64
    block = local * dim * 4  # bytes of one device's embeddings
    for kind in LOSSES:

        def temps(impl, n, kind=kind):
            measured = loss_memory.measure(kind, impl, local * n, dim, chunk, jax.devices()[:n])
            return measured.temp_bytes

        ring_1, ring_8 = temps("ring", 1), temps("ring", 8)
        # The ring adds a fixed number of local blocks (the visiting chunk, its gradient and
        # their copies in flight between devices), whatever the number of devices.
        assert ring_8 <= ring_1 + 6 * block, (kind, ring_1, ring_8)
        assert temps("ring", 4) == ring_8, kind
        # The gather form holds the gathered batch: the same measurement sees it grow.
        gather_1, gather_8 = temps("gather", 1), temps("gather", 8)
        assert gather_8 >= gather_1 + 7 * block, (kind, gather_1, gather_8)


def test_benchmark_prints_the_loss_memory_of_every_combination():
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4"
    )
    flags = ["--loss_batch=1024", "--loss_dim=64", "--loss_chunk=0,64", "--loss_kind=siglip"]
    out = subprocess.run(
        [sys.executable, "launch/benchmark.py", "--what=loss_memory", *flags],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4 and result["batch_size"] == 1024
    rows = {(r["impl"], r["chunk_size"]): r["temp_mib"] for r in result["rows"]}
    assert set(rows) == {("gather", None), ("gather", 64), ("ring", None), ("ring", 64)}
    assert rows["ring", 64] < rows["gather", 64] < rows["gather", None]
