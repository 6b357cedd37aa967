"""Contrastive gradient accumulation: the gradient cache (Gao et al. 2021, arXiv 2101.06983).

A contrastive loss couples every pair of the batch, so averaging the gradients of k smaller
batches is not the gradient of one large batch: each micro-batch would see only its own
negatives. The gradient cache keeps the full batch's negatives with a micro-batch's memory:

1. embed every micro-batch with no gradient (no activations are kept);
2. take the loss and its gradient with respect to the embeddings over the full batch (the
   embeddings are small: B x D);
3. rerun each micro-batch's forward under `jax.vjp`, pull its slice of that gradient back to
   the parameters, and sum over micro-batches.

By the chain rule the sum is the full-batch parameter gradient, so an update from it equals
the update of one step over the whole batch. It costs one extra forward per micro-batch.

Micro-batches are cut from every device's block of the batch (each device takes its share
of every micro-batch), so cutting and reassembling them moves no data and every micro-batch
keeps all devices busy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxclip.mesh import BATCH_AXES

Outputs = Mapping[str, Any]


def accumulated_value_and_grad(
    embed_fn: Callable[[Any, Any], Outputs],
    loss_fn: Callable[[Outputs], tuple[jax.Array, Any]],
    params: Any,
    batch: Any,
    *,
    steps: int,
    mesh: Mesh | None,
    batch_axes: Sequence[str] = BATCH_AXES,
) -> tuple[tuple[jax.Array, Any], Any]:
    """`jax.value_and_grad(lambda p: loss_fn(embed_fn(p, batch)), has_aux=True)(params)`,
    computed in `steps` micro-batches with the memory of one.

    Args:
      embed_fn: `(params, micro_batch) -> outputs`, a pytree whose array leaves are either
        per-example (leading axis = the micro-batch, e.g. "image", "text": (b, D)) or
        per-model scalars (ndim 0, e.g. "scale", "bias"; None leaves are allowed). It must
        treat examples independently (no batch statistics) and be deterministic.
      loss_fn: `(outputs of the full batch) -> (loss, aux)`, e.g. a call of
        `losses.objective`; it sees the per-example leaves of the whole batch, in order.
      params: the pytree differentiated.
      batch: pytree of arrays with the global batch on the leading axis, sharded over
        `batch_axes` of `mesh` (replicated over the others).
      steps: number of micro-batches; it must divide every device's share of the batch.
        1 is plain `value_and_grad`.
      mesh, batch_axes: where the batch lives (`mesh=None`: one device).

    Returns:
      `((loss, aux), grads)`, equal to the full-batch `value_and_grad` within float rounding.
    """
    if steps == 1:
        return jax.value_and_grad(lambda p: loss_fn(embed_fn(p, batch)), has_aux=True)(params)
    _check_steps(steps, batch, mesh, batch_axes)
    micro = micro_batches(batch, steps, mesh, batch_axes)
    first_micro = jax.tree.map(lambda x: x[0], micro)
    # True for a per-example leaf, False for a per-model scalar.
    rows = jax.tree.map(lambda s: s.ndim > 0, jax.eval_shape(embed_fn, params, first_micro))

    def embed(micro_batch):
        out = jax.lax.stop_gradient(embed_fn(params, micro_batch))
        return _by_kind(rows, lambda x: _constrain_rows(x, mesh, batch_axes), _same, out)

    stacked = jax.lax.map(embed, micro)  # per-example: (steps, B / steps, ...); scalars: (steps,)
    outputs = _by_kind(rows, lambda x: _join(x, mesh, batch_axes), lambda s: s[0], stacked)
    (loss, aux), output_grads = jax.value_and_grad(loss_fn, has_aux=True)(outputs)

    def once(g):  # a per-model scalar's gradient is the whole batch's: pull it back once
        return jnp.zeros((steps, *g.shape), g.dtype).at[0].set(g)

    cut_grads = _by_kind(
        rows, lambda g: micro_batches(g, steps, mesh, batch_axes), once, output_grads
    )

    def accumulate(total, xs):
        micro_batch, micro_grads = xs
        _, pull_back = jax.vjp(lambda p: embed_fn(p, micro_batch), params)
        (grads,) = pull_back(micro_grads)
        return jax.tree.map(jnp.add, total, grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(accumulate, zeros, (micro, cut_grads))
    return (loss, aux), grads


def _same(x):
    return x


def _by_kind(rows, per_example: Callable, per_model: Callable, tree):
    """Applies `per_example` to the leaves that `rows` marks True, `per_model` to the others."""
    return jax.tree.map(lambda r, x: per_example(x) if r else per_model(x), rows, tree)


def _check_steps(steps: int, batch, mesh: Mesh | None, batch_axes: Sequence[str]) -> None:
    shards = 1 if mesh is None else math.prod(mesh.shape[a] for a in batch_axes)
    global_batch = jax.tree.leaves(batch)[0].shape[0]
    if steps < 1 or global_batch % (shards * steps):
        raise ValueError(_steps_message(steps, global_batch, shards))


def _steps_message(steps: int, global_batch: int, shards: int) -> str:
    per_device = global_batch / shards
    return (
        f"Cannot cut the batch into {steps} micro-batches: each of the {shards} batch shards "
        f"holds {per_device:g} examples (global batch {global_batch}), which {steps} must "
        f"divide. Choose train.accum_steps among the divisors of {per_device:g}, or change "
        f"data.batch_size."
    )


def micro_batches(
    tree: Any, steps: int, mesh: Mesh | None, batch_axes: Sequence[str] = BATCH_AXES
) -> Any:
    """Leaves (B, ...) -> (steps, B / steps, ...): micro-batch m takes the m-th slice of every
    device's block.

    Each device reshapes its own block, so no data moves, and micro-batch m is again split
    over the batch axes.
    """

    def local(blocks):
        return jax.tree.map(lambda b: b.reshape(steps, b.shape[0] // steps, *b.shape[1:]), blocks)

    if mesh is None:
        return local(tree)
    axes = tuple(batch_axes)
    return jax.shard_map(local, mesh=mesh, in_specs=P(axes), out_specs=P(None, axes))(tree)


def _join(x: jax.Array, mesh: Mesh | None, batch_axes: Sequence[str]) -> jax.Array:
    """The inverse of `micro_batches`: (steps, B / steps, ...) -> (B, ...) in the batch's order."""

    def local(block):
        return block.reshape(block.shape[0] * block.shape[1], *block.shape[2:])

    if mesh is None:
        return local(x)
    axes = tuple(batch_axes)
    return jax.shard_map(local, mesh=mesh, in_specs=P(None, axes), out_specs=P(axes))(x)


def _constrain_rows(outputs: jax.Array, mesh: Mesh | None, batch_axes: Sequence[str]):
    """Keeps a micro-batch's per-example outputs split over the batch axes."""
    if mesh is None:
        return outputs
    return jax.lax.with_sharding_constraint(outputs, NamedSharding(mesh, P(tuple(batch_axes))))
