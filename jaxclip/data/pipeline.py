"""The training input pipeline: one path for every source (shapes world, converted records).

    MixtureOrder                 position -> (dataset, record): a new permutation of each
                                 dataset every epoch, datasets interleaved by weight
    GlobalOrderSampler           which positions this process reads, and from which step
    TrainExamples[position]      (in grain's read threads, inside each data worker)
        source.load(record)      decode; a bad record is replaced by a stand-in drawn from
                                 the same dataset, and counted
        caption choice, crop     random choices drawn from the position alone
        caption features         tokens + mask (CLIP) or the stored embedding (LIFT)
    Batch                        this process's rows of one global batch
    BadRecordCounter             main process: totals, warnings, the bad-fraction limit

Every random choice about an example comes from its position in the global order, so the
global batch at step N, its crops, captions and stand-ins are the same whatever the number
of processes and data workers, and a loader started at step N (`start_batch`) continues a
run exactly. Images leave as uint8 at the training size; normalization runs on device.

Which caption features a batch carries is the model kind's choice (`jaxclip/model_kinds.py`
passes one of `TokenizedCaption`, `StoredCaptionEmbedding`); this module never asks which
kind of model trains.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence

import grain
import ml_collections
import numpy as np

from jaxclip.clip_tokenizer import clip_tokenizer
from jaxclip.data import bad_records, images, shapes
from jaxclip.data.global_order import GlobalOrderSampler, MixtureOrder
from jaxclip.data.sources import BadRecord, ExampleSource, training_sources
from jaxclip.tokenizer import Tokenizer

# Stand-ins tried for one bad record before the dataset is judged unusable.
MAX_STAND_INS = 32


def make_tokenizer(data_cfg: ml_collections.ConfigDict) -> Tokenizer:
    """The configured tokenizer: 'shapes' (from the shapes vocabulary), 'clip' or a JSON path."""
    if data_cfg.tokenizer == "shapes":
        return shapes.shapes_tokenizer(data_cfg.context_length)
    if data_cfg.tokenizer == "clip":
        return clip_tokenizer(data_cfg.context_length)
    return Tokenizer.from_file(data_cfg.tokenizer, data_cfg.context_length)


@dataclasses.dataclass(frozen=True)
class CaptionRef:
    """The caption an example trains with: where it comes from, and its text."""

    dataset: int  # position in the configured mixture
    record: int  # index inside that dataset
    index: int  # which of the record's usable captions
    count: int  # how many usable captions the record has
    text: str


CaptionFeatures = Callable[[CaptionRef], dict[str, np.ndarray]]


class TokenizedCaption:
    """CLIP: the caption's tokens and mask."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, caption: CaptionRef) -> dict[str, np.ndarray]:
        tokens, mask = self.tokenizer([caption.text])
        return {"tokens": tokens[0], "mask": mask[0]}


class StoredCaptionEmbedding:
    """LIFT: the frozen encoder's embedding of that very caption, from the store.

    `stores[d]` is dataset d's `DatasetEmbeddings` (pickled without its memory maps; each
    worker maps the files itself).
    """

    def __init__(self, stores: Sequence):
        self.stores = list(stores)

    def __call__(self, caption: CaptionRef) -> dict[str, np.ndarray]:
        row = self.stores[caption.dataset].lookup(caption.record, caption.index, caption.count)
        return {"text_emb": row}


