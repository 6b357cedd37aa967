"""Ahead-of-time fit check: compile the real train step for a TPU slice or GPU pod we lack.

    python launch/train.py --config vit_b16_lift --aot v5p-64
    python launch/train.py --config vit_b16_clip --aot 8xH100 --aot_search

On the target's compile-only devices (`aot_targets`) we build the mesh, shardings and
train step exactly as training does (`run_setup.build`, `train_step.make_train_step`), lower the
step on abstract state and batch (nothing is allocated) and compile it. XLA's memory
analysis gives the per-device bytes, which we compare with the device's memory (on a GPU,
the pool JAX preallocates). The TPU compiler refuses some programs larger than HBM itself
(RESOURCE_EXHAUSTED), not all; the GPU compiler never does.

FLOPs come from XLA's cost analysis, which counts the body of a scanned loop once: the
figure is taken from a second compile with unrolled layers. The GPU compiler reports no
FLOPs, so for GPU targets the same sharded program is compiled on as many CPU devices.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import jax
import ml_collections

from jaxclip import config as config_lib
from jaxclip import mesh as mesh_lib
from jaxclip import run_setup
from jaxclip.aot_targets import (
    GIB,
    AotError,
    Target,
    compiler_options,
    gpu_memory_fraction,
    parse_target,
    prepare_host,
    target_devices,
)
from jaxclip.train_step import make_train_step

__all__ = ["AotError", "Target", "check_fit", "largest_batch", "parse_target", "run"]

# --- Compiling the real step ---------------------------------------------------------------


def compile_train_step(
    cfg: ml_collections.ConfigDict, devices: Sequence | None = None, options: dict | None = None
):
    """The train step lowered on abstract inputs (the batch contract) and compiled for
    `devices`."""
    setup = run_setup.build(cfg, devices)
    step = make_train_step(setup)
    return step.lower(*setup.abstract_inputs()).compile(compiler_options=options or None)


def compiled_flops(compiled) -> float | None:
    """FLOPs of one device's program, or None where the compiler does not count them (GPU)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def unrolled(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with layers unrolled: XLA counts a scanned loop body only once."""
    cfg = copy.deepcopy(cfg)
    config_lib.override(cfg, "model.scan_layers", "false")
    return cfg


def flop_counted(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config XLA can count: layers unrolled and the einsum attention, since a fused
    attention kernel (Pallas, cuDNN) is a custom call whose FLOPs XLA does not see."""
    cfg = unrolled(cfg)
    config_lib.override(cfg, "model.attention", "einsum")
    return cfg


def with_batch(cfg: ml_collections.ConfigDict, global_batch: int) -> ml_collections.ConfigDict:
    cfg = copy.deepcopy(cfg)
    config_lib.override(cfg, "data.batch_size", str(global_batch))
    return cfg


@dataclasses.dataclass(frozen=True)
class MemoryUse:
    """Per-device bytes of one compiled step, from XLA's memory analysis."""

    arguments: int  # state + batch
    outputs: int
    aliased: int  # outputs written in place of donated arguments (the new state)
    temporaries: int
    generated_code: int

    @property
    def total(self) -> int:
        # A donated argument's buffer is reused for the output it aliases: count it once.
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

    @classmethod
    def of(cls, compiled) -> MemoryUse:
        m = compiled.memory_analysis()
        return cls(
            arguments=m.argument_size_in_bytes,
            outputs=m.output_size_in_bytes,
            aliased=m.alias_size_in_bytes,
            temporaries=m.temp_size_in_bytes,
            generated_code=m.generated_code_size_in_bytes,
        )


@dataclasses.dataclass
class FitReport:
    """One compile of the train step for a target, and what it says."""

    config: str
    target: Target
    mesh: dict[str, int]
    global_batch: int
    batch_per_device: int  # rows per batch shard (data x fsdp)
    fits: bool
    memory: MemoryUse | None  # None when the compiler refused the program
    compiler_message: str = ""  # the compiler's words when it refused
    flops_per_device: float | None = None
    flops_note: str = ""
    compile_seconds: float = 0.0

    @property
    def flops_per_step(self) -> float | None:
        """Over all devices (replicated work, such as a replicated optimizer update, counts
        on every device that does it)."""
        if self.flops_per_device is None:
            return None
        return self.flops_per_device * self.target.num_devices


def _mesh_sizes(cfg: ml_collections.ConfigDict, target: Target) -> dict[str, int]:
    shape = mesh_lib.mesh_shape(cfg.mesh.shape, target.num_devices)
    return dict(zip(mesh_lib.MESH_AXES, shape, strict=True))


def batch_shards(cfg: ml_collections.ConfigDict, target: Target) -> int:
    sizes = _mesh_sizes(cfg, target)
    return math.prod(sizes[a] for a in mesh_lib.BATCH_AXES)


def _out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error)


