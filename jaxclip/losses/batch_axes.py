"""The mesh axes a loss's batch is split over, and the collectives a loss uses on them.

A loss is written once, as the program of one device holding its rows of the global batch.
`BatchAxes` gives that program its collectives; on a single device (no mesh) they become
the identity, so the same code is its own one-device reference. `run_per_device` runs the
program under `jax.shard_map` over the batch axes (or directly without a mesh).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # the batch is split over these; "tensor" replicates it
NO_INDEX = jnp.iinfo(jnp.int32).max  # "no argmax yet": loses every tie-break
ROWS = "rows"  # spec: leading dimension split over the batch axes, the rest replicated
SAME = "same"  # spec: replicated on every device


@dataclasses.dataclass(frozen=True)
class BatchAxes:
    """`names` of the mesh axes holding the batch (None: one device) and their device count."""

    names: tuple[str, ...] | None
    size: int

    def index(self) -> jax.Array | int:
        """This device's position along the batch axes: its rows start at index * local."""
        return 0 if self.names is None else jax.lax.axis_index(self.names)

    def psum(self, x):
        return x if self.names is None else jax.lax.psum(x, self.names)

    def pmax(self, x):
        return x if self.names is None else jax.lax.pmax(x, self.names)

    def pmin(self, x):
        return x if self.names is None else jax.lax.pmin(x, self.names)

    def all_gather(self, x: jax.Array) -> jax.Array:
        """Every device's rows, in global order (tiled gather over the batch axes)."""
        return x if self.names is None else jax.lax.all_gather(x, self.names, tiled=True)

    def hop(self, x):
        """Sends `x` (a pytree) to the next device on the ring of batch shards."""
        if self.names is None or self.size == 1:
            return x
        ring = [(i, (i + 1) % self.size) for i in range(self.size)]
        return jax.tree.map(lambda a: jax.lax.ppermute(a, self.names, ring), x)


def resolve_batch_axes(mesh: Mesh | None, names: Sequence[str] = BATCH_AXES) -> BatchAxes:
    """The batch axes of `mesh`, checked; `mesh=None` is one device."""
    if mesh is None:
        return BatchAxes(None, 1)
    names = tuple(names)
    missing = [a for a in names if a not in mesh.axis_names]
    if missing or not names:
        raise ValueError(_axes_message(names, missing, mesh))
    return BatchAxes(names, math.prod(mesh.shape[a] for a in names))


def _axes_message(names: tuple[str, ...], missing: list[str], mesh: Mesh) -> str:
    if not names:
        return f"batch_axes must name at least one axis of the mesh {mesh.axis_names}."
    return (
        f"batch axes {missing} are not axes of the mesh {mesh.axis_names}; pass "
        f"batch_axes= naming the axes the batch is sharded over."
    )


def check_pair(image_emb: jax.Array, text_emb: jax.Array, axes: BatchAxes) -> int:
    """The global batch of two (B, D) embedding arrays, checked against the batch shards."""
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"expected two (B, D) arrays of equal shape, got {image_emb.shape} and {text_emb.shape}"
        )
    batch = image_emb.shape[0]
    if batch % axes.size:
        raise ValueError(
            f"batch {batch} is not divisible by the {axes.size} batch shards {axes.names}: "
            f"make the global batch a multiple of the number of devices along them."
        )
    return batch


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(
            f"chunk_size must be a positive number of columns or None, got {chunk_size}"
        )


def run_per_device(
    fn: Callable, mesh: Mesh | None, axes: BatchAxes, in_specs: tuple, out_specs
) -> Callable:
    """`fn` as the program of each device over the batch axes (itself when there is no mesh).

    Specs use the placeholders ROWS (split over the batch axes) and SAME (replicated).
    """
    if mesh is None:
        return fn

    def spec(s):
        return P(axes.names) if s is ROWS else P()

    def specs(tree):
        return jax.tree.map(spec, tree, is_leaf=lambda s: s in (ROWS, SAME))

    return jax.shard_map(
        fn, mesh=mesh, in_specs=specs(in_specs), out_specs=specs(out_specs), check_vma=True
    )