class TrainExamples:
    """A grain data source indexed by position in the global order (an endless stream)."""

    def __init__(
        self,
        sources: Sequence[ExampleSource],
        weights: Sequence[float],
        data_cfg: ml_collections.ConfigDict,
        caption_features: CaptionFeatures,
    ):
        self.sources = list(sources)
        self.order = MixtureOrder([len(s) for s in self.sources], list(weights), data_cfg.seed)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources]).tolist()
        self.seed = int(data_cfg.seed)
        self.image_size = int(data_cfg.image_size)
        self.crop_scale = tuple(data_cfg.augment.crop_scale)
        self.crop_ratio = tuple(data_cfg.augment.crop_ratio)
        self.flip = bool(data_cfg.augment.flip)
        self.random_caption = data_cfg.caption == "random"
        self.caption_features = caption_features

    def __len__(self) -> int:
        return sys.maxsize  # positions never wrap around: epochs are in the order itself

    def _load(self, dataset: int, record: int, rng: np.random.Generator):
        """The record, or the first usable stand-in; and the bad records passed on the way."""
        source, passed = self.sources[dataset], []
        for _ in range(MAX_STAND_INS + 1):
            try:
                return record, source.load(record), passed
            except BadRecord as e:
                passed.append(f"{e.where}: {e.reason}")
                record = int(rng.integers(len(source)))
        raise bad_records.BadDataError(
            f"{source.name}: {len(passed)} records in a row could not be used, e.g. "
            f"{passed[0]}. Reconvert the dataset with launch/prepare_data.py (docs/data.md)."
        )

    def __getitem__(self, position: int) -> dict[str, np.ndarray]:
        position = int(position)
        rng = np.random.Generator(np.random.Philox(key=self.seed + position))
        dataset, record = self.order[position]
        record, loaded, passed = self._load(dataset, record, rng)
        # The documented order of draws: caption, then crop box, then flip.
        pick = int(rng.integers(len(loaded.captions))) if self.random_caption else 0
        if self.sources[dataset].augment:
            image = images.random_resized_crop(
                loaded.image,
                self.image_size,
                rng,
                scale=self.crop_scale,
                ratio=self.crop_ratio,
                flip=self.flip,
            )
        else:
            image = np.asarray(loaded.image, np.uint8)
        caption = CaptionRef(dataset, record, pick, len(loaded.captions), loaded.captions[pick])
        return {
            "image": image,
            **self.caption_features(caption),
            # Which record was trained on, numbered across the mixture: data order is
            # checked and logged with it.
            "index": np.int64(self.offsets[dataset] + record),
            "bad": np.int32(len(passed)),
            "bad_reason": passed[0] if passed else "",
        }

    def __repr__(self) -> str:
        return f"TrainExamples({self.order!r}, {[repr(s) for s in self.sources]})"


def train_loader(
    data_cfg: ml_collections.ConfigDict,
    caption_features: CaptionFeatures,
    process_batch: int,
    *,
    start_batch: int = 0,
    totals: dict[str, int] | None = None,
    sources: Sequence[tuple[ExampleSource, float]] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> bad_records.BadRecordCounter:
    """This process's endless batches from global batch `start_batch` on.

    `totals` carries the bad-record totals of the steps already trained (a resume);
    `sources` defaults to the configured ones; tests pass `process_index`/`process_count`
    to play several hosts in one process.
    """
    sources = training_sources(data_cfg) if sources is None else sources
    examples = TrainExamples(
        [s for s, _ in sources], [w for _, w in sources], data_cfg, caption_features
    )
    sampler = GlobalOrderSampler(
        process_batch=process_batch,
        worker_count=data_cfg.worker_count,
        start_batch=start_batch,
        process_index=process_index,
        process_count=process_count,
    )
    threads = int(data_cfg.read_threads)
    loader = grain.DataLoader(
        data_source=examples,
        sampler=sampler,
        operations=[grain.transforms.Batch(batch_size=process_batch, drop_remainder=True)],
        worker_count=data_cfg.worker_count,
        worker_buffer_size=data_cfg.prefetch,
        shard_options=sampler.shard_options,
        read_options=grain.ReadOptions(
            num_threads=threads, prefetch_buffer_size=max(16, 4 * threads)
        ),
    )
    limit = bad_records.BadRecordLimit(data_cfg.max_bad_fraction, data_cfg.bad_fraction_min_records)
    return bad_records.BadRecordCounter(iter(loader), limit, totals)
