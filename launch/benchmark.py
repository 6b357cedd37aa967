"""Measure a config's train step and input pipeline; print one JSON line per measurement.

    python launch/benchmark.py --config demo                       # step time + loader
    python launch/benchmark.py --config vit_b16_clip --what=flops  # compiled FLOPs / memory
    python launch/benchmark.py --config demo --config.data.batch_size=64 --steps=20
    python launch/benchmark.py --what=pipeline --batches=20   # converted-data input pipeline
    python launch/benchmark.py --what=loss_memory --loss_batch=65536 --aot=v5p-16  # loss alone
    python launch/benchmark.py --config vit_b16_clip --what=step --config.data.batch_size=256
        # images/s and MFU (analytic model FLOPs, jaxclip/flops.py, over the device's peak)
    python launch/benchmark.py --what=weights --weights_models=ViT-B-16,ViT-L-14
        # import/export wall times of random-weight CLIPs (jaxclip/weights/timing.py)
    python launch/benchmark.py --what=embed --embed_encoder=qwen3_embedding_0.6b
        # decoder-LLM embedder captions/s beside its FLOPs (jaxclip/embed_throughput.py)

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
    "what",
    ["flops", "step", "data"],
    "Measurements: flops, step, data, pipeline, loss_memory, collectives, weights, embed.",
)
flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
flags.DEFINE_integer("batches", 20, "Timed loader batches.")
flags.DEFINE_bool("flops_scan", False, "Compile with scanned layers for the FLOP count.")
# --what=loss_memory: the loss and its gradients alone (jaxclip/loss_memory.py).
flags.DEFINE_integer("loss_batch", 65536, "loss_memory: global batch B.")
flags.DEFINE_integer("loss_dim", 512, "loss_memory: embedding dimension D.")
flags.DEFINE_list("loss_kind", ["contrastive", "siglip"], "loss_memory: loss kinds.")
flags.DEFINE_list("loss_impl", ["gather", "ring"], "loss_memory: loss impls.")
flags.DEFINE_list("loss_chunk", ["0", "1024"], "loss_memory: chunk sizes (0 = unchunked).")
flags.DEFINE_string(
    "aot", "", "loss_memory: compile for this target (v5p-128, 8xH100, ...), not local devices."
)
flags.DEFINE_float(
    "peak_tflops", 0.0, "Per-device bf16 peak for MFU (0 = from the device kind's table)."
)
# --what=weights: conversion wall times (jaxclip/weights/timing.py).
flags.DEFINE_list("weights_models", ["ViT-B-16"], "weights: open_clip names or config JSONs.")
flags.DEFINE_string("weights_dir", "/tmp/jaxclip_bench_weights", "weights: scratch directory.")
# --what=embed: a decoder-LLM embedder with random weights (jaxclip/embed_throughput.py).
flags.DEFINE_string(
    "embed_encoder", "qwen3_embedding_0.6b", "embed: llm_configs/ name, config.json or model dir."
)
flags.DEFINE_list("embed_lengths", ["16", "32", "77"], "embed: tokens per caption.")
flags.DEFINE_integer("embed_batch", 16, "embed: captions per batch.")
flags.DEFINE_integer("embed_batches", 3, "embed: timed batches per length.")
flags.DEFINE_enum("embed_dtype", "float32", ["float32", "bfloat16"], "embed: parameter dtype.")
FLAGS = flags.FLAGS


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

    from jaxclip import flops, run_setup
    from jaxclip import mesh as mesh_lib
    from jaxclip.train_step import make_train_step

    setup = run_setup.build(cfg)
    step = make_train_step(setup)
    state = run_setup.init_state(setup)
    local = run_setup.synthetic_batch(setup, np.random.default_rng(0))
    batch = mesh_lib.global_batch(setup.mesh, local)
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
    from jaxclip import run_setup
    from jaxclip.data.pipeline import train_loader

    setup = run_setup.build(cfg)
    features = setup.kind.caption_features(cfg, setup.tokenizer)
    process_batch = mesh_lib.batch_size_per_process(cfg.data.batch_size, setup.mesh)
    it = train_loader(cfg.data, features, process_batch)
    next(it)
    t0 = time.perf_counter()
    for _ in range(FLAGS.batches):
        next(it)
    dt = (time.perf_counter() - t0) / FLAGS.batches
    it.close()
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


def measure_loss_memory(cfg) -> dict:
    """Per-device bytes of loss + gradients for every --loss_kind x --loss_impl x --loss_chunk,
    on the local devices (XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU) or --aot."""
    del cfg  # the loss alone: no model, no config
    import jax

    from jaxclip import aot_targets, loss_memory

    if FLAGS.aot:
        target = aot_targets.parse_target(FLAGS.aot)
        aot_targets.prepare_host(target)  # before anything starts a JAX backend
        devices, options = aot_targets.target_devices(target), aot_targets.compiler_options(target)
        where = f"{target.name} ({target.device_kind})"
    else:
        devices, options = jax.devices(), None
        where = devices[0].platform
    chunks = [int(c) or None for c in FLAGS.loss_chunk]
    rows = loss_memory.table(
        FLAGS.loss_kind, FLAGS.loss_impl, chunks, FLAGS.loss_batch, FLAGS.loss_dim, devices, options
    )
    return {
        "what": "loss_memory",
        "batch_size": FLAGS.loss_batch,
        "dim": FLAGS.loss_dim,
        "devices": len(devices),
        "target": where,
        "rows": [r.row() for r in rows],
    }


def measure_weights(cfg) -> dict:
    """Import and export wall times of each --weights_models, one after the other."""
    del cfg  # the conversion alone
    import dataclasses

    from absl import logging

    from jaxclip.weights import timing

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO
    rows = [timing.conversion_times(m, FLAGS.weights_dir) for m in FLAGS.weights_models]
    return {"what": "weights", "rows": [dataclasses.asdict(r) for r in rows]}


def measure_embed(cfg) -> dict:
    """Captions/s and FLOPs per caption of --embed_encoder at each --embed_lengths."""
    del cfg  # the frozen encoder alone
    import dataclasses

    from jaxclip import embed_throughput

    lengths = [int(x) for x in FLAGS.embed_lengths]
    result = embed_throughput.measure(
        FLAGS.embed_encoder, lengths, FLAGS.embed_batch, FLAGS.embed_batches, FLAGS.embed_dtype
    )
    fields = dataclasses.asdict(result)
    return {"what": "embed", "batch_size": fields.pop("batch"), **fields}


def main(argv):
    del argv
    cfg = _cli.load(FLAGS.config, OVERRIDES)
    measures = {
        "flops": measure_flops,
        "step": measure_step,
        "data": measure_data,
        "pipeline": measure_pipeline,
        "loss_memory": measure_loss_memory,
        "collectives": measure_collectives,
        "weights": measure_weights,
        "embed": measure_embed,
    }
    unknown = [w for w in FLAGS.what if w not in measures]
    if unknown:
        sys.exit(f"error: unknown --what {', '.join(unknown)}; choose from {', '.join(measures)}")
    for what in FLAGS.what:
        result = {"config": cfg.name, "batch_size": cfg.data.batch_size, **measures[what](cfg)}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    ARGV, OVERRIDES = _cli.split_overrides(sys.argv)
    app.run(main, argv=ARGV)
