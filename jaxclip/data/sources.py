"""Training sources: every dataset a run can train on, behind one small interface.

A source is random access over examples `0 .. len-1`:

    source.load(i)       -> Loaded(image, captions)   or raises BadRecord(reason, where)
    source.captions(i)   -> the usable captions of i (no image work; the store builder's view)
    source.identity      -> what the data order and stored caption embeddings depend on,
                            including a content hash (a reconverted dataset has another)
    source.shard_bounds  -> (start, count) blocks: the dataset's own shards, which the
                            caption-embedding store mirrors
    source.augment       -> whether the random-resized crop applies

Two kinds exist: the procedural shapes world (`ShapesSource`) and a dataset converted by
launch/prepare_data.py (`RecordsExamples`). The training pipeline (`data/pipeline.py`), the
caption-embedding store and the bad-record accounting see only this interface, so a new
kind of source is one more class here.

A usable caption is a non-blank one; `load` and `captions` apply the same rule, so the
caption index the pipeline draws is also the row of that caption in the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from typing import Protocol

import ml_collections
import numpy as np
from PIL import Image

from jaxclip.config import ConfigError
from jaxclip.data import images, records, shapes

# Captions hashed into the shapes world's content hash: enough to notice a changed caption
# generator without generating every caption.
_SHAPES_HASHED_CAPTIONS = 1024


class BadRecord(Exception):
    """An example that cannot be used; the pipeline replaces and counts it."""

    def __init__(self, reason: str, where: str):
        super().__init__(f"{where}: {reason}")
        self.reason, self.where = reason, where


@dataclasses.dataclass
class Loaded:
    image: np.ndarray | Image.Image  # uint8 HWC at the training size, or a decoded PIL image
    captions: list[str]  # usable captions, at least one


def usable_captions(captions: Sequence[str]) -> list[str]:
    return [c for c in captions if c.strip()]


class ExampleSource(Protocol):
    name: str
    augment: bool

    def __len__(self) -> int: ...
    def load(self, index: int) -> Loaded: ...
    def captions(self, index: int) -> list[str]: ...
    @property
    def identity(self) -> dict: ...
    def shard_bounds(self, default_size: int) -> list[tuple[int, int]]: ...


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class ShapesSource:
    """The shapes world's train split. Images are rendered at the training size and captions
    name positions ("left of"), so no crop or flip is applied."""

    augment = False

    def __init__(self, world: shapes.ShapesWorld):
        self.world = world
        self.name = f"shapes-{world.split}"

    def __len__(self) -> int:
        return len(self.world)

    def load(self, index: int) -> Loaded:
        example = self.world[index]
        return Loaded(example["image"], [example["caption"]])

    def captions(self, index: int) -> list[str]:
        return [self.world.caption(index)]

    @property
    def identity(self) -> dict:
        w = self.world
        description = {
            "split": w.split,
            "num_examples": w.num_examples,
            "seed": w.seed,
            "max_objects": w.max_objects,
            "caption_style": w.caption_style,
            "noise_prob": w.noise_prob,
        }
        sample = [w.caption(i) for i in range(min(len(w), _SHAPES_HASHED_CAPTIONS))]
        return {
            "kind": "shapes",
            "name": self.name,
            "num_examples": len(w),
            "description": description,
            "content_hash": _hash([description, sample]),
        }

    def shard_bounds(self, default_size: int) -> list[tuple[int, int]]:
        n, size = len(self), max(1, int(default_size))
        return [(s, min(size, n - s)) for s in range(0, n, size)]


class RecordsExamples:
    """A converted dataset: decodes a record's msgpack and image (guarded, JPEG draft)."""

    augment = True

    def __init__(self, directory: str, *, max_pixels: int, draft_side: int):
        self.records = records.RecordsSource(directory)
        self.directory = str(directory)
        self.name = self.records.name
        self.max_pixels = max_pixels
        self.draft_side = draft_side

    def __len__(self) -> int:
        return len(self.records)

    def _record(self, index: int) -> tuple[dict, str]:
        item = self.records[index]
        where = f"{self.directory}/{item['shard']} record {item['position']} (index {index})"
        if item["read_error"]:
            raise BadRecord(item["read_error"], where)
        try:
            return records.decode_record(item["raw"]), where
        except records.RecordError as e:
            raise BadRecord(f"bad record: {e}", where) from e

    def load(self, index: int) -> Loaded:
        record, where = self._record(index)
        captions = usable_captions(record["captions"])
        if not captions:
            raise BadRecord("no non-empty caption", where)
        try:
            image = images.decode_image(
                record["image"],
                max_pixels=self.max_pixels,
                draft_size=(self.draft_side, self.draft_side),
            )
        except images.ImageError as e:
            raise BadRecord(str(e), where) from e
        return Loaded(image, captions)

    def captions(self, index: int) -> list[str]:
        """Usable captions of `index`; none for a record that cannot be read or decoded."""
        try:
            record, _ = self._record(index)
        except BadRecord:
            return []
        return usable_captions(record["captions"])

    @property
    def identity(self) -> dict:
        manifest = self.records.manifest
        return {
            "kind": "records",
            "name": self.name,
            "num_examples": len(self),
            "path": self.directory,
            "content_hash": manifest["content_hash"],
        }

    def shard_bounds(self, default_size: int) -> list[tuple[int, int]]:
        del default_size  # a converted dataset's own shards
        starts = self.records.offsets
        return [(starts[i], starts[i + 1] - starts[i]) for i in range(len(self.records.shards))]

    def __repr__(self) -> str:
        return f"RecordsExamples({self.directory!r}, {len(self)} records)"


# --- The configured training sources --------------------------------------------------------


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


CAPTION_MODES = ("random", "first")
SOURCES = ("shapes", "records")


def check_config(data_cfg: ml_collections.ConfigDict) -> None:
    """Validates the data settings every source shares, with the fix in each message."""
    if data_cfg.source not in SOURCES:
        raise ConfigError(f"data.source={data_cfg.source!r}; use one of {SOURCES}.")
    if data_cfg.caption not in CAPTION_MODES:
        raise ConfigError(
            f"data.caption={data_cfg.caption!r}; use one of {CAPTION_MODES}: 'random' draws "
            f"one of an example's captions each time it is read, 'first' always uses the first."
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
    if data_cfg.max_image_pixels <= 0 or data_cfg.read_threads < 0:
        raise ConfigError("data.max_image_pixels must be positive and data.read_threads >= 0.")


def shapes_world(data_cfg: ml_collections.ConfigDict, split: str, **overrides):
    """The shapes world's `split` as the data config describes it."""
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


def training_sources(data_cfg: ml_collections.ConfigDict) -> list[tuple[ExampleSource, float]]:
    """(source, mixture weight) of every dataset the run trains on."""
    check_config(data_cfg)
    if data_cfg.source == "shapes":
        return [(ShapesSource(shapes_world(data_cfg, "train")), 1.0)]
    # Let JPEG decode at 1/2, 1/4, 1/8 scale only while the smallest crop keeps full detail.
    draft = math.ceil(data_cfg.image_size / math.sqrt(data_cfg.augment.crop_scale[0]))
    return [
        (
            RecordsExamples(
                spec.directory, max_pixels=int(data_cfg.max_image_pixels), draft_side=draft
            ),
            spec.weight,
        )
        for spec in parse_paths(data_cfg.records.paths)
    ]
