"""Training input from converted datasets (`data.source = "records"`), exactly resumable.

Per host, with grain's Dataset API:

    RecordsSource(dir)                  one converted dataset: random access to raw records
      [host's range]                    per-host sharding: a contiguous range per process
      .shuffle(seed).repeat()           a new permutation every epoch
    MapDataset.mix(datasets, weights)   several datasets, interleaved in the given proportions
      .random_map(DecodeExample)        decode (PIL, JPEG draft), random-resized crop, flip,
                                        one caption, tokenize; a bad record becomes a marker
      .to_iter_dataset(read threads)
    BatchGoodRecords                    skips and counts markers, batches good examples
      .mp_prefetch(worker processes)    each worker: an interleaved slice of the stream
    TotalBadRecords                     main process: totals, warnings, bad-fraction limit

Determinism: every random choice about an example (its crop, flip and caption) comes from
the rng `random_map` derives from (seed, host, position in the stream). The position counts
epochs, so a record gets a new crop and caption each epoch, and the same ones after a
resume. The iterator state (grain's positions plus the bad-record counters) is what the
checkpointer saves. A resume needs the same `data.worker_count`: each worker batches its
own slice of the stream.

Images leave as uint8 at the training size; CLIP normalization runs on device, inside the
train step.
"""

from __future__ import annotations

import dataclasses
import math

import grain
import ml_collections
import numpy as np

from jaxclip.config import ConfigError
from jaxclip.data import bad_records, images, records
from jaxclip.tokenizer import Tokenizer

CAPTION_MODES = ("random", "first")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One converted dataset in a (possibly one-element) mixture."""

    directory: str
    weight: float = 1.0


def parse_paths(paths: str) -> list[DatasetSpec]:
    """`data.records.paths` -> specs: comma-separated directories, each optionally `:weight`.

    "/data/cc3m" is one dataset; "/data/cc3m:0.7,/data/cc12m:0.3" a mixture drawing 70 % of
    the examples from cc3m. A suffix that is not a number stays part of the path, so URLs
    such as gs://bucket/dir keep their colon.
    """
    entries = [p.strip() for p in str(paths).split(",") if p.strip()]
    if not entries:
        raise ConfigError(
            "data.source='records' needs data.records.paths: one converted dataset directory "
            "(--config.data.records.paths=/data/cc3m) or a weighted mixture "
            "(--config.data.records.paths=/data/cc3m:0.7,/data/cc12m:0.3). Convert data "
            "with launch/prepare_data.py (docs/data.md)."
        )
    specs = []
    for entry in entries:
        directory, sep, tail = entry.rpartition(":")
        try:
            weight = float(tail) if sep else None
        except ValueError:
            weight = None
        if weight is None:
            specs.append(DatasetSpec(entry))
            continue
        if not math.isfinite(weight) or weight <= 0:
            raise ConfigError(
                f"data.records.paths entry {entry!r} has weight {tail}; weights must be "
                f"positive numbers (they are normalized to sum to 1), e.g. {directory}:0.5."
            )
        specs.append(DatasetSpec(directory, weight))
    return specs


def check_config(data_cfg: ml_collections.ConfigDict) -> list[DatasetSpec]:
    """Validates the records settings; returns the dataset specs."""
    specs = parse_paths(data_cfg.records.paths)
    if data_cfg.records.caption not in CAPTION_MODES:
        raise ConfigError(
            f"data.records.caption={data_cfg.records.caption!r}; use one of {CAPTION_MODES}: "
            f"'random' draws one of a record's captions per epoch, 'first' always uses the first."
        )
    lo, hi = data_cfg.augment.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(
            f"data.augment.crop_scale={(lo, hi)} must satisfy 0 < min <= max <= 1 (fractions "
            f"of the image area), e.g. (0.9, 1.0)."
        )
    lo, hi = data_cfg.augment.crop_ratio
    if not 0 < lo <= hi:
        raise ConfigError(
            f"data.augment.crop_ratio={(lo, hi)} must satisfy 0 < min <= max (width/height), "
            f"e.g. (0.75, 1.3333)."
        )
    if not 0 <= data_cfg.max_bad_fraction <= 1:
        raise ConfigError(
            f"data.max_bad_fraction={data_cfg.max_bad_fraction} must be in [0, 1] "
            f"(0 stops at the first bad record once data.bad_fraction_min_records are read)."
        )
    if data_cfg.max_image_pixels <= 0 or data_cfg.records.read_threads < 0:
        raise ConfigError(
            "data.max_image_pixels must be positive and data.records.read_threads >= 0."
        )
    return specs


class TagRecord(grain.transforms.Map):
    """Adds which dataset a raw record came from, for messages and a global `index`."""

    def __init__(self, directory: str, index_offset: int):
        self.directory = directory
        self.index_offset = index_offset

    def map(self, item: dict) -> dict:
        return dict(item, directory=self.directory, index_offset=self.index_offset)


class DecodeExample(grain.transforms.RandomMap):
    """Raw record -> training example {image, tokens, mask, index}, or a bad-record marker.

    The rng is grain's per-element generator: crop, flip and caption are reproducible.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_size: int,
        *,
        crop_scale: tuple[float, float],
        crop_ratio: tuple[float, float],
        flip: bool,
        caption: str,
        max_pixels: int,
    ):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.crop_scale = tuple(crop_scale)
        self.crop_ratio = tuple(crop_ratio)
        self.flip = flip
        self.caption = caption
        self.max_pixels = max_pixels
        # Let JPEG decode at 1/2, 1/4, 1/8 scale only while the smallest crop keeps full detail.
        self.draft_side = math.ceil(image_size / math.sqrt(self.crop_scale[0]))

    def random_map(self, item: dict, rng: np.random.Generator) -> dict:
        where = (
            f"{item['directory']}/{item['shard']} record {item['position']} (index {item['index']})"
        )
        if item["read_error"]:
            return bad_records.bad_marker(item["read_error"], where)
        try:
            record = records.decode_record(item["raw"])
        except records.RecordError as e:
            return bad_records.bad_marker(f"bad record: {e}", where)
        captions = [c for c in record["captions"] if c.strip()]
        if not captions:
            return bad_records.bad_marker("no non-empty caption", where)
        pick = int(rng.integers(len(captions))) if self.caption == "random" else 0
        try:
            image = images.decode_image(
                record["image"],
                max_pixels=self.max_pixels,
                draft_size=(self.draft_side, self.draft_side),
            )
        except images.ImageError as e:
            return bad_records.bad_marker(str(e), where)
        pixels = images.random_resized_crop(
            image,
            self.image_size,
            rng,
            scale=self.crop_scale,
            ratio=self.crop_ratio,
            flip=self.flip,
        )
        tokens, mask = self.tokenizer([captions[pick]])
        return {
            "image": pixels,
            "tokens": tokens[0],
            "mask": mask[0],
            "index": np.int64(item["index_offset"] + item["index"]),
        }