def _first_lines(error: Exception, n: int = 3) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return "\n".join(lines[:n])


def check_fit(
    cfg: ml_collections.ConfigDict,
    target: Target,
    *,
    flops: bool = True,
    devices: Sequence | None = None,
) -> FitReport:
    """Compiles the train step of `cfg` for `target` and reports memory, fit and FLOPs."""
    mesh = _mesh_sizes(cfg, target)
    shards = batch_shards(cfg, target)
    if cfg.data.batch_size % shards:
        raise AotError(
            f"Global batch {cfg.data.batch_size} does not divide over the {shards} batch shards "
            f"of {target.name}; use a multiple, e.g. --config.data.batch_size="
            f"{max(1, cfg.data.batch_size // shards) * shards}."
        )
    devices = target_devices(target) if devices is None else devices
    report = FitReport(
        config=cfg.name,
        target=target,
        mesh=mesh,
        global_batch=cfg.data.batch_size,
        batch_per_device=cfg.data.batch_size // shards,
        fits=False,
        memory=None,
    )
    start = time.perf_counter()
    try:
        compiled = compile_train_step(cfg, devices, compiler_options(target))
    except jax.errors.JaxRuntimeError as e:
        if not _out_of_memory(e):
            raise
        report.compiler_message = _first_lines(e)
        report.compile_seconds = time.perf_counter() - start
        return report
    report.compile_seconds = time.perf_counter() - start
    report.memory = MemoryUse.of(compiled)
    report.fits = report.memory.total <= target.budget_bytes
    if flops:
        report.flops_per_device, report.flops_note = _count_flops(cfg, target, devices, compiled)
    return report


def _count_flops(cfg, target: Target, devices, compiled) -> tuple[float | None, str]:
    """FLOPs per device per step, and where the figure comes from."""
    if target.platform == "tpu":
        if not cfg.model.scan_layers:
            return compiled_flops(compiled), "XLA cost analysis of this compile"
        try:
            flops = compiled_flops(compile_train_step(flop_counted(cfg), devices))
            return flops, (
                "XLA cost analysis of the same step with layers unrolled and einsum "
                "attention (a fused kernel's FLOPs are invisible to XLA)"
            )
        except jax.errors.JaxRuntimeError as e:
            if not _out_of_memory(e):
                raise
            # The unrolled program may not fit where the scanned one does: count on CPUs.
    cpus = jax.devices("cpu")
    if len(cpus) < target.num_devices:
        return None, (
            f"not counted: the {target.platform.upper()} compiler reports no FLOPs here and "
            f"counting them on CPU needs {target.num_devices} CPU devices ({len(cpus)} exist)"
        )
    flops = compiled_flops(compile_train_step(flop_counted(cfg), cpus[: target.num_devices]))
    return flops, (
        f"XLA cost analysis of the same sharded step compiled for {target.num_devices} CPU "
        f"devices with layers unrolled and einsum attention ({target.platform.upper()} "
        f"compile reports none)"
    )


