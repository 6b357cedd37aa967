"""Does the configured frozen text encoder fit a TPU slice or GPU node for embedding?

    python launch/embed_text.py --config vit_b16_lift --aot v5p-8
    python launch/embed_text.py --config vit_b16_lift_qwen3 --aot 8xH100 \\
        --config.text_encoder.batch_size=256 --config.text_encoder.max_length=77

The embedding step (decoder + pooling, `text_encoder.dtype` parameters, sharded over every
device by fsdp as `embed_text.py` runs it) is lowered on abstract inputs of
`text_encoder.batch_size` x `text_encoder.max_length` tokens and compiled for the target's
compile-only devices (`aot_targets`); XLA's memory analysis gives the bytes per device. Only a
config.json is read: `text_encoder.path`'s, else a shape shipped in models/llm_configs/ for
the published encoders named in the configs. Nothing is allocated.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ml_collections

from jaxclip.aot import MemoryUse, describe_target
from jaxclip.aot_targets import (
    AotError,
    compiler_options,
    parse_target,
    prepare_host,
    target_devices,
)

# Published encoders whose shapes ship with jaxclip (models/llm_configs/), by Hub name.
KNOWN_SHAPES = {
    "nvidia/NV-Embed-v2": "nv_embed_v2",
    "Qwen/Qwen3-Embedding-0.6B": "qwen3_embedding_0.6b",
    "Qwen/Qwen3-Embedding-4B": "qwen3_embedding_4b",
    "Qwen/Qwen3-Embedding-8B": "qwen3_embedding_8b",
}
GIB = 2**30


def encoder_config(te: ml_collections.ConfigDict) -> str:
    """Where the encoder's config.json comes from: its directory, else a shipped shape."""
    if te.path:
        return str(te.path)
    if te.name in KNOWN_SHAPES:
        return KNOWN_SHAPES[te.name]
    raise AotError(
        f"No shape for the text encoder {te.name!r}: set text_encoder.path to its Hugging Face "
        f"directory (only config.json is read), or use one of {', '.join(KNOWN_SHAPES)}."
    )


def run(cfg: ml_collections.ConfigDict, target_name: str, out: Callable[[str], None] = print):
    """Compiles the configured encoder's embedding step for `target_name`; prints the fit."""
    target = parse_target(target_name)
    prepare_host(target)  # before JAX starts a backend

    import jax
    from flax import nnx

    from jaxclip.models import decoder_embedder, embedder_model

    te = cfg.text_encoder
    source = encoder_config(te)
    raw, _ = embedder_model.read_config(source)
    spec = embedder_model.EmbedderSpec.from_dict(raw, source)
    tensor = int(cfg.mesh.shape.tensor) if int(cfg.mesh.shape.tensor) > 0 else 1
    sizes = {"data": 1, "fsdp": target.num_devices // tensor, "tensor": tensor}
    started = time.perf_counter()
    compiled = decoder_embedder.compile_embed_step(
        source,
        target_devices(target),
        int(te.batch_size),
        int(te.max_length),
        dict(cfg.mesh.rules),
        te.dtype,
        mesh_shape=sizes,
        pooling=te.pooling or None,
        compiler_options=compiler_options(target),
    )
    seconds = time.perf_counter() - started
    m = MemoryUse.of(compiled)
    model = nnx.eval_shape(
        lambda: embedder_model.build_model(spec, pooling=spec.pooling, attention=spec.attention)
    )
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    verdict = "fits" if m.total <= target.budget_bytes else "DOES NOT FIT"
    for line in (
        f"{te.name}: {spec.decoder.architecture} decoder, {spec.pooling} pooling, "
        f"{params / 1e9:.2f} B parameters ({te.dtype})",
        f"target: {describe_target(target)}",
        f"mesh: {sizes}; batch {te.batch_size} x {te.max_length} tokens",
        "per-device memory (XLA memory analysis):",
        f"  arguments      {m.arguments / GIB:8.2f} GiB  (parameters + token ids)",
        f"  temporaries    {m.temporaries / GIB:8.2f} GiB",
        f"  total          {m.total / GIB:8.2f} GiB = {m.total / target.budget_bytes:.0%} of "
        f"{target.budget_bytes / GIB:.1f} GiB: {verdict}",
        f"compile: {seconds:.0f} s",
    ):
        out(line)
    return m
