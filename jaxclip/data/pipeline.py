"""The training input pipeline: one path for every source (shapes world, converted records).

    MixtureOrder                 position -> (dataset, record): a new permutation of each
                                 dataset every epoch, datasets interleaved by weight
    GlobalOrderSampler           which block of a global batch this process reads next
    TrainBatches[block]          one grain element: the block's rows built whole inside a
                                 data worker (`data.read_threads` threads) into one reused
                                 array, then written into shared memory in one call
      TrainExamples[position]    one row:
        source.load(record)      decode; a bad record is replaced by a stand-in drawn from
                                 the same dataset, and counted
        caption choice, crop     random choices drawn from the position alone
        caption features         tokens + mask (CLIP) or the stored embedding (LIFT)
    BadRecordCounter             main process: totals, warnings, the bad-fraction limit

A grain element is a whole batch rather than an example: with one element per example,
grain's per-element bookkeeping, the stacking of rows and the page faults of writing each
batch through a fresh shared-memory mapping cost the pipeline a third of a bare decode-and-
crop loop's throughput (docs/PERFORMANCE.md, "Input pipeline for converted data").

Every random choice about an example comes from its position in the global order, so the
global batch at step N, its crops, captions and stand-ins are the same whatever the number
of processes and data workers, and a loader started at step N (`start_batch`) continues a
run exactly. Images leave as uint8 at the training size; normalization runs on device.

Which caption features a batch carries is the model kind's choice (`jaxclip/model_kinds.py`
passes one of `TokenizedCaption`, `StoredCaptionEmbedding`); this module never asks which
kind of model trains.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
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


# A batch's captions -> its caption fields, one row per caption.
CaptionFeatures = Callable[[Sequence[CaptionRef]], dict[str, np.ndarray]]


class TokenizedCaption:
    """CLIP: the captions' tokens and masks (one tokenizer call per batch)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, captions: Sequence[CaptionRef]) -> dict[str, np.ndarray]:
        tokens, mask = self.tokenizer([c.text for c in captions])
        return {"tokens": tokens, "mask": mask}


class StoredCaptionEmbedding:
    """LIFT: the frozen encoder's embedding of each very caption, from the store.

    `stores[d]` is dataset d's `DatasetEmbeddings` (pickled without its memory maps; each
    worker maps the files itself).
    """

    def __init__(self, stores: Sequence):
        self.stores = list(stores)

    def __call__(self, captions: Sequence[CaptionRef]) -> dict[str, np.ndarray]:
        rows = [self.stores[c.dataset].lookup(c.record, c.index, c.count) for c in captions]
        return {"text_emb": np.stack(rows)}


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

    def _row(self, dataset: int, record: int, rng: np.random.Generator):
        """One example's image and caption, and the bad records passed to reach it."""
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
        return image, caption, passed

    def batch(self, positions: Sequence[int], allocate=np.empty, map_rows=map) -> dict:
        """The examples at `positions`, as one batch.

        In three passes: the order and each position's generator for every row, then the
        rows' images (through `map_rows`, e.g. a thread pool's map), each written into one
        array from `allocate(shape, dtype)`, then the caption features of all rows in one
        call. Per-example Python work done between decodes runs several times slower (the
        decode and resize leave the caches cold), which is why it is gathered into the
        first and last passes.
        """
        plan = [
            (*self.order[int(p)], np.random.Generator(np.random.Philox(key=self.seed + int(p))))
            for p in positions
        ]
        first_image, *first = self._row(*plan[0])
        out = allocate((len(plan), *first_image.shape), first_image.dtype)
        out[0] = first_image

        def row(i: int):
            image, caption, passed = self._row(*plan[i])
            out[i] = image
            return caption, passed

        rows = [tuple(first), *map_rows(row, range(1, len(plan)))]
        captions = [caption for caption, _ in rows]
        return {
            "image": out,
            **self.caption_features(captions),
            # Which record was trained on, numbered across the mixture: data order is
            # checked and logged with it.
            "index": np.array([self.offsets[c.dataset] + c.record for c in captions], np.int64),
            "bad": np.array([len(passed) for _, passed in rows], np.int32),
            "bad_reason": np.array([passed[0] if passed else "" for _, passed in rows]),
        }

    def __getitem__(self, position: int) -> dict[str, np.ndarray]:
        """One example (a batch of one, unbatched)."""
        return {name: value[0] for name, value in self.batch([position]).items()}

    def __repr__(self) -> str:
        return f"TrainExamples({self.order!r}, {[repr(s) for s in self.sources]})"


