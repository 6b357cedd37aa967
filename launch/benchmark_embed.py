"""Embedding throughput of a decoder-LLM embedder with random weights, beside its FLOPs.

    python launch/benchmark_embed.py                          # Qwen3-Embedding-0.6B shape
    python launch/benchmark_embed.py --encoder nv_embed_v2 --lengths 16 --batch 4 --batches 1

For each caption length: captions/s of the jitted embedding step (decoder + pooling +
normalization; tokenization not included) over --batches timed batches after one warm-up, on
this machine's first device; the compiled FLOPs per caption from XLA's cost analysis of the same
step with layers unrolled (a scanned body is counted once); and the analytic figures
2 x parameters x tokens (matmul parameters, the embedding lookup excluded) and that plus
attention's 4 x layers x heads x head_dim x tokens^2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="qwen3_embedding_0.6b")
    parser.add_argument("--lengths", default="16,32,77")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per length")
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    args = parser.parse_args()

    import jax
    import numpy as np
    from flax import nnx

    from jaxclip import mesh as mesh_lib
    from jaxclip.aot import compiled_flops
    from jaxclip.config import base_config
    from jaxclip.models import decoder_embedder, embedder_model

    raw, where = embedder_model.read_config(args.encoder)
    spec = embedder_model.EmbedderSpec.from_dict(raw, where)
    cfg = spec.decoder
    rules = dict(base_config().mesh.rules)
    device = jax.devices()[:1]
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, device)
    started = time.perf_counter()
    model = embedder_model.build_model(
        spec, pooling=spec.pooling, attention=spec.attention, dtype=args.dtype, abstract=False
    )
    step, _ = decoder_embedder.make_embed_step(model, mesh, rules)
    state = nnx.to_pure_dict(nnx.state(model))
    params = sum(x.size for x in jax.tree.leaves(state))
    print(
        f"{args.encoder}: {params / 1e9:.3f} B parameters ({cfg.num_params(False) / 1e9:.3f} B "
        f"in matmuls), {args.dtype}, random init {time.perf_counter() - started:.0f} s; "
        f"device {device[0].device_kind}, batch {args.batch}"
    )
    print("length  captions/s  s/batch  compiled GFLOP/caption  2*P*T GFLOP  +attention GFLOP")
    rng = np.random.default_rng(0)
    for length in (int(x) for x in args.lengths.split(",")):
        tokens = rng.integers(0, cfg.vocab_size, (args.batch, length), dtype=np.int32)
        mask = np.ones_like(tokens)
        step(state, tokens, mask, mask).block_until_ready()  # compile + warm-up
        started = time.perf_counter()
        for _ in range(args.batches):
            step(state, tokens, mask, mask).block_until_ready()
        per_batch = (time.perf_counter() - started) / args.batches
        compiled = decoder_embedder.compile_embed_step(
            args.encoder, device, args.batch, length, rules, args.dtype, scan=False,
            mesh_shape={"data": 1, "fsdp": 1, "tensor": 1},
        )  # fmt: skip
        flops = compiled_flops(compiled) / args.batch
        dense = 2 * cfg.num_params(embedding=False) * length
        attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * length**2
        print(
            f"{length:6d}  {args.batch / per_batch:10.2f}  {per_batch:7.2f}  "
            f"{flops / 1e9:22.2f}  {dense / 1e9:11.2f}  {(dense + attention) / 1e9:16.2f}"
        )


if __name__ == "__main__":
    main()
