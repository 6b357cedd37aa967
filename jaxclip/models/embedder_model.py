"""The model of a decoder-LLM embedder and its weights: what a config.json asks for
(`EmbedderSpec`), the decoder + pooling + normalization module (`EmbedderModel`), and filling
it from a Hugging Face checkpoint straight into sharded parameters (`load_weights`).

`decoder_embedder` puts a tokenizer and the jitted step around it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxclip import mesh as mesh_lib
from jaxclip.models import decoder_llm, embedding_pooling, hf_checkpoint
from jaxclip.models.decoder_llm import ConfigError, DecoderConfig, DecoderLM
from jaxclip.models.embedding_pooling import POOLINGS, LatentAttentionConfig

CONFIGS_DIR = Path(__file__).resolve().parent / "llm_configs"
ATTENTIONS = ("causal", "bidirectional")
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


# ---------------------------------------------------------------------------------------------
# What a config.json asks for
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EmbedderSpec:
    """The decoder, the pooler and the defaults a config.json implies."""

    decoder: DecoderConfig
    latent: LatentAttentionConfig | None
    pooling: str
    attention: str
    padding_side: str
    append_eos: bool  # NV-Embed appends the end-of-text token to every text itself
    mask_instruction: bool

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], path: str = "config.json") -> EmbedderSpec:
        if raw.get("model_type") == "nvembed":
            text = dict(raw.get("text_config") or {})
            if text.get("model_type") in ("bidir_mistral", None):
                text["model_type"] = "mistral"  # NV-Embed's name for Mistral without the mask
            latent = LatentAttentionConfig.from_dict(raw.get("latent_attention_config") or {}, path)
            decoder = DecoderConfig.from_dict(text, f"{path} (text_config)")
            if latent.hidden_size != decoder.hidden_size:
                raise ConfigError(
                    f"{path}: latent attention hidden_dim {latent.hidden_size} != the decoder's "
                    f"hidden_size {decoder.hidden_size}"
                )
            return cls(
                decoder, latent, "latent", "bidirectional", raw.get("padding_side", "right"),
                bool(raw.get("add_eos", True)), bool(raw.get("is_mask_instruction", True)),
            )  # fmt: skip
        decoder = DecoderConfig.from_dict(raw, path)
        side = "left" if decoder.architecture.startswith("qwen") else "right"
        return cls(decoder, None, "last", "causal", side, False, False)


def read_config(path_or_config: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(config dict, where it came from) from a model directory, a JSON file, a dict, or the
    name of a file in llm_configs/ ("qwen3_embedding_8b", "nv_embed_v2")."""
    if isinstance(path_or_config, Mapping):
        return dict(path_or_config), "config"
    path = Path(path_or_config)
    if path.is_dir():
        path = path / "config.json"
    elif not path.exists() and (CONFIGS_DIR / f"{path_or_config}.json").exists():
        path = CONFIGS_DIR / f"{path_or_config}.json"
    if not path.exists():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
        raise FileNotFoundError(f"no config.json at {path_or_config}; known shapes: {known}")
    return json.loads(path.read_text()), str(path)


# ---------------------------------------------------------------------------------------------
# The model: decoder + pooling + normalization
# ---------------------------------------------------------------------------------------------