def _seed(*parts: int) -> int:
    """A 32-bit seed mixing the config seed with a host and a stage, for grain transforms."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def host_range(num_records: int, shard: grain.sharding.ShardOptions) -> tuple[int, int]:
    """[start, end) of the records this host reads: a contiguous, disjoint range."""
    if shard.drop_remainder:
        per_host = num_records // shard.shard_count
        return shard.shard_index * per_host, (shard.shard_index + 1) * per_host
    return (
        num_records * shard.shard_index // shard.shard_count,
        num_records * (shard.shard_index + 1) // shard.shard_count,
    )


def example_stream(
    data_cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    shard: grain.sharding.ShardOptions,
) -> grain.MapDataset:
    """This host's endless stream of decoded examples and bad-record markers (one mixture)."""
    specs = check_config(data_cfg)
    streams, offset = [], 0
    for number, spec in enumerate(specs):
        source = records.RecordsSource(spec.directory)
        start, end = host_range(len(source), shard)
        if end <= start:
            raise records.DatasetError(
                f"{spec.directory} has {len(source)} records: too few to give each of the "
                f"{shard.shard_count} processes at least one. Use a larger dataset or fewer "
                f"processes."
            )
        stream = (
            grain.MapDataset.source(source)[start:end]
            .map(TagRecord(spec.directory, offset))
            .shuffle(seed=_seed(data_cfg.seed, shard.shard_index, number))
            .repeat()
        )
        streams.append(stream)
        offset += len(source)
    weights = [s.weight for s in specs]
    mixed = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights)
    decode = DecodeExample(
        tokenizer,
        data_cfg.image_size,
        crop_scale=data_cfg.augment.crop_scale,
        crop_ratio=data_cfg.augment.crop_ratio,
        flip=data_cfg.augment.flip,
        caption=data_cfg.records.caption,
        max_pixels=data_cfg.max_image_pixels,
    )
    return mixed.random_map(decode, seed=_seed(data_cfg.seed, shard.shard_index, 1 << 20))


def train_loader(
    data_cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    process_batch: int,
    shard: grain.sharding.ShardOptions | None = None,
) -> grain.IterDataset:
    """This process's endless batches {image, tokens, mask, index, data_stats}.

    `shard` defaults to this JAX process's share; tests pass explicit ShardOptions to play
    several hosts. Iterate it once (`iter(loader)`) and checkpoint that iterator.
    """
    shard = shard or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    limit = bad_records.BadRecordLimit(data_cfg.max_bad_fraction, data_cfg.bad_fraction_min_records)
    threads = data_cfg.records.read_threads
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(16, 4 * threads))
    batches = bad_records.BatchGoodRecords(
        example_stream(data_cfg, tokenizer, shard).to_iter_dataset(read), process_batch, limit
    )
    workers = grain.MultiprocessingOptions(
        num_workers=data_cfg.worker_count, per_worker_buffer_size=data_cfg.prefetch
    )
    batches = batches.mp_prefetch(workers, worker_init_fn=bad_records.remember_worker)
    return bad_records.TotalBadRecords(batches, limit, data_cfg.worker_count)
