"""What every input format hands the shard writer: examples, skips, and a plan of shards.

A source (webdataset tars, an image folder, a TFDS dataset) is a small picklable object:

- `plan(num_shards, records_per_shard)` splits the input deterministically into one task per
  output shard, before anything is read in full (so shards can be written in parallel and a
  rerun knows which ones already exist);
- `read(task)` runs in a worker process and yields, in a fixed order, an `Example` for every
  usable input record and a `Skip` for everything that had to be dropped, with the reason;
- `describe()` is the JSON-able description stored in the manifest and in the fingerprint
  that stops a resumed conversion from mixing shards made with different inputs or options.

Captions are checked and images re-encoded by the writer, the same way for every source.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

# Why a record (or a tar) was skipped. The keys are stored in the manifest's skip report.
SKIP_REASONS: dict[str, str] = {
    "undecodable_image": "the image bytes do not decode (corrupt, truncated or not an image)",
    "decompression_bomb": "the image header declares more pixels than --max_pixels; "
    "refused before decoding",
    "empty_caption": "no non-empty caption",
    "missing_pair_member": "an image without its caption, or a caption without its image",
    "bad_caption_entry": "a caption entry that cannot be parsed (bad JSON or CSV row, not "
    "UTF-8, no path)",
    "truncated_tar": "a tar file that is truncated or damaged: the samples from the damage on "
    "are lost (counted per tar file, not per sample)",
}


class ConversionError(ValueError):
    """The input or the options cannot be converted; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One usable input record, image still in its original encoding."""

    key: str
    image: bytes
    captions: Sequence[str]
    label: int | None = None


@dataclasses.dataclass(frozen=True)
class Skip:
    """One dropped input record (or damaged tar): where it was and why."""

    reason: str  # a key of SKIP_REASONS
    where: str  # sample key, file path or captions-file line
    detail: str = ""

    def __post_init__(self):
        if self.reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {self.reason!r}")


class Source(Protocol):
    kind: str
    has_text: bool  # False for label-only data (class folders, cifar10): no captions needed
    label_names: list[str] | None

    def plan(self, num_shards: int, records_per_shard: int) -> list[Any]: ...

    def read(self, task: Any) -> Iterator[Example | Skip]: ...

    def describe(self) -> dict: ...


def split_evenly(items: Sequence, num_shards: int, records_per_shard: int) -> list[Sequence]:
    """Contiguous, deterministic slices: `num_shards` of them, or (when 0) enough slices of at
    most `records_per_shard` items. Never more slices than items (at least one)."""
    if num_shards < 0 or records_per_shard < 1:
        raise ConversionError(
            f"--num_shards must be >= 0 and --records_per_shard >= 1, got {num_shards} and "
            f"{records_per_shard}"
        )
    if not items:
        raise ConversionError("the input holds no records to convert")
    count = num_shards or -(-len(items) // records_per_shard)
    if count > len(items):
        raise ConversionError(
            f"--num_shards={count} is more than the {len(items)} input records; use fewer shards"
        )
    bounds = [len(items) * i // count for i in range(count + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(count)]
