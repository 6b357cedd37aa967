"""Device mesh, logical-axis rules and shardings.

Every parameter carries `logical_axes` metadata (e.g. ("embed", "mlp")); the config maps
logical names to mesh axes (`embed -> fsdp`, `mlp -> tensor`, ...). Nothing outside this
module turns names into devices, so a model runs unchanged on 1 CPU, a GPU pod or a TPU slice.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxclip import distributed

MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over these axes; "tensor" replicates it.
BATCH_AXES = ("data", "fsdp")
# Logical names of an attention operand (batch, length, heads, head_dim).
ATTN_AXES = ("batch", "length", "act_heads", "act_kv")


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts JAX's multi-controller runtime from flags or the environment (SLURM, Cloud TPU,
    JAX_* variables); a no-op for a single process. See `jaxclip.distributed.initialize`."""
    return distributed.initialize(coordinator_address, num_processes, process_id)


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves the mesh sizes from the config; at most one axis may be -1 (fill the rest)."""
    shape = [int(sizes[a]) for a in MESH_AXES]
    fill = [i for i, s in enumerate(shape) if s == -1]
    if len(fill) > 1:
        named = dict(zip(MESH_AXES, shape, strict=True))
        raise ValueError(f"At most one mesh axis may be -1, got {named}.")
    known = math.prod(s for s in shape if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(
                f"Cannot fill mesh axis {MESH_AXES[fill[0]]!r}: {num_devices} devices are not "
                f"divisible by the other axes' product {known}."
            )
        shape[fill[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} devices "
            f"but {num_devices} are available. Set one axis to -1 to fill, e.g. "
            f"--config.mesh.shape.data=-1."
        )
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) over `devices` (default: all devices).

    `data` is the outermost axis and devices come host by host (slice by slice on multi-slice
    TPU), so across hosts it is the data axis, whose gradient all-reduce is the lightest
    traffic, that crosses the slow network; fsdp and tensor stay within a host or slice.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1:
        grid = multi_slice_grid(shape, devices, num_slices)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def multi_slice_grid(shape: Sequence[int], devices: Sequence, num_slices: int) -> np.ndarray:
    """Devices of several TPU slices (joined by the data-centre network) as a (data, fsdp,
    tensor) array: the data axis runs across slices, each slice holds a contiguous block."""
    if shape[0] % num_slices:
        named = dict(zip(MESH_AXES, shape, strict=True))
        raise ValueError(
            f"The devices span {num_slices} slices, so the data axis must be a multiple of "
            f"{num_slices} (only it crosses slices); got mesh {named}. "
            f"Set e.g. --config.mesh.shape.data={num_slices} --config.mesh.shape.fsdp=-1."
        )
    per_slice = (shape[0] // num_slices, *shape[1:])
    return mesh_utils.create_hybrid_device_mesh(per_slice, (num_slices, 1, 1), devices)


Rule = str | Sequence[str] | None


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    rules: Mapping[str, Rule],
    mesh: Mesh,
) -> PartitionSpec:
    """Maps logical names to mesh axes (one axis or a tuple of them, e.g. the batch over
    (data, fsdp)); size-1 and already-used axes are dropped, and a dimension the remaining
    axes do not divide is replicated."""
    spec, used = [], set()
    for name, dim in zip(logical_axes, shape, strict=True):
        rule = rules.get(name) if name is not None else None
        axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if not axes or dim % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


# --- Activation sharding ---------------------------------------------------------------------
# Whoever traces a model (the train step) opens `activation_sharding(mesh, rules)`; inside it
# the towers' `constrain(x, logical names)` calls pin activations to the mesh through the
# same rules as the parameters. Outside it they do nothing, so model code names no device.

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar(
    "jaxclip_activation_sharding", default=None
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Mapping[str, Rule]) -> Iterator[None]:
    """Within this block, `constrain` shards activations over `mesh` by `rules`."""
    token = _ACTIVE.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`x` constrained to the sharding its logical axis names map to; a no-op outside
    `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(logical_axes, x.shape, rules, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def current_platform() -> str:
    """The platform the model is being traced for: the active mesh's devices (an
    ahead-of-time compile for a TPU targets TPU from a CPU host), else JAX's default."""
    active = _ACTIVE.get()
    if active is None:
        return jax.default_backend()
    return active[0].devices.flat[0].platform


def map_over_shards(
    fn: Callable,
    args: Sequence[jax.Array],
    in_names: Sequence[Sequence[str | None]],
    out_names: Sequence[str | None],
):
    """`fn(*args)` run per shard (`shard_map`) with each array split by its logical names,
    for code XLA cannot partition itself (a custom kernel); a plain call outside
    `activation_sharding`. `fn` must be independent across the split dimensions."""
    active = _ACTIVE.get()
    if active is None:
        return fn(*args)
    mesh, rules = active
    in_specs = tuple(
        logical_to_spec(names, a.shape, rules, mesh)
        for a, names in zip(args, in_names, strict=True)
    )
    out_spec = in_specs[list(in_names).index(tuple(out_names))]
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)
    return mapped(*args)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_specs(state: nnx.State, rules: Mapping[str, Rule], mesh: Mesh):
    """PartitionSpecs (a pytree like `state`) from each parameter's `logical_axes`."""

    def spec(var):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            return PartitionSpec()
        return logical_to_spec(axes, value.shape, rules, mesh)

    return jax.tree.map(spec, state, is_leaf=_is_variable)


def named(mesh: Mesh, specs):
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension over (data, fsdp); every other dimension replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_size_per_process(global_batch: int, mesh: Mesh) -> int:
    """Rows this process must feed: its devices' share of the global batch."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % shards:
        raise ValueError(
            f"Global batch {global_batch} is not divisible by the {shards} batch shards "
            f"(mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})."
        )
    return global_batch // jax.process_count()


def global_batch(mesh: Mesh, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Turns this process's numpy batch into global arrays sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), v)
        for k, v in local.items()
    }


def bytes_per_device(tree, shardings) -> int:
    """Largest per-device footprint of a (possibly abstract) pytree under `shardings`."""
    per_device: dict[int, int] = {}
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        shard = s.shard_shape(x.shape)
        nbytes = math.prod(shard) * np.dtype(x.dtype).itemsize
        for d in s.addressable_devices if hasattr(s, "addressable_devices") else s.device_set:
            per_device[d.id] = per_device.get(d.id, 0) + nbytes
    return max(per_device.values()) if per_device else 0


def describe(mesh: Mesh) -> str:
    axes = " x ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
    kind = mesh.devices.flat[0].platform
    return f"{axes} ({mesh.devices.size} {kind} devices, {jax.process_count()} processes)"
