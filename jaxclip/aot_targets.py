"""Targets of the ahead-of-time fit check: TPU slices and GPU pods, and their compile-only
devices.

A TPU slice is compiled for through libtpu's compile-only client (`get_topology_desc` with
a topology name such as "v5p:2x4x4"); a GPU pod through JAX's CUDA plugin given an XLA GPU
target description, which needs no GPU. Slice names follow Cloud TPU: v4-N and v5p-N count
TensorCores (2 per chip), v5e-N and v6e-N count chips.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import re

import jax

from jaxclip.cluster import slices

GIB = 2**30
# JAX preallocates this share of a GPU's memory and every program must fit in it.
GPU_DEFAULT_MEM_FRACTION = 0.75
# Without a GPU XLA cannot autotune Triton GEMMs and fails to tile some large ones; cuBLAS
# GEMMs compile from the target description alone.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


class AotError(ValueError):
    """A target we cannot compile for, or a compiler that is not installed."""


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    prefix: str  # the generation in libtpu's topology names, "v5p:2x4x4"
    hbm_bytes: int
    torus_dims: int
    chip_config: str  # "megacore": one JAX device per chip, as on the real slice


TPU_GENERATIONS = {
    "v4": TpuGeneration("v4", 32 * GIB, 3, "megacore"),
    "v5p": TpuGeneration("v5p", 95 * GIB, 3, "megacore"),
    "v5e": TpuGeneration("v5e", 16 * GIB, 2, "default"),
    "v6e": TpuGeneration("v6e", 32 * GIB, 2, "default"),
}
TPU_ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class GpuModel:
    """What XLA's GPU compiler needs to know about a device (its GpuTargetConfigProto).

    Published hardware figures; `memory_bytes` is what the CUDA driver reports.
    """

    description: str
    compute_capability: tuple[int, int]
    multiprocessors: int
    fpus_per_multiprocessor: int
    shared_memory_per_multiprocessor: int
    shared_memory_per_block_optin: int
    l2_cache_bytes: int
    memory_bandwidth: int  # bytes per second
    clock_ghz: float
    memory_bytes: int


_HOPPER = dict(
    compute_capability=(9, 0),
    multiprocessors=132,
    fpus_per_multiprocessor=128,
    shared_memory_per_multiprocessor=228 * 1024,
    shared_memory_per_block_optin=227 * 1024,
    l2_cache_bytes=50 * 2**20,
    clock_ghz=1.98,
)
_AMPERE = dict(
    compute_capability=(8, 0),
    multiprocessors=108,
    fpus_per_multiprocessor=64,
    shared_memory_per_multiprocessor=164 * 1024,
    shared_memory_per_block_optin=163 * 1024,
    l2_cache_bytes=40 * 2**20,
    clock_ghz=1.41,
)
GPU_MODELS = {
    "h100": GpuModel(
        "NVIDIA H100 80GB HBM3",
        **_HOPPER,
        memory_bandwidth=3_352_320_000_000,
        memory_bytes=84_942_979_072,
    ),
    "h200": GpuModel(
        "NVIDIA H200 141GB HBM3e",
        **_HOPPER,
        memory_bandwidth=4_800_000_000_000,
        memory_bytes=151_397_597_184,
    ),
    "a100": GpuModel(
        "NVIDIA A100-SXM4-80GB",
        **_AMPERE,
        memory_bandwidth=2_039_040_000_000,
        memory_bytes=85_100_068_864,
    ),
    "a100-40": GpuModel(
        "NVIDIA A100-SXM4-40GB",
        **_AMPERE,
        memory_bandwidth=1_555_200_000_000,
        memory_bytes=42_331_013_120,
    ),
}
GPU_ALIASES = {"a100-80": "a100"}
GPUS_PER_HOST = 8

KNOWN_TARGETS = (
    "TPU slices v4-N and v5p-N (N counts TensorCores, 2 per chip: v5p-64 is 32 chips), "
    "v5e-N and v6e-N (N counts chips), or a topology such as v5p:4x4x8; GPU pods NxH100, "
    "NxH200, NxA100 (80 GB), NxA100-40. Examples: v5p-64, v5e-16, v4-8, 8xH100."
)


@dataclasses.dataclass(frozen=True)
class Target:
    """A slice or pod to compile for: its devices' kind, count and memory."""

    name: str  # as the user wrote it
    platform: str  # "tpu" or "gpu"
    device_kind: str
    num_devices: int
    memory_bytes: int  # per device
    topology: str  # libtpu's "v5p:2x4x4", or the GPU plugin's "slices x hosts x per-host"
    chip_config: str = "default"
    gpu: GpuModel | None = None

    @property
    def budget_bytes(self) -> int:
        """What one program may use: all of a TPU's HBM; JAX's preallocated pool on a GPU."""
        if self.platform == "gpu":
            return int(self.memory_bytes * gpu_memory_fraction())
        return self.memory_bytes


def gpu_memory_fraction() -> float:
    raw = os.environ.get("XLA_CLIENT_MEM_FRACTION") or os.environ.get(
        "XLA_PYTHON_CLIENT_MEM_FRACTION"
    )
    return float(raw) if raw else GPU_DEFAULT_MEM_FRACTION


