"""JAX's multi-controller runtime: one process per host (or per GPU), all running this code.

`initialize()` starts `jax.distributed` from, in order: explicit arguments (the launchers'
--coordinator_address/--num_processes/--process_id flags), the `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` variables, a SLURM `srun` task, or a Cloud TPU VM
(JAX detects the slice itself). With none of these it does nothing, so a laptop run stays a
plain single process. It must run before anything touches a JAX device.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxclip import sigterm

# The variables `srun` sets in each task; JAX's SLURM detection needs all of them. The batch
# script itself lacks the step ones, so `python train.py` run there without srun stays single.
_SLURM_TASK_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)


class DistributedError(RuntimeError):
    """The multi-process settings are incomplete or contradictory."""


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{name}={raw!r} is not an integer.") from None


def _in_slurm_task() -> bool:
    return all(v in os.environ for v in _SLURM_TASK_VARS) and int(os.environ["SLURM_NTASKS"]) > 1


def _on_cloud_tpu_vm() -> bool:
    """TPU chips on this machine (read from PCI, before JAX starts), or a GKE TPU pod's
    variables. JAX then finds the slice's hosts itself from the TPU metadata."""
    if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_NUM_SLICES"):
        return True
    try:
        from jax._src import hardware_utils  # private, but the check JAX itself uses

        chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    except (ImportError, AttributeError, OSError):
        return False
    return chips > 0


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts `jax.distributed` when the arguments or the environment describe several
    processes; returns whether it is running. Safe to call twice."""
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")

    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise DistributedError(
                "Multi-process training needs all three of --coordinator_address (host:port of "
                "process 0), --num_processes and --process_id (or the JAX_COORDINATOR_ADDRESS, "
                "JAX_NUM_PROCESSES, JAX_PROCESS_ID variables); got coordinator_address="
                f"{coordinator_address!r}, num_processes={num_processes}, process_id={process_id}."
            )
        if not 0 <= process_id < num_processes:
            raise DistributedError(
                f"--process_id={process_id} must be in [0, --num_processes={num_processes})."
            )
        if num_processes == 1:
            return False
        source = "explicit flags"
    elif _in_slurm_task():
        source = "SLURM"
    elif _on_cloud_tpu_vm():
        source = "Cloud TPU"
    else:
        return False

    _use_gloo_on_cpu()
    # Training agrees on a preemption step itself (PreemptionGuard). JAX's service would
    # catch SIGTERM in C++ from here on and swallow it in runs that never ask it.
    jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except ValueError as e:  # raised before anything started: nothing described the slice
        if source != "Cloud TPU":
            raise
        logging.warning("TPU VM without slice metadata (%s): running as one process.", e)
        return False
    logging.info(
        "jax.distributed initialized from %s: process %d of %d, %d local / %d global devices",
        source,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def _use_gloo_on_cpu() -> None:
    """CPU devices of different processes exchange data through gloo; without it a
    cross-process collective on CPU fails at run time. GPU and TPU backends ignore it."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def is_primary() -> bool:
    """Process 0 logs, writes metrics and shows progress; the others stay quiet."""
    return jax.process_index() == 0


def process_sums(values: Sequence[int]) -> list[int]:
    """The exact sums of integers over all processes (one small collective; every process
    must call it). Sent as base-2**20 digits: JAX arrays are 32-bit unless x64 is enabled."""
    values = [int(v) for v in values]
    if jax.process_count() == 1:
        return values
    if any(v < 0 or v >= 2**60 for v in values):
        raise ValueError(f"process_sums handles 0 <= value < 2**60, got {values}.")
    digits = np.array(
        [[(v >> shift) & (2**20 - 1) for shift in (40, 20, 0)] for v in values], np.int32
    )
    gathered = np.asarray(multihost_utils.process_allgather(digits)).astype(np.int64)
    high, mid, low = (gathered.sum(axis=0)[:, i] for i in range(3))
    return [
        (int(h) << 40) + (int(m) << 20) + int(lo) for h, m, lo in zip(high, mid, low, strict=True)
    ]


def process_sum(value: int) -> int:
    """`process_sums` of one integer."""
    return process_sums([value])[0]


class PreemptionGuard:
    """Says, at the same step on every process, that a SIGTERM asked training to stop.

    SLURM (before a time limit or on preemption) and Cloud TPU (before maintenance) send
    SIGTERM to every process of the job, not at the same instant, and one process saving
    alone would deadlock the collective save. Each process records the signal (`sigterm`:
    blocked and taken by a watcher thread, so it is never lost, also not during restore or
    compilation, and data workers started later never see it). At every step each process
    dispatches a tiny all-reduce (max) of its flag behind the train step and reads the
    previous step's result, which is ready once that step is (the loop waits for it anyway).
    Every process reads the same value, so all stop after the same step, one step after the
    first signal, and the host never blocks for the vote. A single process needs no vote.

    Why not JAX's preemption service (`multihost_utils.reached_preemption_sync_point`): a
    notice that arrives before the first call (while a resumed run restores or compiles)
    sets the sync point to step 1, which a run resumed at step 100 never reaches, so the run
    never stops. `initialize` turns that service off.
    """

    def __init__(self):
        self._pending_vote = None
        self._vote = None
        self._reported = False
        sigterm.hold()  # a no-op if launch/train.py already holds it

    @property
    def requested(self) -> bool:
        if sigterm.requested() and not self._reported:
            self._reported = True
            logging.warning("SIGTERM received: saving a checkpoint at the next agreed step.")
        return sigterm.requested()

    def should_stop(self, mesh: Mesh) -> bool:
        """Call once per step on every process (the votes pair up by call order), after
        dispatching the step's update."""
        if jax.process_count() == 1:
            return self.requested
        decided = self._pending_vote is not None and bool(self._pending_vote)
        if not decided:
            self._pending_vote = self._dispatch_vote(mesh)
        return decided

    def _dispatch_vote(self, mesh: Mesh) -> jax.Array:
        if self._vote is None:
            self._sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
            self._vote = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))
        local = np.full((len(self._sharding.addressable_devices),), self.requested, np.int32)
        return self._vote(jax.make_array_from_process_local_data(self._sharding, local))

    def close(self) -> None:
        """SIGTERM is fatal again (after the last checkpoint is on disk)."""
        sigterm.release()
