"""The ring: every device sees every chunk of the batch without anyone gathering it.

Device k starts with its own rows. At step r it holds the chunk of device (k - r) mod n,
scores its rows against it, then passes the chunk to device k + 1 (a collective permute);
after n steps every (row chunk, column chunk) pair has met once, on the row's device. What
a chunk's columns accumulate (a column log-sum-exp, a column gradient) travels with it and
takes one more hop at the end, which brings it back to the chunk's own device. A device
holds its rows, one visiting chunk (two while it is in flight) and one tile of logits:
memory does not depend on the number of devices, so it does not grow with the global batch.

Autodiff through the ring would store every visited chunk for the backward pass (n chunks:
the gathered batch again). `with_ring_vjp` instead gives a loss its own backward program,
which runs the ring a second time and recomputes each tile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jaxclip.losses.batch_axes import BatchAxes

LOSS_IMPLS = ("gather", "ring")


def check_impl(impl: str) -> None:
    if impl not in LOSS_IMPLS:
        raise ValueError(
            f"unknown loss impl {impl!r}; valid impls are {LOSS_IMPLS} (gather: all-gather the "
            f"embeddings; ring: pass them around the devices, memory independent of the batch)"
        )


def visit_ring(
    step: Callable[[Any, Any, Any, jax.Array], tuple[Any, Any]],
    local: Any,
    chunk: Any,
    travel: Any,
    axes: BatchAxes,
) -> tuple[Any, Any]:
    """Runs `step(local, chunk, travel, source) -> (local, travel)` once per chunk of the batch.

    `local` stays on the device; `chunk` (what the rows are scored against) and `travel`
    (the accumulators of its columns) move to the next device after every step; `source`
    is the device whose chunk is being visited. The last hop moves only `travel`, which so
    returns to its own device. Returns the final `local` and the device's own `travel`.
    """
    me, n = axes.index(), axes.size

    def body(r, carry):
        local, chunk, travel = carry
        local, travel = step(local, chunk, travel, (me - r) % n)
        return local, axes.hop(chunk), axes.hop(travel)

    if n > 1:
        local, chunk, travel = jax.lax.fori_loop(0, n - 1, body, (local, chunk, travel))
    local, travel = step(local, chunk, travel, (me - (n - 1)) % n)
    return local, axes.hop(travel)


def with_ring_vjp(forward: Callable, backward: Callable, *args: jax.Array):
    """Calls `forward(*args) -> (value, sums, *residuals)` with `backward` as its gradient.

    `backward(*args, *residuals, g)` returns the gradient of `g * value` with respect to
    each of `args`. `sums` (the metrics' global sums) carry no gradient.
    """

    @jax.custom_vjp
    def loss(*args):
        value, sums, *_ = forward(*args)
        return value, sums

    def loss_fwd(*args):
        value, sums, *residuals = forward(*args)
        return (value, sums), (args, tuple(residuals))

    def loss_bwd(saved, cotangents):
        args, residuals = saved
        return tuple(backward(*args, *residuals, cotangents[0]))

    loss.defvjp(loss_fwd, loss_bwd)
    return loss(*args)