# Arrays of a batch at least this large leave a data worker through `_shared_copy`.
_SHARED_COPY_MIN_BYTES = 1 << 16


def _shared_copy(array: np.ndarray) -> np.ndarray:
    """`array` copied into a new shared-memory block, which grain passes to the main process
    by name.

    The copy is written through the block's file (Linux: /dev/shm) in one call, so the
    kernel fills the fresh pages itself; writing through the mapping instead takes a page
    fault every 4 KiB, about twice the cost (docs/PERFORMANCE.md). Elsewhere it is copied
    through the mapping.
    """
    out = grain.multiprocessing.SharedMemoryArray(array.shape, array.dtype)
    try:
        fd = os.open(f"/dev/shm/{out.shm.name.lstrip('/')}", os.O_WRONLY)
    except OSError:
        np.copyto(out, array)
        return out
    try:
        data, done = memoryview(np.ascontiguousarray(array)).cast("B"), 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], done)
    except BaseException:
        out.unlink_on_del()  # nothing will map it: freed with the array
        raise
    finally:
        os.close(fd)
    return out


class TrainBatches:
    """A grain data source whose element `block` is one process's rows of one global batch:
    positions [block * rows, (block + 1) * rows) of the global order, as one batch.

    `shared_memory` (in a data worker process): the rows are built in one reused staging
    array, then the batch's large arrays are copied into shared memory, which grain hands to
    the main process without another copy. `threads` > 0 builds the rows in that many
    threads (decoding and resizing release the GIL).
    """

    def __init__(
        self, examples: TrainExamples, rows: int, *, threads: int = 0, shared_memory: bool = False
    ):
        self.examples, self.rows = examples, int(rows)
        self.threads, self.shared_memory = int(threads), bool(shared_memory)
        self._pool = self._staging = None

    def __len__(self) -> int:
        return sys.maxsize

    def __getstate__(self):
        # Each worker process starts its own threads and staging array.
        return {**self.__dict__, "_pool": None, "_staging": None}

    def _map(self, fn, items) -> list:
        if self.threads <= 0:
            return list(map(fn, items))
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.threads, thread_name_prefix="jaxclip-rows"
            )
        return list(self._pool.map(fn, items))

    def _allocate(self, shape, dtype) -> np.ndarray:
        if not self.shared_memory:  # the batch itself is handed out: a new array each time
            return np.empty(shape, dtype)
        if self._staging is None or self._staging.shape != shape or self._staging.dtype != dtype:
            self._staging = np.empty(shape, dtype)
        return self._staging  # copied out before the next batch reuses it

    def __getitem__(self, block: int) -> dict[str, np.ndarray]:
        start = int(block) * self.rows
        batch = self.examples.batch(range(start, start + self.rows), self._allocate, self._map)
        if self.shared_memory:
            for name, value in batch.items():
                if value.nbytes >= _SHARED_COPY_MIN_BYTES and not value.dtype.hasobject:
                    batch[name] = _shared_copy(value)
        return batch

    def __repr__(self) -> str:
        return f"TrainBatches({self.rows} rows of {self.examples!r})"


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
        start_batch=start_batch,
        process_index=process_index,
        process_count=process_count,
    )
    batches = TrainBatches(
        examples,
        process_batch,
        threads=data_cfg.read_threads,
        shared_memory=data_cfg.worker_count > 0,
    )
    loader = grain.DataLoader(
        data_source=batches,
        sampler=sampler,
        worker_count=data_cfg.worker_count,
        worker_buffer_size=data_cfg.prefetch,
        shard_options=sampler.shard_options,
        # One element is a whole batch, built by TrainBatches' own threads: grain reads it
        # in the worker's thread.
        read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0),
    )
    limit = bad_records.BadRecordLimit(data_cfg.max_bad_fraction, data_cfg.bad_fraction_min_records)
    return bad_records.BadRecordCounter(iter(loader), limit, totals)
