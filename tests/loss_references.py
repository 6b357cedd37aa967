"""Float64 numpy references for the losses, and the meshes and embeddings their tests use."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_SHAPES = [(8, 1, 1), (4, 2, 1), (2, 2, 2)]


def mesh(shape):
    return jax.make_mesh(
        shape, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
    )


def place(mesh, *arrays):
    """Arrays split over the batch axes of `mesh` (on one device when mesh is None)."""
    if mesh is None:
        return tuple(jnp.asarray(a) for a in arrays)
    sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    return tuple(jax.device_put(a, sharding) for a in arrays)


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def embeddings(batch: int, dim: int, seed: int = 0, noise: float | None = None):
    """Random unit embeddings; with `noise`, texts are noisy copies so top-1 is non-trivial."""
    rng = np.random.default_rng(seed)
    u = normalize(rng.normal(size=(batch, dim)))
    other = rng.normal(size=(batch, dim))
    v = normalize(other if noise is None else u + noise * other)
    return u.astype(np.float32), v.astype(np.float32)


# ---------------------------------------------------------------- InfoNCE


def _log_softmax(z: np.ndarray, axis: int) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def _softmax(z: np.ndarray, axis: int) -> np.ndarray:
    return np.exp(_log_softmax(z, axis))


def infonce_loss(u, v, s, b=0.0, labels=None) -> float:
    """-1/(2B) sum_i [log softmax_j(Z_ij)[label_i] + log softmax_j(Z_ji)[label_i]]."""
    u, v = np.float64(u), np.float64(v)
    z = s * u @ v.T + b
    n = z.shape[0]
    labels = np.arange(n) if labels is None else labels
    i2t = _log_softmax(z, axis=1)[np.arange(n), labels]  # image i over all texts
    t2i = _log_softmax(z, axis=0)[labels, np.arange(n)]  # text i over all images
    return float(-(i2t.sum() + t2i.sum()) / (2 * n))


def infonce_grads(u, v, s, b=0.0) -> dict[str, np.ndarray]:
    """Analytic gradients: dL/dZ = (softmax_rows(Z) - I + softmax_cols(Z) - I) / (2B)."""
    u, v = np.float64(u), np.float64(v)
    sims = u @ v.T
    z = s * sims + b
    n = z.shape[0]
    eye = np.eye(n)
    g = (_softmax(z, axis=1) - eye + _softmax(z, axis=0) - eye) / (2 * n)
    return {"u": s * g @ v, "v": s * g.T @ u, "scale": np.sum(g * sims), "bias": np.sum(g)}


# ---------------------------------------------------------------- SigLIP


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # exact and overflow-free


def sigmoid_loss(u, v, t, b, labels=None) -> float:
    """-1/B sum_ij log sigmoid(y_ij (t u_i.v_j + b)), y = +1 on matched pairs, else -1."""
    u, v = np.float64(u), np.float64(v)
    z = t * u @ v.T + b
    n = z.shape[0]
    y = -np.ones((n, n))
    y[np.arange(n), np.arange(n) if labels is None else labels] = 1.0
    return float(np.sum(np.logaddexp(0.0, -y * z)) / n)


def sigmoid_grads(u, v, t, b) -> dict[str, np.ndarray]:
    """dL/dZ = -y sigmoid(-y Z) / B; "log_t" is the gradient w.r.t. the learned log t."""
    u, v = np.float64(u), np.float64(v)
    sims = u @ v.T
    z = t * sims + b
    n = z.shape[0]
    y = 2.0 * np.eye(n) - 1.0
    g = -y * _sigmoid(-y * z) / n
    return {"u": t * g @ v, "v": t * g.T @ u, "log_t": t * np.sum(g * sims), "bias": np.sum(g)}


# ---------------------------------------------------------------- metrics


def metrics(u, v) -> dict[str, float]:
    """Top-1 (first index on ties, as argmax) and mean matched / unmatched cosine."""
    u, v = np.float64(u), np.float64(v)
    sims = u @ v.T
    n = sims.shape[0]
    off_diag = ~np.eye(n, dtype=bool)
    return {
        "i2t_top1": float(np.mean(sims.argmax(axis=1) == np.arange(n))),
        "t2i_top1": float(np.mean(sims.argmax(axis=0) == np.arange(n))),
        "pos_sim": float(np.mean(np.diag(sims))),
        "neg_sim": float(np.mean(sims[off_diag])),
    }
