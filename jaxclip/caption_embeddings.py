"""LIFT's caption embeddings for a run: build them once, or open and check them.

    build(cfg)               launch/embed_text.py: every usable caption of every record of
                             every configured dataset, and every text the configured
                             evaluators embed, with the configured frozen encoder
    open_for_training(cfg)   one `DatasetEmbeddings` per dataset of the mixture, checked
                             against the data and the encoder before anything compiles
    open_eval_texts(cfg)     the evaluators' prompt and caption embeddings

A training or evaluation job never embeds anything itself (only `text_encoder.auto_build`,
the CPU demo, builds a missing store): a missing, stale or mismatched store stops it with
the command that builds the right one.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
from absl import logging

from jaxclip import frozen_encoder
from jaxclip.data import embedding_store as store_lib
from jaxclip.data.sources import training_sources


def store_dir(cfg: ml_collections.ConfigDict) -> Path:
    return store_lib.default_store_dir(cfg.text_encoder, cfg.name)


def build_command(cfg: ml_collections.ConfigDict) -> str:
    return store_lib.rebuild_command(cfg.name, cfg.text_encoder.store_dir or None)


def eval_texts(cfg: ml_collections.ConfigDict) -> list[str]:
    from jaxclip.evaluate.registry import eval_texts as texts  # the evaluators define them

    return texts(cfg)


def build(cfg: ml_collections.ConfigDict, *, progress: bool = True) -> Path:
    """Embeds the run's captions and evaluation texts; resumable, one share per process."""
    directory = store_dir(cfg)
    texts = eval_texts(cfg)  # before embedding: a missing evaluation dataset fails fast
    encoder = frozen_encoder.load(cfg.text_encoder, mesh_rules=cfg.mesh.rules)
    show = progress and jax.process_index() == 0
    if jax.process_index() == 0:
        store_lib.start_build(directory)
    datasets = [
        store_lib.build_dataset(
            directory,
            source,
            embed_fn=encoder.embed,
            encoder=encoder.identity,
            shard_size=cfg.text_encoder.shard_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            progress=show,
        )
        for source, _ in training_sources(cfg.data)
    ]
    if jax.process_index() == 0:
        entry = store_lib.write_eval_texts(directory, texts, encoder.embed, encoder.dim)
        store_lib.write_manifest(directory, encoder.identity, datasets, entry)
    return directory


def _open_datasets(cfg: ml_collections.ConfigDict) -> list[store_lib.DatasetEmbeddings]:
    expected = frozen_encoder.expected_identity(cfg.text_encoder)
    command = build_command(cfg)
    return [
        store_lib.DatasetEmbeddings.open(store_dir(cfg), source.identity, expected, command)
        for source, _ in training_sources(cfg.data)
    ]


def open_eval_texts(cfg: ml_collections.ConfigDict) -> store_lib.EvalTexts:
    """The evaluation texts, refused when the configured evaluators need others."""
    expected = frozen_encoder.expected_identity(cfg.text_encoder)
    texts = store_lib.EvalTexts(store_dir(cfg), expected, build_command(cfg))
    texts.require(eval_texts(cfg))
    return texts


def open_for_training(
    cfg: ml_collections.ConfigDict, *, progress: bool = True
) -> list[store_lib.DatasetEmbeddings]:
    """The checked embeddings of every dataset; builds them only when the config allows."""
    try:
        stores = _open_datasets(cfg)
        open_eval_texts(cfg)
    except store_lib.StoreError:
        if not cfg.text_encoder.auto_build:
            raise
        logging.info("Building the caption-embedding store in %s (first run only).", store_dir(cfg))
        build(cfg, progress=progress)
        stores = _open_datasets(cfg)
    return stores
