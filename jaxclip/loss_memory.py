"""Compiled per-device memory of a loss and its gradients alone, for any batch and devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python launch/benchmark.py --what=loss_memory --loss_batch=65536 --loss_dim=512
    python launch/benchmark.py --what=loss_memory --aot=v5p-128 --loss_batch=1048576

The program is `jax.value_and_grad` of `losses.objective` with respect to both embeddings,
the scale and the bias, the embeddings (B, D) float32 split over the devices. It is lowered on
abstract inputs (nothing is allocated) and compiled for the local CPU devices or for a target's
compile-only devices (`jaxclip.aot_targets`); XLA's memory analysis gives the per-device
bytes. Temporaries are what the loss adds on top of its inputs and outputs: the figure that
grows with the global batch in the gather form and not in the ring form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxclip import losses
from jaxclip.mesh import BATCH_AXES, MESH_AXES

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class LossMemory:
    kind: str
    impl: str
    chunk_size: int | None
    batch: int
    dim: int
    devices: int
    temp_bytes: int | None  # None: the compiler refused the program (it does not fit)
    argument_bytes: int | None
    output_bytes: int | None
    error: str = ""

    def row(self) -> dict:
        """The figures of one line of the table, in MiB."""
        temp = None if self.temp_bytes is None else round(self.temp_bytes / MIB, 1)
        row = dict(kind=self.kind, impl=self.impl, chunk_size=self.chunk_size, temp_mib=temp)
        return {**row, "error": self.error} if self.error else row


def compile_loss_and_grads(
    kind: str,
    impl: str,
    batch: int,
    dim: int,
    chunk_size: int | None,
    devices: Sequence,
    compiler_options: dict | None = None,
):
    """The loss's value and gradients, compiled for `devices` on a (devices, 1, 1) mesh."""
    grid = np.array(list(devices)).reshape(len(devices), 1, 1)
    mesh = Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rows = NamedSharding(mesh, P(BATCH_AXES, None))
    embeddings = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))

    def loss(u, v, scale, bias):
        options = dict(mesh=mesh, kind=kind, impl=impl, chunk_size=chunk_size)
        return losses.objective(u, v, scale, bias, **options)[0]

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    lowered = fn.lower(embeddings, embeddings, scalar, scalar)
    return lowered.compile(compiler_options=compiler_options or None)


def measure(
    kind: str,
    impl: str,
    batch: int,
    dim: int,
    chunk_size: int | None,
    devices: Sequence,
    compiler_options: dict | None = None,
) -> LossMemory:
    """Per-device bytes of one compile; a program the compiler refuses for its size is
    reported with the compiler's first line instead of numbers."""
    common = dict(kind=kind, impl=impl, chunk_size=chunk_size, batch=batch, dim=dim)
    common["devices"] = len(devices)
    try:
        compiled = compile_loss_and_grads(
            kind, impl, batch, dim, chunk_size, devices, compiler_options
        )
    except Exception as e:  # only "does not fit" is an answer; anything else is a bug
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        error = str(e).strip().splitlines()[0][:200]
        nothing = dict(temp_bytes=None, argument_bytes=None, output_bytes=None)
        return LossMemory(**common, **nothing, error=error)
    m = compiled.memory_analysis()
    return LossMemory(
        **common,
        temp_bytes=m.temp_size_in_bytes,
        argument_bytes=m.argument_size_in_bytes,
        output_bytes=m.output_size_in_bytes,
    )


def table(
    kinds: Iterable[str],
    impls: Iterable[str],
    chunk_sizes: Iterable[int | None],
    batch: int,
    dim: int,
    devices: Sequence,
    compiler_options: dict | None = None,
) -> list[LossMemory]:
    """Every (kind, impl, chunk size) combination, one compile each."""
    return [
        measure(kind, impl, batch, dim, chunk, devices, compiler_options)
        for kind in kinds
        for impl in impls
        for chunk in chunk_sizes
    ]
