"""Captions per second of a decoder-LLM embedder with random weights, beside its FLOPs
(`launch/benchmark.py --what=embed`).

    python launch/benchmark.py --what=embed                   # Qwen3-Embedding-0.6B's shape
    python launch/benchmark.py --what=embed --embed_encoder=nv_embed_v2 --embed_lengths=16 \\
        --embed_batch=4 --embed_batches=1

For each caption length: captions/s of the jitted embedding step (decoder + pooling +
normalization; tokenization not included) over `batches` timed batches after one warm-up, on
one device; the compiled FLOPs per caption from XLA's cost analysis of the same step with
layers unrolled (a scanned body is counted once); and the analytic figures 2 x parameters x
tokens (matmul parameters, the embedding lookup excluded) and that plus attention's
4 x layers x heads x head_dim x tokens^2.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from jaxclip import mesh as mesh_lib
from jaxclip.aot import compiled_flops
from jaxclip.config import base_config
from jaxclip.models import decoder_embedder, embedder_model

ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


@dataclasses.dataclass(frozen=True)
class LengthRow:
    length: int
    captions_per_s: float
    seconds_per_batch: float
    compiled_gflop_per_caption: float | None  # None: the backend reports no FLOPs
    dense_gflop_per_caption: float  # 2 x matmul parameters x tokens
    with_attention_gflop_per_caption: float


@dataclasses.dataclass(frozen=True)
class EmbedThroughput:
    encoder: str
    parameters: int
    matmul_parameters: int
    dtype: str
    device_kind: str
    batch: int
    init_s: float  # building the random-weight model
    rows: list[LengthRow]


def measure(
    encoder: str, lengths: Sequence[int], batch: int, batches: int, dtype: str = "float32"
) -> EmbedThroughput:
    """`encoder`: a name in models/llm_configs/, a config.json or a model directory."""
    raw, where = embedder_model.read_config(encoder)
    spec = embedder_model.EmbedderSpec.from_dict(raw, where)
    cfg = spec.decoder
    rules = dict(base_config().mesh.rules)
    device = jax.devices()[:1]
    mesh = mesh_lib.make_mesh(ONE_DEVICE, device)
    started = time.perf_counter()
    model = embedder_model.build_model(
        spec, pooling=spec.pooling, attention=spec.attention, dtype=dtype, abstract=False
    )
    step, _ = decoder_embedder.make_embed_step(model, mesh, rules)
    state = nnx.to_pure_dict(nnx.state(model))
    init_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    rows = []
    for length in lengths:
        tokens = rng.integers(0, cfg.vocab_size, (batch, length), dtype=np.int32)
        mask = np.ones_like(tokens)
        step(state, tokens, mask, mask).block_until_ready()  # compile + warm-up
        started = time.perf_counter()
        for _ in range(batches):
            step(state, tokens, mask, mask).block_until_ready()
        per_batch = (time.perf_counter() - started) / batches
        compiled = decoder_embedder.compile_embed_step(
            encoder, device, batch, length, rules, dtype, scan=False, mesh_shape=ONE_DEVICE
        )
        flops = compiled_flops(compiled)
        dense = 2 * cfg.num_params(embedding=False) * length
        attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * length**2
        rows.append(
            LengthRow(
                length=length,
                captions_per_s=batch / per_batch,
                seconds_per_batch=per_batch,
                compiled_gflop_per_caption=flops / batch / 1e9 if flops else None,
                dense_gflop_per_caption=dense / 1e9,
                with_attention_gflop_per_caption=(dense + attention) / 1e9,
            )
        )
    return EmbedThroughput(
        encoder=encoder,
        parameters=sum(x.size for x in jax.tree.leaves(state)),
        matmul_parameters=cfg.num_params(embedding=False),
        dtype=dtype,
        device_kind=device[0].device_kind,
        batch=batch,
        init_s=init_s,
        rows=rows,
    )
