"""grain input pipelines: global shuffle -> this host's rows -> render/tokenize (workers) -> batch.

The loader yields this process's share of the global batch as numpy arrays; `mesh.global_batch`
turns it into global jax.Arrays. Images stay uint8 until they reach the device (4x less
host-to-device traffic); normalization happens inside the jitted step.
"""

from __future__ import annotations

import grain
import ml_collections
import numpy as np

from jaxclip.clip_tokenizer import clip_tokenizer
from jaxclip.data import shapes
from jaxclip.data.global_order import GlobalOrderLoader, GlobalOrderSampler
from jaxclip.tokenizer import Tokenizer


def make_tokenizer(data_cfg: ml_collections.ConfigDict) -> Tokenizer:
    """The configured tokenizer: 'shapes' (built from the shapes vocabulary) or a JSON path."""
    if data_cfg.tokenizer == "shapes":
        return shapes.shapes_tokenizer(data_cfg.context_length)
    if data_cfg.tokenizer == "clip":
        return clip_tokenizer(data_cfg.context_length)
    return Tokenizer.from_file(data_cfg.tokenizer, data_cfg.context_length)


RECORDS_WITHOUT_LIFT = (
    "LIFT (model.kind='lift') trains from the shapes world only for now: its caption-embedding "
    "store is keyed by shapes-world index. Train CLIP (model.kind='clip') on converted "
    "datasets, or use data.source='shapes' for LIFT."
)


def make_source(data_cfg: ml_collections.ConfigDict, split: str, **overrides):
    """A random-access source for `split` of the configured dataset."""
    if data_cfg.source == "records":
        raise ValueError(
            "The shapes world was asked for, but data.source='records'. The shapes-world "
            "evaluators (eval.tasks such as zeroshot_shape or retrieval) need the shapes world: "
            "with converted data, list real-dataset evaluators in eval.tasks, or none "
            "(--config.eval.tasks='()'). " + RECORDS_WITHOUT_LIFT
        )
    if data_cfg.source != "shapes":
        raise ValueError(
            f"Unknown data source {data_cfg.source!r}; available: 'shapes', 'records'."
        )
    world = data_cfg.shapes
    kwargs = dict(
        split=split,
        num_examples=world.num_train if split == "train" else world.num_eval,
        image_size=data_cfg.image_size,
        seed=data_cfg.seed,
        max_objects=world.max_objects,
        caption_style=world.caption_style,
        noise_prob=world.noise_prob if split == "train" else 0.0,
    )
    kwargs.update(overrides)
    return shapes.ShapesWorld(**kwargs)


class TokenizeCaption(grain.transforms.Map):
    """Keeps the numeric fields a train step needs and tokenizes the caption."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def map(self, example: dict) -> dict:
        tokens, mask = self.tokenizer([example["caption"]])
        return {
            "image": example["image"],
            "tokens": tokens[0],
            "mask": mask[0],
            # The source index, so data order can be checked and logged.
            "index": np.int64(int(example["key"].rsplit("/", 1)[-1])),
        }


class AttachTextEmbedding(grain.transforms.Map):
    """LIFT: the caption's stored embedding from the frozen encoder replaces tokenization."""

    def __init__(self, store):
        self.store = store  # pickled without its memory maps; reopened in each worker

    def map(self, example: dict) -> dict:
        index = int(example["key"].rsplit("/", 1)[-1])
        return {
            "image": example["image"],
            "text_emb": self.store.lookup(np.array([index]))[0],
            "index": np.int64(index),
        }


def train_loader(
    data_cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    process_batch: int,
    text_store=None,
) -> grain.DataLoader:
    """An endless, shuffled loader of this process's batches (exactly resumable).

    With `text_store` (LIFT), batches carry `text_emb` from the store instead of tokens.
    Converted datasets (`data.source="records"`) go through `record_pipeline`.
    """
    if data_cfg.source == "records":
        if text_store is not None:
            raise ValueError(RECORDS_WITHOUT_LIFT)
        from jaxclip.data import record_pipeline

        return record_pipeline.train_loader(data_cfg, tokenizer, process_batch)
    source = make_source(data_cfg, "train")
    if text_store is not None and len(text_store) < len(source):
        raise ValueError(
            f"The embedding store covers {len(text_store)} examples but the source has "
            f"{len(source)}; rebuild it with launch/embed_text.py."
        )
    text_op = TokenizeCaption(tokenizer) if text_store is None else AttachTextEmbedding(text_store)
    # One global shuffled order; each process reads its rows of every global batch, so the
    # batches are the same whatever the number of processes and data workers.
    sampler = GlobalOrderSampler(
        len(source),
        seed=data_cfg.seed,
        process_batch=process_batch,
        worker_count=data_cfg.worker_count,
    )
    return GlobalOrderLoader(
        data_source=source,
        sampler=sampler,
        operations=[
            text_op,
            grain.transforms.Batch(batch_size=process_batch, drop_remainder=True),
        ],
        worker_buffer_size=data_cfg.prefetch,
    )
