"""Visiting the columns of a logits block a tile at a time, and the running reductions.

A loss never needs a whole row of logits at once: a log-sum-exp, a sum and an argmax can
each be carried from tile to tile. `scan_tiles` runs a body over the column tiles (the
last one shorter when the tile does not divide the columns); the `running_*` helpers are
the carried reductions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def scan_tiles(
    body: Callable[[Any, Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any,
    tile: int | None,
    *,
    remat: bool = False,
) -> tuple[Any, Any]:
    """`body(carry, xs_tile, start) -> (carry, ys_tile)` over the leading axis of `xs`.

    `xs` is a pytree of arrays with the same leading length n; the body sees `tile` rows of
    each at a time, `start` being the first row's index. Full tiles go through one
    `lax.scan`, a remainder (n % tile rows) through one more call. The per-tile outputs
    `ys` are put back together to n rows. `tile=None` (or >= n) is one call on everything.
    With `remat` the body is rematerialised in the backward pass, so autodiff stores only
    the carries, never a tile's logits.
    """
    n = jax.tree.leaves(xs)[0].shape[0]
    if remat:
        body = jax.checkpoint(body, prevent_cse=False)
    if tile is None or tile >= n:
        return body(carry, xs, 0)
    full, rest = divmod(n, tile)
    head = jax.tree.map(lambda x: x[: full * tile].reshape(full, tile, *x.shape[1:]), xs)
    starts = jnp.arange(full, dtype=jnp.int32) * tile
    carry, ys = jax.lax.scan(lambda c, a: body(c, *a), carry, (head, starts))
    ys = jax.tree.map(lambda y: y.reshape(full * tile, *y.shape[2:]), ys)
    if rest:
        tail = jax.tree.map(lambda x: x[full * tile :], xs)
        carry, ys_tail = body(carry, tail, full * tile)
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, ys_tail)
    return carry, ys


def running_max(
    best: jax.Array, index: jax.Array, block: jax.Array, offset, axis: int
) -> tuple[jax.Array, jax.Array]:
    """Merges a block into a running (max, argmax) along `axis` of the block.

    `offset` is the global index of the block's first entry along `axis`. Ties go to the
    smaller global index, as `jnp.argmax` over the whole row would, whatever the order in
    which blocks arrive.
    """
    block_best = jnp.max(block, axis=axis)
    block_index = jnp.argmax(block, axis=axis).astype(jnp.int32) + offset
    take = (block_best > best) | ((block_best == best) & (block_index < index))
    return jnp.maximum(best, block_best), jnp.where(take, block_index, index)


def running_sum_exp(
    old_max: jax.Array, new_max: jax.Array, total: jax.Array, block: jax.Array, axis: int
) -> jax.Array:
    """Online log-sum-exp: `total` = sum exp(x - old_max) so far, rescaled to `new_max`
    (which already includes this block's max) with the block added."""
    shifted = block - jnp.expand_dims(new_max, axis)
    return total * jnp.exp(old_max - new_max) + jnp.sum(jnp.exp(shifted), axis=axis)


def add_rows(total: jax.Array, rows: jax.Array, start) -> jax.Array:
    """`total` with `rows` added to its rows from `start` on, updated in place (a carried
    accumulator, unlike a scan output, needs no second buffer of its size)."""
    current = jax.lax.dynamic_slice_in_dim(total, start, rows.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(total, current + rows, start, axis=0)


def lowest_like(x: jax.Array) -> jax.Array:
    """-inf of x's shape; made from x so that under shard_map it varies like x."""
    return jnp.full_like(x, -jnp.inf, dtype=jnp.float32)
