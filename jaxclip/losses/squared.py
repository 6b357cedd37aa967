"""The squared loss on similarities that Chen et al. (2023) contrast with InfoNCE.

Math
----
With unit embeddings ``u_i`` (image) and ``v_j`` (text) of the GLOBAL batch of B pairs and
the (already exponentiated) logit scale ``s``, every pair's scaled similarity is regressed
onto a target, 1 for a matched pair and 0 for any other::

    L = 1/B^2 * sum_i sum_j (s * u_i . v_j - y_ij)^2,     y_ij = 1 if i = j else 0

This is our reading: the paper's exact formula (weights of the positive and negative
terms, the targets) could not be confirmed. Its point, that a squared loss can fit the
training pairs and still fail at zero-shot transfer where InfoNCE succeeds, holds for this
form. No bias is used (it is accepted, like InfoNCE's, and gets a zero gradient).

Expanding the square gives a form that never builds the B x B similarities::

    sum_ij (s u_i.v_j)^2 = s^2 * ||U V^T||_F^2 = s^2 * <U^T U, V^T V>_F
    L = (s^2 * <U^T U, V^T V>_F - 2 s * sum_i u_i . v_i + B) / B^2

Each device adds its rows' D x D Gram matrices ``u^T u`` and ``v^T v`` and its matched dot
products; one psum of 2 D^2 + 1 numbers gives the global loss, whatever the batch. Nothing
of size B is gathered, so the loss needs neither the gather nor the ring and its memory
does not grow with the batch. Gradients are autodiff's (the psum's transpose is a psum).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxclip.losses.batch_axes import (
    BATCH_AXES,
    ROWS,
    SAME,
    BatchAxes,
    check_pair,
    resolve_batch_axes,
    run_per_device,
)


def _per_device(axes: BatchAxes, batch: int, u, v, scale):
    gram_u = axes.psum(u.T @ u)
    gram_v = axes.psum(v.T @ v)
    matched = axes.psum(jnp.sum(u * v))
    total = scale * scale * jnp.sum(gram_u * gram_v) - 2.0 * scale * matched + batch
    return total / (float(batch) * batch)


def squared_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    scale: jax.Array | float,
    *,
    mesh: Mesh | None,
    batch_axes: Sequence[str] = BATCH_AXES,
) -> jax.Array:
    """The squared similarity loss over the global batch (see the module docstring).

    ``image_emb``, ``text_emb``: (B, D) unit embeddings split over ``batch_axes`` of
    ``mesh`` (None: one device); ``scale`` the exponentiated logit scale. Returns the
    float32 scalar loss; `losses.objective(kind="squared")` adds the metrics.
    """
    axes = resolve_batch_axes(mesh, batch_axes)
    batch = check_pair(image_emb, text_emb, axes)
    u, v = image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    run = run_per_device(partial(_per_device, axes, batch), mesh, axes, (ROWS, ROWS, SAME), SAME)
    return run(u, v, scale)
