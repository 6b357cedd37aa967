"""TPU slice shapes and GPU node types: the one table every cluster target reads.

Cloud TPU names a slice by generation and size, but the size counts different things: for
v4 and v5p it is TensorCores (two per chip), for v5e and v6e it is chips. `v5p-64` is
therefore 32 chips in a 2x4x4 torus on 8 hosts of 4 chips, while `v5litepod-16` is 16 chips
in a 4x4 grid on 4 hosts. Submitting the wrong host count to GKE leaves pods unschedulable,
so the arithmetic lives here, once, and is tested.
"""

from __future__ import annotations

import dataclasses
import re


class SliceError(ValueError):
    """An accelerator name that does not describe a known TPU slice or GPU type."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """What one TPU generation's slices have in common."""

    name: str  # our short name: v4, v5p, v5e, v6e
    cloud_prefix: str  # Cloud TPU accelerator-type prefix: v4-8, v5litepod-16, ...
    cores_per_chip: int  # the number in the accelerator type counts cores
    gke_accelerator: str  # node label cloud.google.com/gke-tpu-accelerator
    runtime_version: str  # TPU VM software version for `gcloud ... tpu-vm create`
    topologies: dict[int, str]  # chips -> physical topology of the standard slice
    single_host_max_chips: int  # slices up to this many chips sit on one host


# Standard slice shapes. 3D tori (v4, v5p) and 2D grids (v5e, v6e).
_TORUS_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
}
_GRID_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}

GENERATIONS = {
    "v4": Generation("v4", "v4", 2, "tpu-v4-podslice", "tpu-ubuntu2204-base", _TORUS_3D, 4),
    "v5p": Generation("v5p", "v5p", 2, "tpu-v5p-slice", "v2-alpha-tpuv5", _TORUS_3D, 4),
    "v5e": Generation(
        "v5e", "v5litepod", 1, "tpu-v5-lite-podslice", "v2-alpha-tpuv5-lite", _GRID_2D, 8
    ),
    "v6e": Generation("v6e", "v6e", 1, "tpu-v6e-slice", "v2-alpha-tpuv6e", _GRID_2D, 8),
}
# Multi-host slices of every generation here have 4 chips per host.
_MULTI_HOST_CHIPS_PER_HOST = 4
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """One TPU slice: how many chips, hosts and which topology."""

    generation: Generation
    chips: int

    @property
    def topology(self) -> str:
        return self.generation.topologies[self.chips]

    @property
    def accelerator_type(self) -> str:
        """The Cloud TPU name, e.g. `v5p-64`, `v5litepod-16`."""
        cores = self.chips * self.generation.cores_per_chip
        return f"{self.generation.cloud_prefix}-{cores}"

    @property
    def chips_per_host(self) -> int:
        if self.chips <= self.generation.single_host_max_chips:
            return self.chips
        return _MULTI_HOST_CHIPS_PER_HOST

    @property
    def hosts(self) -> int:
        return self.chips // self.chips_per_host


def tpu_slice(name: str) -> TpuSlice:
    """Parses a Cloud TPU accelerator type: `v5p-64`, `v4-8`, `v5litepod-16` (= `v5e-16`)."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
    if not match:
        raise SliceError(
            f"{name!r} is not a TPU accelerator type; expected GENERATION-SIZE such as "
            f"{', '.join(example_names())}."
        )
    prefix, size = match.group(1), int(match.group(2))
    gen = GENERATIONS.get(_ALIASES.get(prefix, prefix))
    if gen is None:
        raise SliceError(
            f"Unknown TPU generation {prefix!r} in {name!r}; known: "
            f"{', '.join(sorted(GENERATIONS))} (v5e is also called v5litepod)."
        )
    if size % gen.cores_per_chip or size // gen.cores_per_chip not in gen.topologies:
        sizes = ", ".join(
            f"{gen.cloud_prefix}-{c * gen.cores_per_chip}" for c in sorted(gen.topologies)
        )
        unit = "TensorCores (2 per chip)" if gen.cores_per_chip == 2 else "chips"
        raise SliceError(
            f"{name!r} is not a standard {gen.name} slice: the size counts {unit}. "
            f"Standard sizes: {sizes}."
        )
    return TpuSlice(gen, size // gen.cores_per_chip)


def example_names() -> list[str]:
    return ["v4-8", "v5p-64", "v5litepod-16", "v6e-8"]


# GKE node labels (cloud.google.com/gke-accelerator) for common GPUs, by short name.
GKE_GPU_TYPES = {
    "h100": "nvidia-h100-80gb",
    "h100-mega": "nvidia-h100-mega-80gb",
    "h200": "nvidia-h200-141gb",
    "a100": "nvidia-tesla-a100",
    "a100-80gb": "nvidia-a100-80gb",
    "l4": "nvidia-l4",
}


def gke_gpu_label(gpu_type: str) -> str:
    """A GKE accelerator label from a short name (`h100`) or the label itself."""
    key = gpu_type.strip().lower()
    if key in GKE_GPU_TYPES:
        return GKE_GPU_TYPES[key]
    if key.startswith("nvidia-"):
        return key
    raise SliceError(
        f"Unknown GPU type {gpu_type!r}; use one of {', '.join(GKE_GPU_TYPES)} or a GKE "
        f"accelerator label such as nvidia-h100-80gb."
    )
