"""Model kinds: everything that differs between CLIP and LIFT, declared in one place.

A kind says
- which text fields its batches carry (the batch contract: names, per-example shapes,
  dtypes; every field is split over the mesh's batch axes),
- how its model is built (the model takes the image and those text fields and returns
  `image`, `text`, `scale`, `bias`),
- where a batch's caption features come from (tokenized captions, or the frozen encoder's
  stored embeddings),
- what its text side is at evaluation time (its own text tower, or stored embeddings of
  the evaluators' texts),
- its default objective (`loss.kind=""` means "the kind's"),
- the analytic FLOPs of its text side (for MFU).

The pipelines, the train step, `--aot`, `--dry_run` and the benchmark read the contract
from here; nothing else asks which kind trains. A new kind (SigLIP-style, LiT, ...) is one
more class in `KINDS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections
import numpy as np
from flax import nnx

from jaxclip.config import ConfigError
from jaxclip.data import pipeline
from jaxclip.models.build import build_clip_model, build_lift_model
from jaxclip.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Field:
    """One batch field: per-example shape and dtype; the batch adds a leading axis."""

    shape: tuple[int, ...]
    dtype: np.dtype


class ClipKind:
    """Image tower and text tower trained together."""

    name = "clip"
    default_loss = "contrastive"
    uses_tokenizer = True

    def text_fields(self, cfg: ml_collections.ConfigDict) -> dict[str, Field]:
        length = (cfg.data.context_length,)
        return {
            "tokens": Field(length, np.dtype(np.int32)),
            "mask": Field(length, np.dtype(np.int32)),
        }

    def build(self, cfg, tokenizer: Tokenizer | None, rngs: nnx.Rngs) -> nnx.Module:
        vocab_size = cfg.model.text.vocab_size or tokenizer.vocab_size
        if vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"model.text.vocab_size={vocab_size} is smaller than the tokenizer's vocabulary "
                f"({tokenizer.vocab_size}); set it to 0 to follow the tokenizer."
            )
        return build_clip_model(
            cfg.model, image_size=cfg.data.image_size, vocab_size=vocab_size, rngs=rngs
        )

    def caption_features(self, cfg, tokenizer: Tokenizer, *, progress: bool = True):
        del cfg, progress
        return pipeline.TokenizedCaption(tokenizer)

    def eval_text_lookup(self, cfg) -> Callable | None:
        return None  # the text tower embeds prompts and captions

    def identity(self, cfg, tokenizer: Tokenizer | None) -> dict:
        return {"tokenizer": tokenizer.identity}

    def text_and_head_flops(self, cfg, image_width: int) -> tuple[float, float]:
        """Forward FLOPs per example of the text tower and of both projections."""
        from jaxclip.flops import transformer_flops

        t, embed = cfg.model.text, cfg.model.embed_dim
        text = transformer_flops(cfg.data.context_length, t.width, t.depth, 4 * t.width)
        return text, 2.0 * image_width * embed + 2.0 * t.width * embed


class LiftKind:
    """Image tower + head trained against a frozen encoder's stored caption embeddings."""

    name = "lift"
    default_loss = "contrastive"
    uses_tokenizer = False

    def text_fields(self, cfg: ml_collections.ConfigDict) -> dict[str, Field]:
        from jaxclip.data.embedding_store import STORE_DTYPE

        return {"text_emb": Field((cfg.text_encoder.dim,), np.dtype(STORE_DTYPE))}

    def build(self, cfg, tokenizer: Tokenizer | None, rngs: nnx.Rngs) -> nnx.Module:
        del tokenizer
        if cfg.model.embed_dim != cfg.text_encoder.dim:
            raise ConfigError(
                f"LIFT's head maps into the frozen encoder's space: model.embed_dim="
                f"{cfg.model.embed_dim} must equal text_encoder.dim={cfg.text_encoder.dim}."
            )
        return build_lift_model(cfg.model, image_size=cfg.data.image_size, rngs=rngs)

    def caption_features(self, cfg, tokenizer: Tokenizer | None, *, progress: bool = True):
        from jaxclip import caption_embeddings

        del tokenizer
        return pipeline.StoredCaptionEmbedding(
            caption_embeddings.open_for_training(cfg, progress=progress)
        )

    def eval_text_lookup(self, cfg) -> Callable | None:
        from jaxclip import caption_embeddings

        return caption_embeddings.open_eval_texts(cfg)

    def identity(self, cfg, tokenizer: Tokenizer | None) -> dict:
        from jaxclip import frozen_encoder

        return {"text_encoder": frozen_encoder.expected_identity(cfg.text_encoder)}

    def text_and_head_flops(self, cfg, image_width: int) -> tuple[float, float]:
        """No text tower; the head is Linear(width -> E) -> GELU -> Linear(E -> E)."""
        embed = cfg.model.embed_dim
        return 0.0, 2.0 * image_width * embed + 2.0 * embed * embed


KINDS = {kind.name: kind for kind in (ClipKind(), LiftKind())}


def get(cfg: ml_collections.ConfigDict):
    if cfg.model.kind not in KINDS:
        raise ConfigError(f"model.kind={cfg.model.kind!r}; use one of {sorted(KINDS)}.")
    return KINDS[cfg.model.kind]


def batch_fields(cfg: ml_collections.ConfigDict) -> dict[str, Field]:
    """The batch contract of a run: what the loader yields and the train step takes."""
    size = cfg.data.image_size
    return {"image": Field((size, size, 3), np.dtype(np.uint8)), **get(cfg).text_fields(cfg)}


def loss_kind(cfg: ml_collections.ConfigDict) -> str:
    return cfg.loss.kind or get(cfg).default_loss
