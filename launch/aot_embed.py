"""Does a decoder-LLM embedder fit a TPU slice or GPU node for embedding? Compile and see.

    python launch/aot_embed.py --encoder nv_embed_v2 --target v5p-8 --batch 256 --length 77
    python launch/aot_embed.py --encoder qwen3_embedding_8b --target 8xH100
    python launch/aot_embed.py --encoder /path/to/hf_dir --target v5e-16 --tensor 2

--encoder is a Hugging Face directory (only its config.json is read) or the name of a shape in
jaxclip/models/llm_configs/. The embedding step (decoder + pooling, bfloat16 parameters) is
lowered on abstract inputs and compiled for the target's compile-only devices (jaxclip.aot_targets:
libtpu for TPU slices, JAX's CUDA plugin for GPUs); XLA's memory analysis gives the bytes per
device, compared with HBM (TPU) or JAX's preallocated pool (GPU). Nothing is allocated.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", required=True)
    parser.add_argument("--target", required=True, help="v5p-8, 8xH100, v5e-16, ...")
    parser.add_argument("--batch", type=int, default=256, help="global batch (captions)")
    parser.add_argument("--length", type=int, default=77, help="tokens per caption")
    parser.add_argument("--tensor", type=int, default=1, help="tensor-parallel size (rest fsdp)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()

    from jaxclip import aot_targets
    from jaxclip.aot import MemoryUse, describe_target

    target = aot_targets.parse_target(args.target)
    aot_targets.prepare_host(target)

    import jax
    from flax import nnx

    from jaxclip.config import base_config
    from jaxclip.models import decoder_embedder, embedder_model

    raw, where = embedder_model.read_config(args.encoder)
    spec = embedder_model.EmbedderSpec.from_dict(raw, where)
    devices = aot_targets.target_devices(target)
    mesh_shape = {"data": 1, "fsdp": target.num_devices // args.tensor, "tensor": args.tensor}
    started = time.perf_counter()
    compiled = decoder_embedder.compile_embed_step(
        args.encoder,
        devices,
        args.batch,
        args.length,
        dict(base_config().mesh.rules),
        args.dtype,
        mesh_shape=mesh_shape,
        compiler_options=aot_targets.compiler_options(target),
    )
    seconds = time.perf_counter() - started
    m = MemoryUse.of(compiled)
    gib = 2**30
    model = embedder_model.build_model(spec, pooling=spec.pooling, attention=spec.attention)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    pooler = " + latent-attention pooling" if spec.pooling == "latent" else ""
    name = Path(where).parent.name if Path(where).name == "config.json" else Path(where).stem
    print(f"{name}: {spec.decoder.architecture} decoder{pooler}, {params / 1e9:.2f} B parameters")
    print(f"target: {describe_target(target)}")
    print(f"mesh: {mesh_shape}; batch {args.batch} x {args.length} tokens, {args.dtype} params")
    print("per-device memory (XLA memory analysis):")
    print(f"  arguments      {m.arguments / gib:8.2f} GiB  (parameters + token ids)")
    print(f"  outputs        {m.outputs / gib:8.4f} GiB")
    print(f"  temporaries    {m.temporaries / gib:8.2f} GiB")
    print(f"  generated code {m.generated_code / gib:8.4f} GiB")
    share = m.total / target.budget_bytes
    verdict = "fits" if m.total <= target.budget_bytes else "DOES NOT FIT"
    print(f"  total          {m.total / gib:8.2f} GiB = {share:.0%} of "
          f"{target.budget_bytes / gib:.1f} GiB: {verdict}")  # fmt: skip
    print(f"compile: {seconds:.0f} s")


if __name__ == "__main__":
    main()
