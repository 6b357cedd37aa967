"""LIFT's caption embeddings at training time: find the store, check it, or refuse to start.

A training job never silently re-embeds captions: a missing or mismatched store stops the
job before anything is compiled, with the command that builds the right one. Only configs
with `text_encoder.auto_build` (the CPU demo) build a missing store themselves.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
from absl import logging

from jaxclip.data import embedding_store as store_lib
from jaxclip.data.pipeline import make_source


def build_command(cfg: ml_collections.ConfigDict) -> str:
    return store_lib.rebuild_command(cfg.name, cfg.text_encoder.store_dir or None)


def build(cfg: ml_collections.ConfigDict, *, progress: bool = True) -> Path:
    """Embeds every training caption and every evaluation text into the store.

    Each process embeds its share of the shards on its own devices (a local mesh).
    """
    from jaxclip import mesh as mesh_lib
    from jaxclip.evaluate.registry import eval_texts  # evaluation imports data, not reverse

    source = make_source(cfg.data, "train")
    local = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
    embed_fn, info = store_lib.make_embed_fn(cfg, local)
    return store_lib.build_store(
        cfg,
        store_lib.default_store_dir(cfg),
        embed_fn=embed_fn,
        captions_fn=lambda start, stop: [source.caption(i) for i in range(start, stop)],
        num_examples=len(source),
        eval_texts=eval_texts(cfg),
        progress=progress and jax.process_index() == 0,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        encoder_info=info,
    )


def open_for_training(
    cfg: ml_collections.ConfigDict, *, progress: bool = True
) -> store_lib.EmbeddingStore:
    """The validated store for `cfg`; builds it only when the config allows (demo)."""
    directory = store_lib.default_store_dir(cfg)
    if not (directory / "manifest.json").is_file():
        if not cfg.text_encoder.auto_build:
            raise store_lib.StoreError(
                f"LIFT training needs the caption embeddings of {cfg.text_encoder.name!r} in "
                f"{directory}, and that store is missing or unfinished. Build it first "
                f"(it resumes if interrupted):\n    {build_command(cfg)}"
            )
        logging.info("Building the caption-embedding store in %s (first run only).", directory)
        build(cfg, progress=progress)
    store = store_lib.EmbeddingStore.open(directory, config_name=cfg.name)
    store.validate(_expected(cfg, store), config_name=cfg.name)
    return store


def _expected(cfg: ml_collections.ConfigDict, store: store_lib.EmbeddingStore) -> dict:
    """What the store must describe. The captions hash is recomputed for the first shard
    only: enough to catch a changed caption generator without regenerating every caption."""
    source = make_source(cfg.data, "train")
    first = store.manifest["shards"][0]
    captions = [source.caption(i) for i in range(first["start"], first["start"] + first["count"])]
    expected = store_lib.expected_description(cfg, None)
    expected["num_examples"] = len(source)
    expected["first_shard_captions_sha256"] = store_lib.captions_hash(captions)
    return expected
