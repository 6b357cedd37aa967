"""Measure a config's train step and input pipeline; print one JSON line per measurement.

    python launch/benchmark.py --config demo                       # step time + loader
    python launch/benchmark.py --config vit_b16_clip --what=flops  # compiled FLOPs / memory
    python launch/benchmark.py --config demo --config.data.batch_size=64 --steps=20
    python launch/benchmark.py --what=pipeline --batches=20   # converted-data input pipeline
    python launch/benchmark.py --config vit_b16_clip --what=step --config.data.batch_size=256
        # images/s and MFU (analytic model FLOPs, jaxclip/flops.py, over the device's peak)

Compiled figures (FLOPs and bytes from XLA's cost and memory analysis) are deterministic and
comparable across machines; times depend on the machine and its load: compare ratios
measured in one run. XLA counts a scanned loop body once, so FLOPs are reported for an
unrolled compile (model.scan_layers=False) unless --flops_scan is given.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _cli  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_string("config", "demo", "Config name.")
flags.DEFINE_list(
    "what", ["flops", "step", "data"], "Measurements: flops, step, data, pipeline, collectives."
)
flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
flags.DEFINE_integer("batches", 20, "Timed loader batches.")
flags.DEFINE_bool("flops_scan", False, "Compile with scanned layers for the FLOP count.")
flags.DEFINE_float(
    "peak_tflops", 0.0, "Per-device bf16 peak for MFU (0 = from the device kind's table)."
)
FLAGS = flags.FLAGS


def synthetic_batch(cfg, rng):
    import numpy as np

    b, s, length = cfg.data.batch_size, cfg.data.image_size, cfg.data.context_length
    batch = {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)}
    if cfg.model.kind == "lift":  # stored caption embeddings instead of tokens
        batch["text_emb"] = rng.standard_normal((b, cfg.text_encoder.dim)).astype(np.float16)
        return batch
    mask = np.zeros((b, length), np.int32)
    mask[:, : max(2, length // 2)] = 1
    batch["tokens"] = rng.integers(0, 8, (b, length)).astype(np.int32) * mask
    batch["mask"] = mask
    return batch


def measure_flops(cfg) -> dict:
    from jaxclip import aot

    if not FLAGS.flops_scan:
        cfg = aot.unrolled(cfg)  # XLA counts a scanned loop body once
    compiled = aot.compile_train_step(cfg)
    flops = aot.compiled_flops(compiled)
    memory = aot.MemoryUse.of(compiled)
    return {
        "what": "flops",
        "flops_per_step": flops,
        "flops_per_example": flops / cfg.data.batch_size if flops else None,
        "argument_bytes": memory.arguments,
        "output_bytes": memory.outputs,
        "temp_bytes": memory.temporaries,
        "scan_layers": cfg.model.scan_layers,
    }


def measure_step(cfg) -> dict:
    import jax
    import numpy as np

    from jaxclip import flops
    from jaxclip import mesh as mesh_lib
    from jaxclip import train as train_lib

    setup = train_lib.build(cfg)
    step = train_lib.make_train_step(setup)
    state = train_lib.init_state(setup)
    batch = mesh_lib.global_batch(setup.mesh, synthetic_batch(cfg, np.random.default_rng(0)))
    t0 = time.perf_counter()
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - t0) / FLAGS.steps
    devices = int(setup.mesh.devices.size)
    per_example = flops.model_flops(cfg).train
    kind = jax.devices()[0].device_kind
    peak = FLAGS.peak_tflops * 1e12 or flops.peak_flops(kind)
    examples_per_s = cfg.data.batch_size / dt
    return {
        "what": "step",
        "seconds_per_step": dt,
        "examples_per_s": examples_per_s,
        "first_two_steps_s": compile_s,
        "devices": devices,
        "platform": jax.devices()[0].platform,
        "device_kind": kind,
        "attention": cfg.model.attention,
        "model_flops_per_example": per_example,  # analytic, 3 x forward (jaxclip/flops.py)
        "peak_flops_per_device": peak,
        "mfu": flops.mfu(examples_per_s, per_example, devices, peak) if peak else None,
    }


def measure_collectives(cfg) -> dict:
    """The compiled step on the configured mesh of this host's devices: its collectives,
    those whose result spans the global batch, and the temporaries (XLA's memory analysis).
    On a CPU host run with XLA_FLAGS=--xla_force_host_platform_device_count=8."""
    import re

    from jaxclip import aot

    compiled = aot.compile_train_step(cfg)
    names = r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
    lines = [line for line in compiled.as_text().splitlines() if re.search(names, line)]
    batch = cfg.data.batch_size
    spanning = [
        line.split("=", 1)[1].split("(")[0].strip()
        for line in lines
        if re.search(rf"\[{batch}[,\]]", line.split("=", 1)[1].split(" all")[0])
    ]
    return {
        "what": "collectives",
        "collectives": len(lines),
        "spanning_global_batch": spanning,
        "temp_bytes": aot.MemoryUse.of(compiled).temporaries,
        "mesh": dict(cfg.mesh.shape),
    }


def measure_data(cfg) -> dict:
    from jaxclip import mesh as mesh_lib
    from jaxclip import train as train_lib
    from jaxclip.data.pipeline import train_loader

    setup = train_lib.build(cfg)
    loader = train_loader(
        cfg.data, setup.tokenizer, mesh_lib.batch_size_per_process(cfg.data.batch_size, setup.mesh)
    )
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(FLAGS.batches):
        next(it)
    dt = (time.perf_counter() - t0) / FLAGS.batches
    return {
        "what": "data",
        "seconds_per_batch": dt,
        "examples_per_s": cfg.data.batch_size / dt,
        "worker_count": cfg.data.worker_count,
    }


def measure_pipeline(cfg) -> dict:
    """Converted-data pipeline (decode, random-resized crop to 224, normalize) from 256-px
    JPEG records vs a bare PIL decode + crop loop, 1 and 2 worker processes, in one run."""
    from jaxclip.data import throughput

    return {
        "what": "pipeline",
        **throughput.compare(cfg.data, batch_size=cfg.data.batch_size, batches=FLAGS.batches),
    }


def main(argv):
    del argv
    cfg = _cli.load(FLAGS.config, OVERRIDES)
    measures = {
        "flops": measure_flops,
        "step": measure_step,
        "data": measure_data,
        "pipeline": measure_pipeline,
        "collectives": measure_collectives,
    }
    for what in FLAGS.what:
        result = {"config": cfg.name, "batch_size": cfg.data.batch_size, **measures[what](cfg)}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    ARGV, OVERRIDES = _cli.split_overrides(sys.argv)
    app.run(main, argv=ARGV)
