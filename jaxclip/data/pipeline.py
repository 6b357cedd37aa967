"""grain input pipelines: per-host shard -> shuffle -> render/tokenize (workers) -> batch.

The loader yields this process's share of the global batch as numpy arrays; `mesh.global_batch`
turns it into global jax.Arrays. Images stay uint8 until they reach the device (4x less
host-to-device traffic); normalization happens inside the jitted step.
"""

from __future__ import annotations

import grain
import ml_collections
import numpy as np

from jaxclip.data import shapes
from jaxclip.data.tokenizer import Tokenizer, shapes_tokenizer


def make_tokenizer(data_cfg: ml_collections.ConfigDict) -> Tokenizer:
    """The configured tokenizer: 'shapes' (built from the shapes vocabulary) or a JSON path."""
    if data_cfg.tokenizer == "shapes":
        return shapes_tokenizer(data_cfg.context_length)
    return Tokenizer.from_file(data_cfg.tokenizer, data_cfg.context_length)


def make_source(data_cfg: ml_collections.ConfigDict, split: str, **overrides):
    """A random-access source for `split` of the configured dataset."""
    if data_cfg.source != "shapes":
        raise ValueError(f"Unknown data source {data_cfg.source!r}; available: 'shapes'.")
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


def train_loader(
    data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, process_batch: int
) -> grain.DataLoader:
    """An endless, shuffled loader of this process's batches (exactly resumable)."""
    source = make_source(data_cfg, "train")
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True),
        shuffle=True,
        num_epochs=None,
        seed=data_cfg.seed,
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[
            TokenizeCaption(tokenizer),
            grain.transforms.Batch(batch_size=process_batch, drop_remainder=True),
        ],
        worker_count=data_cfg.worker_count,
        worker_buffer_size=data_cfg.prefetch,
    )
