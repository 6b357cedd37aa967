"""The pairwise sigmoid loss of SigLIP (Zhai et al. 2023) over the global batch.

Math
----
With unit embeddings ``u_i`` (image) and ``v_j`` (text) of the GLOBAL batch of B pairs, the
temperature ``t`` (already exponentiated: the model learns log t, initialised to log 10) and
the bias ``b`` (initialised to -10), every pair is a binary classification::

    Z_ij = t * u_i . v_j + b,     y_ij = +1 if i = j else -1
    L    = -1/B * sum_i sum_j log sigmoid(y_ij * Z_ij) = 1/B * sum_ij softplus(-y_ij * Z_ij)
    dL/dZ_ij = -y_ij * sigmoid(-y_ij * Z_ij) / B

Unlike InfoNCE the bias matters here: it sets the prior odds of a pair being a match, and its
gradient is sum_ij dL/dZ_ij. ``bias=None`` means no bias (b = 0). No normalisation couples the
rows, so the loss is one sum over all B^2 pairs: no column pass is needed for the loss, only
for the text-to-image top-1 metric.

Gather form (``impl="gather"``): each device all-gathers the texts and scores its own images
against all of them (b x B, or b x chunk_size at a time with a rematerialised body). The column
argmax for the t2i metric is reduced across devices with a pmax/pmin over B-vectors, without
gathering the images.

Ring form (``impl="ring"``): texts travel around the devices (`ring.visit_ring`); a device adds
its images' terms against each visiting chunk, positives only when the chunk is its own. The
backward pass runs the ring again: the image gradient accumulates locally, the text gradient
travels with its chunk home.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxclip.losses import metrics as metrics_lib
from jaxclip.losses.batch_axes import (
    BATCH_AXES,
    NO_INDEX,
    ROWS,
    SAME,
    BatchAxes,
    check_chunk_size,
    check_pair,
    resolve_batch_axes,
    run_per_device,
)
from jaxclip.losses.ring import check_impl, visit_ring, with_ring_vjp
from jaxclip.losses.tiles import add_rows, lowest_like, running_max, scan_tiles

SUMS = {k: SAME for k in metrics_lib.SUM_KEYS}


def _labels(logits: jax.Array, first_row, first_col) -> jax.Array:
    """y = +1 where the global row and column indices are equal (matched pairs), else -1."""
    rows = first_row + jnp.arange(logits.shape[0], dtype=jnp.int32)
    cols = first_col + jnp.arange(logits.shape[1], dtype=jnp.int32)
    return jnp.where(rows[:, None] == cols[None, :], 1.0, -1.0)


def _empty_max(like: jax.Array) -> tuple:
    return lowest_like(like), jnp.full_like(like, NO_INDEX, jnp.int32)


def _column_max(block: jax.Array, first_row) -> tuple:
    """Per column: the max over this block's rows and its global row index."""
    return jnp.max(block, axis=0), jnp.argmax(block, axis=0).astype(jnp.int32) + first_row


def _sums(axes: BatchAxes, u, v, arg_i2t, arg_t2i) -> dict:
    first = axes.index() * u.shape[0]
    return {
        "i2t_correct": metrics_lib.correct_count(arg_i2t, first),
        "t2i_correct": metrics_lib.correct_count(arg_t2i, first),
        **metrics_lib.similarity_sums(u, v, axes.psum(jnp.sum(v, axis=0))),
    }


def _gather_per_device(axes: BatchAxes, tile, batch, u, v, scale, bias):
    first, local = axes.index() * u.shape[0], u.shape[0]
    v_all = axes.all_gather(v)

    def body(acc, text_tile, start):
        total, best, index = acc
        logits = scale * (u @ text_tile.T) + bias
        total = total + jnp.sum(jax.nn.softplus(-_labels(logits, first, start) * logits))
        seen = jax.lax.stop_gradient(logits)
        best, index = running_max(best, index, seen, start, axis=1)
        return (total, best, index), _column_max(seen, first)

    init = (jnp.zeros_like(u[0, 0]), *_empty_max(u[:, 0]))
    (total, _, arg_i2t), (col_best, col_arg) = scan_tiles(
        body, init, v_all, tile, remat=tile is not None
    )
    # Text j's best image over the whole batch: the largest column max of any device, the
    # smallest row index among devices that reach it (jnp.argmax's tie-break).
    best = axes.pmax(col_best)
    arg_all = axes.pmin(jnp.where(col_best == best, col_arg, NO_INDEX))
    arg_t2i = jax.lax.dynamic_slice_in_dim(arg_all, first, local)
    return axes.psum(total) / batch, axes.psum(_sums(axes, u, v, arg_i2t, arg_t2i))


