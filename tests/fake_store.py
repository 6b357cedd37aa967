"""A caption-embedding store in the real format, made with a deterministic stand-in encoder
(a hash-seeded unit vector per text), for tests about the pipeline rather than the encoder."""

from __future__ import annotations

import hashlib

import numpy as np

from jaxclip import caption_embeddings, frozen_encoder
from jaxclip.data import embedding_store
from jaxclip.data.sources import training_sources


def fake_vector(text: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def build_fake_store(cfg) -> None:
    """Every caption of `cfg`'s datasets and its evaluators' texts, as `embed_text.py` would
    store them, for the encoder identity the config names."""
    te = cfg.text_encoder
    identity = frozen_encoder.expected_identity(te)
    directory = caption_embeddings.store_dir(cfg)
    embedding_store.start_build(directory)

    def embed(texts):
        return np.stack([fake_vector(t, int(te.dim)) for t in texts])

    datasets = [
        embedding_store.build_dataset(
            directory, source, embed_fn=embed, encoder=identity, shard_size=te.shard_size,
            progress=False,
        )
        for source, _ in training_sources(cfg.data)
    ]  # fmt: skip
    texts = caption_embeddings.eval_texts(cfg)
    entry = embedding_store.write_eval_texts(directory, texts, embed, int(te.dim))
    embedding_store.write_manifest(directory, identity, datasets, entry)