def parse_target(name: str) -> Target:
    """'v5p-64', 'v5e-16', 'v5p:4x4x8', '8xH100', ... -> Target; unknown names list the known."""
    key = name.strip().lower()
    if m := re.fullmatch(r"(v\w+?)-(\d+)", key):
        gen_name = TPU_ALIASES.get(m[1], m[1])
        gen = TPU_GENERATIONS.get(gen_name)
        if gen is not None:
            # Chips and topology of a named slice: the one table the job submitters use too.
            try:
                tpu = slices.tpu_slice(key)
            except slices.SliceError as e:
                cores = slices.GENERATIONS[gen_name].cores_per_chip
                chips = f"{int(m[2]) / cores:g} chips" if cores > 1 else f"{m[2]} chips"
                raise AotError(
                    f"{name} is {chips}; standard slices are a power of two chips. {e} "
                    f"For another shape give the topology, e.g. {gen_name}:"
                    f"{'4x4x12' if gen.torus_dims == 3 else '4x8'}."
                ) from None
            shape = tuple(int(d) for d in tpu.topology.split("x"))
            return _tpu_target(name, gen_name, gen, shape)
    if m := re.fullmatch(r"(v\w+):(\d+(?:x\d+)+)", key):
        gen_name = TPU_ALIASES.get(m[1], m[1])
        gen = TPU_GENERATIONS.get(gen_name)
        shape = tuple(int(d) for d in m[2].split("x"))
        if gen is not None and len(shape) in (gen.torus_dims, 3):
            return _tpu_target(name, gen_name, gen, shape)
    if m := re.fullmatch(r"(\d+)\s*x\s*([\w-]+)", key):
        count, model_name = int(m[1]), GPU_ALIASES.get(m[2], m[2])
        model = GPU_MODELS.get(model_name)
        if model is not None and count >= 1:
            if count > GPUS_PER_HOST and count % GPUS_PER_HOST:
                raise AotError(
                    f"{name}: a pod larger than one host needs a multiple of "
                    f"{GPUS_PER_HOST} GPUs ({GPUS_PER_HOST} per host)."
                )
            per_host = min(count, GPUS_PER_HOST)
            return Target(
                name=name,
                platform="gpu",
                device_kind=model.description,
                num_devices=count,
                memory_bytes=model.memory_bytes,
                topology=f"1x{count // per_host}x{per_host}",
                gpu=model,
            )
    raise AotError(f"Unknown target {name!r}. Known targets: {KNOWN_TARGETS}")


def _tpu_target(name: str, gen_name: str, gen: TpuGeneration, shape: tuple[int, ...]) -> Target:
    return Target(
        name=name,
        platform="tpu",
        device_kind=f"TPU {gen_name}",
        num_devices=math.prod(shape),
        memory_bytes=gen.hbm_bytes,
        topology=f"{gen.prefix}:{'x'.join(map(str, shape))}",
        chip_config=gen.chip_config,
    )


def gpu_target_config(model: GpuModel) -> str:
    """The device as a GpuTargetConfigProto in text format: what the compiler targets."""
    major, minor = model.compute_capability
    info = {
        "threads_per_block_limit": 1024,
        "threads_per_warp": 32,
        "shared_memory_per_block": 48 * 1024,
        "shared_memory_per_core": model.shared_memory_per_multiprocessor,
        "threads_per_core_limit": 2048,
        "core_count": model.multiprocessors,
        "fpus_per_core": model.fpus_per_multiprocessor,
        "block_dim_limit_x": 2**31 - 1,
        "block_dim_limit_y": 65535,
        "block_dim_limit_z": 65535,
        "memory_bandwidth": model.memory_bandwidth,
        "l2_cache_size": model.l2_cache_bytes,
        "clock_rate_ghz": model.clock_ghz,
        "device_memory_size": model.memory_bytes,
        "shared_memory_per_block_optin": model.shared_memory_per_block_optin,
        "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
    }
    fields = "\n".join(f"  {key}: {value}" for key, value in info.items())
    capability = f"  cuda_compute_capability {{ major: {major} minor: {minor} }}"
    return (
        f"gpu_device_info {{\n{fields}\n{capability}\n}}\n"
        f'platform_name: "CUDA"\n'
        f"dnn_version_info {{ major: 9 minor: 10 patch: 0 }}\n"
        f'device_description_str: "{model.description}"\n'
    )


def prepare_host(target: Target) -> None:
    """Call before JAX starts a backend. The host's own accelerator is never used: only CPU
    devices start, and for a GPU target there are as many as it has GPUs (to count FLOPs)."""
    try:
        jax.config.update("jax_platforms", "cpu")
        if target.platform == "gpu":
            jax.config.update("jax_num_cpu_devices", target.num_devices)
    except RuntimeError:  # JAX already started (e.g. under pytest): keep its devices
        pass


def target_devices(target: Target) -> list:
    """Compile-only devices of the target (they compile programs, never run them)."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
            raise AotError(
                f"Compiling for {target.name} needs libtpu, which is not installed. Install "
                f"jaxclip's TPU extra: pip install -e '.[tpu]' (the libtpu that jax pins)."
            )
        if not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*"):
            # No TPU here: several compile-only processes may load libtpu at once.
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        dims = [int(d) for d in target.topology.split(":")[1].split("x")]
        dims += [1] * (3 - len(dims))
        topology = topologies.get_topology_desc(
            target.topology,
            "tpu",
            chip_config_name=target.chip_config,
            chips_per_host_bounds=tuple(min(2, d) for d in dims[:2]) + (1,),
            num_slices=1,
        )
    else:
        try:
            topology = topologies.get_topology_desc(
                platform="cuda",
                target_config=gpu_target_config(target.gpu),
                topology=target.topology,
            )
        except NotImplementedError as e:
            raise AotError(
                f"Compiling for {target.name} without a GPU needs JAX's CUDA plugin, which is "
                f"not installed. Install jaxclip's extra: pip install -e '.[aot-gpu]'."
            ) from e
    return list(topology.devices)


def compiler_options(target: Target) -> dict:
    return dict(GPU_COMPILER_OPTIONS) if target.platform == "gpu" else {}