class EmbedderModel(nnx.Module):
    """(tokens, mask, pool_mask) (B, L) int -> embeddings (B, dim) float32."""

    def __init__(
        self,
        spec: EmbedderSpec,
        *,
        pooling: str,
        attention: str,
        normalize: bool,
        dim: int | None = None,
        scan: bool = True,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.pooling, self.normalize = pooling, normalize
        self.dim = dim or spec.decoder.hidden_size
        causal = attention == "causal"
        self.decoder = DecoderLM(spec.decoder, causal=causal, scan=scan, dtype=dtype, rngs=rngs)
        if pooling == "latent":
            latent = spec.latent or LatentAttentionConfig(hidden_size=spec.decoder.hidden_size)
            self.pooler = embedding_pooling.LatentAttentionPooling(latent, dtype=dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array, mask: jax.Array, pool_mask: jax.Array) -> jax.Array:
        states = self.decoder(tokens, mask)
        if self.pooling == "latent":
            pooled = self.pooler(states, pool_mask)
        elif self.pooling == "mean":
            pooled = embedding_pooling.mean_pool(states, pool_mask)
        else:
            pooled = embedding_pooling.last_token_pool(states, mask)
        pooled = pooled[:, : self.dim]  # Matryoshka models: a prefix is an embedding
        if self.normalize:
            pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled


def check_options(spec: EmbedderSpec, pooling: str, attention: str, dim: int | None, where):
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r} is not one of {POOLINGS}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention {attention!r} is not one of {ATTENTIONS}")
    if pooling == "latent" and spec.latent is None:
        raise ValueError(
            f"{where}: latent pooling needs an NV-Embed checkpoint (model_type nvembed)"
        )
    native = spec.decoder.hidden_size
    if dim is not None and not 0 < dim <= native:
        raise ValueError(f"{where} embeds into {native} dimensions; dim={dim} is not possible")
    if dim is not None and dim != native and spec.decoder.architecture != "qwen3":
        raise ValueError(
            f"{where} embeds into {native} dimensions and is not a Matryoshka model (only "
            f"Qwen3-Embedding's prefixes are trained as embeddings); config asks for {dim}"
        )


def hf_placements(spec: EmbedderSpec, ckpt: hf_checkpoint.CheckpointDir, pooling: str):
    """(param path -> placement, tensors to ignore) for this checkpoint's naming."""
    prefix = ckpt.prefix(decoder_llm.HF_PREFIXES, "embed_tokens.weight")
    placements = {
        f"decoder.{k}": v for k, v in decoder_llm.hf_placements(spec.decoder, prefix).items()
    }
    ignored = set(decoder_llm.hf_ignored(prefix))
    if spec.latent is not None:
        latent = embedding_pooling.latent_hf_placements(spec.latent)
        if pooling == "latent":
            placements.update({f"pooler.{k}": v for k, v in latent.items()})
        else:  # another pooling chosen: the latent layer's tensors are there but unused
            ignored |= {s.name for p in latent.values() for s in p.sources}
    return placements, ignored


def _params(model: nnx.Module) -> dict[str, nnx.Param]:
    return {
        ".".join(map(str, path)): var
        for path, var in nnx.iter_graph(model)
        if isinstance(var, nnx.Param)
    }


def param_sharding(var: nnx.Param, rules: Mapping, mesh: Mesh) -> NamedSharding:
    shape = var.get_value().shape
    spec = mesh_lib.logical_to_spec(var.get_metadata()["logical_axes"], shape, rules, mesh)
    return NamedSharding(mesh, spec)


def load_weights(
    model: EmbedderModel,
    spec: EmbedderSpec,
    model_dir: Path,
    *,
    mesh: Mesh,
    rules: Mapping,
) -> list[Path]:
    """Fills an abstract `model` from the checkpoint in place, each parameter already sharded.
    Returns the weight files."""
    ckpt = hf_checkpoint.CheckpointDir(model_dir)
    params = _params(model)
    placements, ignored = hf_placements(spec, ckpt, model.pooling)
    shapes = {name: tuple(var.get_value().shape) for name, var in params.items()}
    hf_checkpoint.check_fit(ckpt, placements, shapes, ignored)
    for name, var in params.items():
        abstract = var.get_value()
        array = hf_checkpoint.load_array(
            ckpt,
            placements[name],
            abstract.shape,
            np.dtype(abstract.dtype),
            param_sharding(var, rules, mesh),
        )
        var.set_value(array)
    return ckpt.files


def build_model(
    spec: EmbedderSpec,
    *,
    pooling: str,
    attention: str,
    normalize: bool = True,
    dim: int | None = None,
    dtype: str = "float32",
    scan: bool = True,
    abstract: bool = True,
    seed: int = 0,
) -> EmbedderModel:
    """The model, abstract (shapes only, to fill or to compile) or randomly initialized."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")

    def make() -> EmbedderModel:
        return EmbedderModel(
            spec, pooling=pooling, attention=attention, normalize=normalize, dim=dim,
            scan=scan, dtype=DTYPES[dtype], rngs=nnx.Rngs(seed),
        )  # fmt: skip

    return nnx.eval_shape(make) if abstract else make()
