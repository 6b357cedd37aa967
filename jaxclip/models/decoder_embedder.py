"""Frozen decoder-LLM text embedders: Qwen3-Embedding, NV-Embed-v2, any Qwen3/Qwen2/Mistral.

    embedder = load_decoder_embedder(DIR, mesh=mesh, rules=dict(cfg.mesh.rules))
    vectors = embedder.embed(captions, batch_size=256)   # float32 (n, embedder.dim)

`DIR` is a Hugging Face model directory (config.json, tokenizer.json, safetensors). What the
directory's config says sets the defaults, and each can be overridden:

| config.json model_type | attention     | pooling | padding | end-of-text token          |
| qwen3, qwen2           | causal        | last    | left    | the tokenizer appends it   |
| mistral                | causal        | last    | right   | the tokenizer's, if any    |
| nvembed (NV-Embed-v2)  | bidirectional | latent  | right   | appended to the text       |

Queries of retrieval benchmarks take an instruction prefix ("Instruct: ...\\nQuery: " for
Qwen3-Embedding); LIFT embeds captions without one, the default. NV-Embed leaves the
instruction's tokens out of its pooling (``is_mask_instruction``), and so does this.

The parameters are read lazily and placed straight into their shards (`hf_checkpoint`); the
batch is split over the mesh's batch axes; caption lengths are bucketed to powers of two
(>= 16, at most `max_length`) after sorting, so short captions stay cheap and few shapes
compile. `compile_embed_step` compiles the same step for compile-only devices (`--aot`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from jax.sharding import Mesh

from jaxclip import mesh as mesh_lib
from jaxclip.models import hf_checkpoint
from jaxclip.models.embedder_model import (
    EmbedderModel,
    EmbedderSpec,
    build_model,
    check_options,
    load_weights,
    read_config,
)

MIN_BUCKET = 16


# ---------------------------------------------------------------------------------------------
# The embedder
# ---------------------------------------------------------------------------------------------


def make_embed_step(model: EmbedderModel, mesh: Mesh, rules: Mapping):
    """(jitted step, state shardings): (state, tokens, mask, pool_mask) -> (B, dim) float32,
    the state a pure dict of parameters sharded by their logical axes, the batch over the
    mesh's batch axes."""
    graphdef, state = nnx.split(model)
    state_shardings = mesh_lib.named(
        mesh, nnx.to_pure_dict(mesh_lib.state_specs(state, rules, mesh))
    )
    batch = mesh_lib.batch_sharding(mesh, 2)

    def step(params, tokens, mask, pool_mask):
        return nnx.merge(graphdef, params)(tokens, mask, pool_mask)

    jitted = jax.jit(step, in_shardings=(state_shardings, batch, batch, batch), out_shardings=batch)
    return jitted, state_shardings


def bucket_length(longest: int, max_length: int) -> int:
    """The padded length for a batch whose longest text has `longest` tokens."""
    return min(max(MIN_BUCKET, 1 << max(longest - 1, 0).bit_length()), max_length)


def _pad(rows: Sequence[Sequence[int]], length: int, pad_id: int, side: str):
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, ids in enumerate(rows):
        n = len(ids)
        cols = slice(length - n, length) if side == "left" else slice(0, n)
        tokens[i, cols], mask[i, cols] = ids, 1
    return tokens, mask


def pool_mask_without_prefix(mask: np.ndarray, prefix_tokens: int) -> np.ndarray:
    """The mask with each row's first `prefix_tokens` real tokens removed (NV-Embed keeps the
    instruction out of its mean; like it, the count starts at the first token, BOS included)."""
    if prefix_tokens == 0:
        return mask
    return mask * (np.cumsum(mask, axis=1) > prefix_tokens)


@dataclasses.dataclass
class TextSettings:
    """How texts become token ids for this encoder."""

    instruction: str = ""
    append_eos: bool = False
    mask_instruction: bool = False
    padding_side: str = "right"
    eos_token: str | None = None
    pad_id: int = 0