def _ring_forward(axes: BatchAxes, tile, batch, u, v, scale, bias):
    me, local = axes.index(), u.shape[0]

    def step(rows, texts, cols, source):
        def body(rows, xs, start):
            total, best, index = rows
            text_tile, col_acc = xs
            logits = scale * (u @ text_tile.T) + bias
            labels = _labels(logits, me * local, source * local + start)
            total = total + jnp.sum(jax.nn.softplus(-labels * logits))
            best, index = running_max(best, index, logits, source * local + start, axis=1)
            col_acc = running_max(*col_acc, logits, me * local, axis=0)
            return (total, best, index), col_acc

        return scan_tiles(body, rows, (texts, cols), tile)

    rows = (jnp.zeros_like(u[0, 0]), *_empty_max(u[:, 0]))
    (total, _, arg_i2t), (_, arg_t2i) = visit_ring(step, rows, v, _empty_max(v[:, 0]), axes)
    return axes.psum(total) / batch, axes.psum(_sums(axes, u, v, arg_i2t, arg_t2i))


def _ring_backward(axes: BatchAxes, tile, batch, u, v, scale, bias, g):
    """Gradients of g * loss with respect to (u, v, scale, bias), one tile at a time."""
    me, local = axes.index(), u.shape[0]

    def step(acc, texts, grad_text, source):
        def body(acc, text_tile, start):
            grad_u, grad_scale, grad_bias, grad_text = acc
            dots = u @ text_tile.T
            logits = scale * dots + bias
            labels = _labels(logits, me * local, source * local + start)
            grad_logits = (-g / batch) * labels * jax.nn.sigmoid(-labels * logits)
            grad_u = grad_u + scale * (grad_logits @ text_tile)
            grad_text = add_rows(grad_text, scale * (grad_logits.T @ u), start)
            grad_scale = grad_scale + jnp.sum(grad_logits * dots)
            return (grad_u, grad_scale, grad_bias + jnp.sum(grad_logits), grad_text), None

        (*acc, grad_text), _ = scan_tiles(body, (*acc, grad_text), texts, tile)
        return tuple(acc), grad_text

    zero = jnp.zeros_like(u[0, 0])
    (grad_u, grad_scale, grad_bias), grad_v = visit_ring(
        step, (jnp.zeros_like(u), zero, zero), v, jnp.zeros_like(v), axes
    )
    return grad_u, grad_v, axes.psum(grad_scale), axes.psum(grad_bias)


def sigmoid_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    scale: jax.Array | float,
    bias: jax.Array | float | None = None,
    *,
    mesh: Mesh | None,
    batch_axes: Sequence[str] = BATCH_AXES,
    chunk_size: int | None = None,
    impl: str = "gather",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SigLIP's sigmoid loss over the global batch; arguments as `contrastive_loss`.

    ``scale`` is the exponentiated temperature t, ``bias`` the learned b (None: b = 0).
    Returns ``(loss, metrics)`` with the same metric keys as `contrastive_loss`.
    """
    axes = resolve_batch_axes(mesh, batch_axes)
    batch = check_pair(image_emb, text_emb, axes)
    check_chunk_size(chunk_size)
    check_impl(impl)
    u, v = image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    used_bias = jnp.zeros((), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)

    args = (u, v, scale, used_bias)
    specs = (ROWS, ROWS, SAME, SAME)
    if impl == "gather":
        per_device = partial(_gather_per_device, axes, chunk_size, batch)
        loss, sums = run_per_device(per_device, mesh, axes, specs, (SAME, SUMS))(*args)
    else:
        forward = partial(_ring_forward, axes, chunk_size, batch)
        backward = partial(_ring_backward, axes, chunk_size, batch)
        loss, sums = with_ring_vjp(
            run_per_device(forward, mesh, axes, specs, (SAME, SUMS)),
            run_per_device(backward, mesh, axes, (*specs, SAME), (ROWS, ROWS, SAME, SAME)),
            *args,
        )
    return loss, metrics_lib.finalize(loss, sums, batch, scale, None if bias is None else used_bias)