def largest_batch(
    cfg: ml_collections.ConfigDict,
    target: Target,
    *,
    tolerance: float = 1 / 16,
    log: Callable[[FitReport], None] = lambda report: None,
) -> tuple[FitReport | None, FitReport | None]:
    """The largest per-device batch that fits, found by compiling: double, then bisect.

    Memory grows about linearly with the batch, but the compiler's choices (fusion,
    rematerialization under memory pressure) make it only roughly so, so every candidate
    is compiled. Stops within `tolerance` of the answer; above 64 rows, candidates are
    multiples of 8. Returns (largest that fits or None, smallest that does not or None).
    """
    devices = target_devices(target)
    shards = batch_shards(cfg, target)

    def attempt(per_device: int) -> FitReport:
        batch_cfg = with_batch(cfg, per_device * shards)
        report = check_fit(batch_cfg, target, flops=False, devices=devices)
        log(report)
        return report

    fit, no_fit = None, None
    per_device = max(1, cfg.data.batch_size // shards)
    report = attempt(per_device)
    while True:  # bracket the answer by doubling or halving
        if report.fits:
            fit = report
            if no_fit is not None:
                break
            report = attempt(report.batch_per_device * 2)
        else:
            no_fit = report
            if fit is not None or report.batch_per_device == 1:
                break
            report = attempt(report.batch_per_device // 2)
    while fit is not None and no_fit is not None:
        low, high = fit.batch_per_device, no_fit.batch_per_device
        middle = (low + high) // 2
        if low >= 64:
            middle -= middle % 8
        if high - low <= max(1, int(low * tolerance)) or middle <= low:
            break
        report = attempt(middle)
        if report.fits:
            fit = report
        else:
            no_fit = report
    return fit, no_fit


# --- Reports ---------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / 2**20:.1f} MiB"


def _flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


def describe_target(target: Target) -> str:
    memory = f"{_gib(target.memory_bytes)} each"
    if target.platform == "gpu":
        fraction = gpu_memory_fraction()
        memory += f", of which JAX preallocates {fraction:.0%} = {_gib(target.budget_bytes)}"
    return f"{target.name}: {target.num_devices} x {target.device_kind} ({memory})"


def format_report(report: FitReport) -> str:
    target = report.target
    mesh = " x ".join(f"{axis}={size}" for axis, size in report.mesh.items())
    lines = [
        f"ahead-of-time fit check of {report.config}",
        f"target: {describe_target(target)}",
        f"mesh: {mesh}; global batch {report.global_batch} = {report.batch_per_device} per device",
    ]
    if report.memory is None:
        lines += [
            f"DOES NOT FIT: the {target.platform.upper()} compiler refused the program:",
            *(f"  {line}" for line in report.compiler_message.splitlines()),
        ]
        return "\n".join(lines)
    m = report.memory
    share = m.total / target.budget_bytes
    budget = "JAX's pool" if target.platform == "gpu" else "HBM"
    lines += [
        "per-device memory (XLA memory analysis):",
        f"  arguments       {_gib(m.arguments):>12}  (state + batch)",
        f"  outputs         {_gib(m.outputs):>12}  ({_gib(m.aliased)} of them reuse the "
        f"donated state)",
        f"  temporaries     {_gib(m.temporaries):>12}",
        f"  generated code  {_gib(m.generated_code):>12}",
        f"  total           {_gib(m.total):>12}  = {share:.0%} of {_gib(target.budget_bytes)} "
        f"{budget}: {'fits' if report.fits else 'DOES NOT FIT'}",
    ]
    if not report.fits and target.platform == "gpu" and m.total < 0.97 * target.memory_bytes:
        fraction = math.ceil(100 * m.total / target.memory_bytes + 2) / 100
        lines.append(
            f"  it would fit a larger pool: run the job with XLA_CLIENT_MEM_FRACTION={fraction}"
        )
    if report.flops_per_device is not None:
        per_example = report.flops_per_step / report.global_batch
        lines.append(
            f"FLOPs per step: {_flops(report.flops_per_device)} per device, "
            f"{_flops(report.flops_per_step)} over "
            f"{target.num_devices} devices ({_flops(per_example)} per example)"
        )
    if report.flops_note:
        lines.append(f"  FLOPs source: {report.flops_note}")
    if target.platform == "gpu":
        lines.append(
            "  GPU compile without a GPU: GEMMs use cuBLAS (xla_gpu_enable_triton_gemm=false); "
            "cuDNN and NCCL workspaces are not counted"
        )
    lines.append(f"compile: {report.compile_seconds:.0f} s")
    return "\n".join(lines)


def format_search(fit: FitReport | None, no_fit: FitReport | None) -> str:
    if fit is None:
        return "no batch fits: even 1 example per device does not"
    line = f"largest per-device batch that fits: {fit.batch_per_device} (global {fit.global_batch})"
    if no_fit is not None:
        line += f"; {no_fit.batch_per_device} per device does not"
    return line


def format_attempt(report: FitReport) -> str:
    total = "refused by the compiler" if report.memory is None else _gib(report.memory.total)
    verdict = "fits" if report.fits else "does not fit"
    return (
        f"  batch {report.batch_per_device:>6} per device: {total:>24}  {verdict}  "
        f"({report.compile_seconds:.0f} s)"
    )


def run(
    cfg: ml_collections.ConfigDict,
    target_name: str,
    *,
    search: bool = False,
    flops: bool = True,
    out: Callable[[str], None] = print,
) -> FitReport | None:
    """The `--aot TARGET [--aot_search]` command: check (or search) and print the report.

    The search never counts FLOPs (one more compile per candidate)."""
    target = parse_target(target_name)
    prepare_host(target)
    if not search:
        report = check_fit(cfg, target, flops=flops)
        out(format_report(report))
        return report
    out(f"largest batch of {cfg.name} on {describe_target(target)}; compiling:")
    attempts: list[FitReport] = []

    def log(report: FitReport) -> None:
        attempts.append(report)
        out(format_attempt(report))

    fit, no_fit = largest_batch(cfg, target, log=log)
    out(f"\n--- at the configured batch\n{format_report(attempts[0])}")
    if fit is not None and fit is not attempts[0]:
        out(f"\n--- at the largest batch that fits\n{format_report(fit)}")
    out("\n" + format_search(fit, no_fit))
    return fit