class DecoderEmbedder:
    """A loaded decoder-LLM embedder: texts -> float32 (n, dim) numpy."""

    def __init__(
        self,
        model: EmbedderModel,
        tokenizer: tokenizers.Tokenizer,
        mesh: Mesh,
        rules: Mapping,
        *,
        max_length: int,
        text: TextSettings,
        identity: dict[str, Any],
        weight_files: Sequence[Path] = (),
    ):
        if any(d not in set(jax.local_devices()) for d in mesh.devices.flat):
            raise ValueError(
                "a DecoderEmbedder needs a mesh of this process's devices only: each process "
                "embeds its own texts (build it with mesh.make_mesh(sizes, jax.local_devices()))"
            )
        self.model, self.mesh, self.text = model, mesh, text
        self.max_length, self.dim = max_length, model.dim
        self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length)
        self._step, _ = make_embed_step(model, mesh, rules)
        self._state = nnx.to_pure_dict(nnx.state(model))
        self._shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self._identity, self._weight_files = identity, list(weight_files)

    @property
    def identity(self) -> dict[str, Any]:
        """What the embeddings depend on, for a store's manifest; the weights' sha256 is
        computed on first use (it reads every weight file once)."""
        if "weights_sha256" not in self._identity:
            self._identity["weights_sha256"] = hf_checkpoint.weights_sha256(self._weight_files)
        return dict(self._identity)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text as the encoder sees it: instruction + text (+ end-of-text), truncated."""
        t = self.text
        eos = t.eos_token if t.append_eos and t.eos_token else ""
        encoded = self._tokenizer.encode_batch([f"{t.instruction}{s}{eos}" for s in texts])
        return [e.ids for e in encoded]

    def _prefix_tokens(self) -> int:
        t = self.text
        if not (t.mask_instruction and t.instruction):
            return 0
        return len(self._tokenizer.encode(t.instruction, add_special_tokens=False).ids)

    def embed(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        """float32 (len(texts), dim). Texts are sorted by length so each batch pads to a tight
        power-of-two bucket; the batch is rounded up to a multiple of the mesh's batch shards."""
        if isinstance(texts, str):
            raise TypeError("pass a sequence of strings, not a single string")
        out = np.zeros((len(texts), self.dim), np.float32)
        ids = self.token_ids(texts)
        order = np.argsort([len(x) for x in ids], kind="stable")
        batch = -(-max(1, int(batch_size)) // self._shards) * self._shards
        prefix = self._prefix_tokens()
        sharding = mesh_lib.batch_sharding(self.mesh, 2)
        for lo in range(0, len(order), batch):
            rows = order[lo : lo + batch]
            chunk = [ids[i] for i in rows] + [[]] * (batch - len(rows))  # empty rows: padding
            length = bucket_length(max(len(x) for x in chunk), self.max_length)
            tokens, mask = _pad(chunk, length, self.text.pad_id, self.text.padding_side)
            pool_mask = pool_mask_without_prefix(mask, prefix)
            arrays = [jax.device_put(a, sharding) for a in (tokens, mask, pool_mask)]
            out[rows] = np.asarray(self._step(self._state, *arrays))[: len(rows)]
        return out


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _tokenizer_settings(model_dir: Path, tok: tokenizers.Tokenizer) -> dict[str, Any]:
    path = model_dir / "tokenizer_config.json"
    raw = json.loads(path.read_text()) if path.exists() else {}

    def token(key: str) -> str | None:
        value = raw.get(key)
        return value.get("content") if isinstance(value, dict) else value

    pad, eos = token("pad_token"), token("eos_token")
    pad_id = tok.token_to_id(pad) if pad else None
    if pad_id is None and eos:
        pad_id = tok.token_to_id(eos)
    return dict(pad_id=pad_id or 0, eos_token=eos, padding_side=raw.get("padding_side"))


def load_decoder_embedder(
    path: str | Path,
    *,
    mesh: Mesh,
    rules: Mapping | Sequence,
    dtype: str = "bfloat16",
    pooling: str | None = None,
    normalize: bool = True,
    instruction: str = "",
    max_length: int = 512,
    attention: str | None = None,
    padding_side: str | None = None,
    dim: int | None = None,
    append_eos: bool | None = None,
    name: str | None = None,
) -> DecoderEmbedder:
    """Loads a Hugging Face decoder embedder directory onto `mesh`, without PyTorch.

    None means the directory's default (module docstring). `rules` are the logical-axis rules
    (`cfg.mesh.rules`). `dim` below the hidden size keeps a prefix (Qwen3-Embedding only).
    `append_eos` adds the tokenizer's end-of-text token to every text (NV-Embed's default; for
    a tokenizer.json whose post-processor does not add it already).
    """
    model_dir = Path(path).resolve()
    raw, where = read_config(model_dir)
    spec = EmbedderSpec.from_dict(raw, where)
    pooling, attention = pooling or spec.pooling, attention or spec.attention
    check_options(spec, pooling, attention, dim, model_dir.name)
    window = spec.decoder.sliding_window
    if attention == "causal" and window is not None and max_length > window:
        raise ValueError(f"max_length {max_length} > the sliding window {window}: not supported")
    if max_length > spec.decoder.max_position_embeddings:
        raise ValueError(
            f"max_length {max_length} > max_position_embeddings "
            f"{spec.decoder.max_position_embeddings} of {model_dir.name}"
        )
    rules = dict(rules)
    model = build_model(
        spec, pooling=pooling, attention=attention, normalize=normalize, dim=dim, dtype=dtype
    )
    files = load_weights(model, spec, model_dir, mesh=mesh, rules=rules)
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    settings = _tokenizer_settings(model_dir, tok)
    side = padding_side or settings.pop("padding_side") or spec.padding_side
    settings.pop("padding_side", None)
    if side not in ("left", "right"):
        raise ValueError(f"padding_side {side!r} is not 'left' or 'right'")
    text = TextSettings(
        instruction=instruction,
        append_eos=spec.append_eos if append_eos is None else append_eos,
        mask_instruction=spec.mask_instruction,
        padding_side=side,
        **settings,
    )
    identity = dict(
        name=name or model_dir.name,
        architecture=raw.get("model_type"),
        pooling=pooling,
        attention=attention,
        normalize=normalize,
        instruction=instruction,
        max_length=max_length,
        dim=model.dim,
        dtype=dtype,
    )
    return DecoderEmbedder(
        model, tok, mesh, rules, max_length=max_length, text=text, identity=identity,
        weight_files=files,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation (--aot)
# ---------------------------------------------------------------------------------------------


def compile_embed_step(
    path_or_config: str | Path | Mapping[str, Any],
    devices: Sequence[Any],
    batch: int,
    length: int,
    rules: Mapping | Sequence,
    dtype: str = "bfloat16",
    *,
    mesh_shape: Mapping[str, int] | None = None,
    pooling: str | None = None,
    scan: bool = True,
    compiler_options: Mapping[str, Any] | None = None,
):
    """The embedding step of a model of this config, lowered on abstract inputs (nothing is
    allocated or read) and compiled for `devices` (compile-only TPU/GPU devices work).

    The mesh defaults to every device on fsdp (parameters and batch split 8 ways on 8 chips).
    """
    raw, where = read_config(path_or_config)
    spec = EmbedderSpec.from_dict(raw, where)
    pooling = pooling or spec.pooling
    sizes = dict(mesh_shape or {"data": 1, "fsdp": -1, "tensor": 1})
    mesh = mesh_lib.make_mesh(sizes, devices)
    model = build_model(spec, pooling=pooling, attention=spec.attention, dtype=dtype, scan=scan)
    step, state_shardings = make_embed_step(model, mesh, dict(rules))
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nnx.to_pure_dict(nnx.state(model)),
        state_shardings,
    )
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % shards:
        raise ValueError(f"batch {batch} does not divide over the {shards} batch shards")
    ids = jax.ShapeDtypeStruct(
        (batch, length), jnp.int32, sharding=mesh_lib.batch_sharding(mesh, 2)
    )
    lowered = step.lower(state, ids, ids, ids)
    return lowered.compile(compiler_options=dict(compiler_options or {}) or None)
