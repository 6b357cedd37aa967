"""Ahead-of-time fit check: the real train step compiled for hardware this machine lacks.

The TPU tests need libtpu (`pip install -e '.[tpu]'`, which .ci/run installs); the GPU test
needs JAX's CUDA plugin (`pip install -e '.[aot-gpu]'`). Each compiles the tiny config.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny import tiny_config

from jaxclip import aot, run_setup
from jaxclip.aot_targets import AotError, parse_target, target_devices

ROOT = Path(__file__).resolve().parent.parent

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed: pip install -e '.[tpu]' (.ci/run installs it)",
)
needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None,
    reason="JAX's CUDA plugin is not installed: pip install -e '.[aot-gpu]'",
)


def shard_bytes(tree) -> int:
    """Bytes one device holds of abstract arrays, from their shapes and shardings alone."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


@pytest.mark.parametrize(
    "name, platform, devices, topology, memory_gib",
    [
        ("v4-8", "tpu", 4, "v4:2x2x1", 32),
        ("v5p-64", "tpu", 32, "v5p:2x4x4", 95),
        ("v5p-128", "tpu", 64, "v5p:4x4x4", 95),
        ("v5e-16", "tpu", 16, "v5e:4x4", 16),
        ("v5litepod-8", "tpu", 8, "v5e:2x4", 16),
        ("v6e-1", "tpu", 1, "v6e:1x1", 32),
        ("v5p:4x4x12", "tpu", 192, "v5p:4x4x12", 95),
        ("8xH100", "gpu", 8, "1x1x8", 79.1),
        ("16xH200", "gpu", 16, "1x2x8", 141.0),
        ("2xA100-40", "gpu", 2, "1x1x2", 39.4),
    ],
)
def test_target_names_follow_cloud_tpu_and_gpu_pod_conventions(
    name, platform, devices, topology, memory_gib
):
    target = parse_target(name)
    assert (target.platform, target.num_devices, target.topology) == (platform, devices, topology)
    assert target.memory_bytes / 2**30 == pytest.approx(memory_gib, abs=0.05)


def test_gpu_budget_is_the_pool_jax_preallocates(monkeypatch):
    monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    target = parse_target("8xH100")
    assert target.budget_bytes == int(0.75 * target.memory_bytes)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert target.budget_bytes == int(0.9 * target.memory_bytes)
    assert parse_target("v5p-8").budget_bytes == 95 * 2**30


@pytest.mark.parametrize(
    "name, words",
    [
        ("tpu-64", ["Unknown target", "v5p-64", "8xH100"]),
        ("v5p-12", ["v5p-12", "6 chips", "power of two", "v5p:4x4x12"]),
        ("v4-7", ["v4-7", "TensorCores"]),
        ("12xH100", ["multiple of 8"]),
        ("8xK80", ["Unknown target", "NxH100"]),
    ],
)
def test_bad_target_names_say_what_is_valid(name, words):
    with pytest.raises(AotError) as error:
        parse_target(name)
    for word in words:
        assert word in str(error.value)


def test_launcher_rejects_an_unknown_target_listing_the_known_ones():
    result = subprocess.run(
        [sys.executable, "launch/train.py", "--config", "demo", "--aot", "tpu-64"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "Unknown target 'tpu-64'" in result.stderr and "v5p-64" in result.stderr


@needs_libtpu
def test_tpu_report_has_the_sharded_bytes_and_flops_of_an_unrolled_cpu_compile():
    """v4-8 (4 chips): arguments are the state and this device's batch rows (plus TPU
    padding of small arrays); FLOPs match the same step compiled for 4 CPU devices with
    unrolled layers, although the config scans its layers (XLA counts a loop body once)."""
    cfg = tiny_config(**{"model.scan_layers": "true", "data.batch_size": 64})
    target = parse_target("v4-8")
    report = aot.check_fit(cfg, target)

    assert report.fits and report.memory is not None
    assert report.mesh == {"data": 4, "fsdp": 1, "tensor": 1}
    assert report.batch_per_device == 16
    state, batch = run_setup.build(cfg, target_devices(target)).abstract_inputs()
    expected = shard_bytes(state) + shard_bytes(batch)
    assert expected <= report.memory.arguments <= expected + 2 * 2**20
    assert report.memory.aliased >= shard_bytes(state)  # the donated state is updated in place
    assert report.memory.total < 2**30

    cpu = aot.compile_train_step(aot.unrolled(cfg), jax.devices()[:4])
    assert report.flops_per_device == pytest.approx(aot.compiled_flops(cpu), rel=0.05)
    assert "unrolled" in report.flops_note
    text = aot.format_report(report)
    for words in ("v4-8: 4 x TPU v4", "arguments", "temporaries", "fits", "FLOPs per step"):
        assert words in text


@needs_libtpu
def test_search_finds_the_largest_batch_the_tpu_compiler_accepts():
    """On one v5e chip (16 GiB) the tiny model's B x B logits decide: the search brackets
    the largest per-device batch to within the tolerance, and the batch above it is refused
    by the compiler for lack of memory, which the report says."""
    cfg = tiny_config(**{"data.batch_size": 32768, "loss.chunk_size": 0})
    target = parse_target("v5e-1")
    attempts = []
    fit, no_fit = aot.largest_batch(cfg, target, tolerance=1 / 4, log=attempts.append)

    assert fit is not None and no_fit is not None
    assert fit.fits and fit.memory.total <= target.budget_bytes
    assert not no_fit.fits and fit.batch_per_device < no_fit.batch_per_device
    assert no_fit.batch_per_device - fit.batch_per_device <= fit.batch_per_device // 4
    assert fit.batch_per_device % 8 == 0
    assert fit.batch_per_device == max(a.batch_per_device for a in attempts if a.fits)
    refused = [a for a in attempts if a.memory is None]
    assert refused and "RESOURCE_EXHAUSTED" in refused[0].compiler_message
    assert "DOES NOT FIT" in aot.format_report(refused[0])


@needs_cuda_plugin
def test_gpu_report_counts_exact_argument_bytes_against_jax_pool():
    """8xH100 without a GPU: no layout padding on GPU, so the arguments are exactly the
    state plus this device's batch rows; FLOPs come from 8 CPU devices."""
    cfg = tiny_config(**{"data.batch_size": 64})
    target = parse_target("8xH100")
    report = aot.check_fit(cfg, target)

    assert report.fits and report.batch_per_device == 8
    state, batch = run_setup.build(cfg, target_devices(target)).abstract_inputs()
    assert report.memory.arguments == shard_bytes(state) + shard_bytes(batch)
    cpu = aot.compile_train_step(aot.unrolled(cfg), jax.devices()[:8])
    assert report.flops_per_device == pytest.approx(aot.compiled_flops(cpu))
    assert "CPU devices" in report.flops_note
    assert "preallocates 75%" in aot.format_report(report)
