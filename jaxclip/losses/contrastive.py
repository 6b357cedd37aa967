"""Global-batch InfoNCE (the CLIP loss), in a gather form and a ring form.

Math
----
Let ``u_i`` and ``v_i`` (i = 1..B) be the L2-normalised image and text embeddings of the GLOBAL
batch and ``s`` the (already exponentiated and clamped) logit scale. The logits are
``Z_ij = s * u_i . v_j`` and the symmetric InfoNCE loss is::

    L = -1/(2B) * sum_i [ log softmax_j(Z_ij)[i] + log softmax_j(Z_ji)[i] ]
      =  1/(2B) * sum_i [ lse_j(Z_ij) + lse_j(Z_ji) - 2 Z_ii ]

The first term classifies each image among all texts (rows of Z), the second each text among
all images (columns of Z). Softmax is shift invariant, so a scalar logit bias cancels in both
terms: it is accepted so that callers pass the same (scale, bias) to every objective, it is not
used, and it receives a zero gradient. Its gradient with respect to the logits is::

    dL/dZ_ij = 1/(2B) * [ softmax_row(Z)_ij + softmax_col(Z)_ij - 2 [i = j] ]

Gather form (``impl="gather"``)
-------------------------------
Each device all-gathers U and V (B x D each), forms the logits of its OWN rows against all
columns (local images x all texts, local texts x all images: two b x B blocks, b = B / devices),
reduces them to per-row log-sum-exps and psums the scalar sums. With ``chunk_size`` the columns
are visited a tile at a time with an online (running-max) log-sum-exp and a rematerialised
body, so the logits take O(b * chunk_size) in the forward and the backward pass; the gathered
B x D embeddings (and their gradients) remain. Gradients flow back through the all_gather,
whose transpose is a reduce-scatter; JAX derives every backward collective.

Ring form (``impl="ring"``)
---------------------------
Texts travel around the devices (`ring.visit_ring`). A device's image rows accumulate their
log-sum-exp online as each text chunk visits; each text chunk carries its columns' running
(max, sum) and collects every device's images on its way round. No device ever holds more than
its own rows, one visiting chunk and a b x chunk_size tile. The backward pass runs the ring
again with the saved per-row and per-column log-sum-exps, recomputes each tile's softmaxes,
accumulates the image gradient locally and lets the text gradient travel with its chunk.
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
from jaxclip.losses.tiles import add_rows, lowest_like, running_max, running_sum_exp, scan_tiles

SUMS = {k: SAME for k in metrics_lib.SUM_KEYS}


def _merge_lse(acc: tuple, logits: jax.Array, offset, axis: int) -> tuple:
    """Adds a block to running (max, sum of exp(x - max), argmax) along `axis`."""
    best, total, index = acc
    new_best, index = running_max(best, index, logits, offset, axis)
    # The running max is only a numerical shift: lse = m + log(sum exp(x - m)) has the exact
    # softmax gradient when m is held constant.
    new_best = jax.lax.stop_gradient(new_best)
    return new_best, running_sum_exp(best, new_best, total, logits, axis), index


def _empty_lse(like: jax.Array) -> tuple:
    return lowest_like(like), jnp.zeros_like(like), jnp.full_like(like, NO_INDEX, jnp.int32)


def _row_lse_argmax(rows, cols, scale, tile):
    """Row log-sum-exp and argmax of ``scale * rows @ cols.T``, `tile` columns at a time."""
    if tile is None:  # the whole block at once: XLA's fused logsumexp keeps fewer copies
        logits = scale * (rows @ cols.T)
        return jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def body(acc, col_tile, start):
        return _merge_lse(acc, scale * (rows @ col_tile.T), start, axis=1), None

    acc, _ = scan_tiles(body, _empty_lse(rows[:, 0]), cols, tile, remat=True)
    best, total, index = acc
    return best + jnp.log(total), index


def _loss_and_sums(axes, batch, u, v, scale, lse_i2t, lse_t2i, arg_i2t, arg_t2i):
    """Global loss and metric sums from this device's rows' log-sum-exps and argmaxes."""
    first = axes.index() * u.shape[0]
    pos_logit = scale * jnp.sum(u * v, axis=-1)
    local = jnp.sum(lse_i2t) + jnp.sum(lse_t2i) - 2.0 * jnp.sum(pos_logit)
    sums = {
        "i2t_correct": metrics_lib.correct_count(arg_i2t, first),
        "t2i_correct": metrics_lib.correct_count(arg_t2i, first),
        **metrics_lib.similarity_sums(u, v, axes.psum(jnp.sum(v, axis=0))),
    }
    return axes.psum(local) / (2.0 * batch), axes.psum(sums)


def _gather_per_device(axes: BatchAxes, tile, batch, u, v, scale):
    u_all, v_all = axes.all_gather(u), axes.all_gather(v)
    lse_i2t, arg_i2t = _row_lse_argmax(u, v_all, scale, tile)  # local images vs all texts
    lse_t2i, arg_t2i = _row_lse_argmax(v, u_all, scale, tile)  # local texts vs all images
    return _loss_and_sums(axes, batch, u, v, scale, lse_i2t, lse_t2i, arg_i2t, arg_t2i)


def _ring_forward(axes: BatchAxes, tile, batch, u, v, scale):
    """Loss, sums and the residuals of the backward ring: per-row and per-column lse."""
    me, local = axes.index(), u.shape[0]

    def step(rows, texts, cols, source):
        def body(rows, xs, start):
            text_tile, col_acc = xs
            logits = scale * (u @ text_tile.T)
            rows = _merge_lse(rows, logits, source * local + start, axis=1)
            return rows, _merge_lse(col_acc, logits, me * local, axis=0)

        return scan_tiles(body, rows, (texts, cols), tile)

    empty = _empty_lse(u[:, 0])
    rows, cols = visit_ring(step, empty, v, empty, axes)
    lse_i2t, lse_t2i = rows[0] + jnp.log(rows[1]), cols[0] + jnp.log(cols[1])
    loss, sums = _loss_and_sums(axes, batch, u, v, scale, lse_i2t, lse_t2i, rows[2], cols[2])
    return loss, sums, lse_i2t, lse_t2i


def _ring_backward(axes: BatchAxes, tile, batch, u, v, scale, lse_i2t, lse_t2i, g):
    """Gradients of g * loss with respect to (u, v, scale), one tile of logits at a time."""
    weight = g / (2.0 * batch)

    def step(local, chunk, grad_text, source):
        def body(acc, xs, start):
            grad_u, grad_scale, grad_text = acc
            text_tile, lse_t2i_tile = xs
            dots = u @ text_tile.T
            logits = scale * dots
            softmaxes = jnp.exp(logits - lse_i2t[:, None]) + jnp.exp(logits - lse_t2i_tile)
            grad_logits = weight * softmaxes
            grad_u = grad_u + scale * (grad_logits @ text_tile)
            grad_text = add_rows(grad_text, scale * (grad_logits.T @ u), start)
            return (grad_u, grad_scale + jnp.sum(grad_logits * dots), grad_text), None

        (*local, grad_text), _ = scan_tiles(body, (*local, grad_text), chunk, tile)
        return tuple(local), grad_text

    zero = jnp.zeros_like(u[0, 0])
    (grad_u, grad_scale), grad_v = visit_ring(
        step, (jnp.zeros_like(u), zero), (v, lse_t2i), jnp.zeros_like(v), axes
    )
    # The -2 Z_ii term touches only matched pairs, which sit on the same device.
    grad_u = grad_u - 2.0 * weight * scale * v
    grad_v = grad_v - 2.0 * weight * scale * u
    grad_scale = grad_scale - 2.0 * weight * jnp.sum(u * v)
    return grad_u, grad_v, axes.psum(grad_scale)


def contrastive_loss(
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
    """Symmetric InfoNCE over the global batch, sharded so no device holds the B x B logits.

    Args:
      image_emb, text_emb: (B, D) L2-normalised global arrays, sharded over ``batch_axes``
        (replicated over any other mesh axis).
      scale: scalar logit scale (already exponentiated and clamped).
      bias: optional scalar logit bias; it cancels in the softmax (see the module docstring).
      mesh: device mesh; ``None`` computes on a single device with the same code.
      batch_axes: mesh axes the batch dimension is sharded over.
      chunk_size: if set, logits are formed this many columns at a time (the last tile may be
        shorter).
      impl: ``"gather"`` or ``"ring"`` (see the module docstring).

    Returns:
      ``(loss, metrics)`` with float32 scalar metrics ``loss``, ``i2t_top1``, ``t2i_top1``,
      ``logit_scale``, ``pos_sim``, ``neg_sim`` (and ``logit_bias`` when a bias is given).
    """
    axes = resolve_batch_axes(mesh, batch_axes)
    batch = check_pair(image_emb, text_emb, axes)
    check_chunk_size(chunk_size)
    check_impl(impl)
    u, v = image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    bias = None if bias is None else jnp.asarray(bias, jnp.float32)

    if impl == "gather":
        per_device = partial(_gather_per_device, axes, chunk_size, batch)
        run = run_per_device(per_device, mesh, axes, (ROWS, ROWS, SAME), (SAME, SUMS))
        loss, sums = run(u, v, scale)
    else:
        forward = run_per_device(
            partial(_ring_forward, axes, chunk_size, batch),
            mesh,
            axes,
            (ROWS, ROWS, SAME),
            (SAME, SUMS, ROWS, ROWS),
        )
        backward = run_per_device(
            partial(_ring_backward, axes, chunk_size, batch),
            mesh,
            axes,
            (ROWS, ROWS, SAME, ROWS, ROWS, SAME),
            (ROWS, ROWS, SAME),
        )
        loss, sums = with_ring_vjp(forward, backward, u, v, scale)
    return loss, metrics_lib.finalize(loss, sums, batch, scale, bias)
