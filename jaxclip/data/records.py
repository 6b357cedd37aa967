"""jaxclip's on-disk dataset format: ArrayRecord shards of msgpack records plus a manifest.

A dataset (one split) is a directory:

    manifest.json                     counts, fields, shard list, content hash, label names
    train-00000-of-00004.array_record one msgpack dict per record:
    ...                                 {"key": str, "image": bytes, "captions": [str, ...],
                                         "label": int (optional)}

Shards are written with `group_size:1`, so any record is one seek away: grain can shuffle,
shard per host and resume from an index without reading anything else. A shard is written to a
temporary name and renamed when complete, so a shard file that exists is whole; that is what
makes conversion resumable. The manifest is written last: a directory without one is an
unfinished conversion.

`RecordsSource` never raises on a damaged record: it hands the pipeline a `read_error` so the
record can be skipped and counted rather than ending the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgpack
from array_record.python import array_record_module

FORMAT = "jaxclip-records/1"
MANIFEST = "manifest.json"
FIELDS = ("key", "image", "captions", "label")
_WRITER_OPTIONS = "group_size:1"
_READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"


class DatasetError(ValueError):
    """A dataset directory is missing, unfinished, or does not match its manifest."""


class RecordError(ValueError):
    """One record cannot be decoded (bad msgpack, missing or mistyped field)."""


# --- Records ------------------------------------------------------------------------------


def encode_record(
    key: str, image: bytes, captions: Sequence[str], label: int | None = None
) -> bytes:
    record = {"key": str(key), "image": bytes(image), "captions": [str(c) for c in captions]}
    if label is not None:
        record["label"] = int(label)
    return msgpack.packb(record, use_bin_type=True)


def decode_record(raw: bytes) -> dict:
    """The record as a dict; RecordError says which field is wrong."""
    try:
        record = msgpack.unpackb(raw, raw=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise RecordError(f"not a msgpack record ({type(e).__name__}: {e})") from e
    if not isinstance(record, dict):
        raise RecordError(f"expected a msgpack map, got {type(record).__name__}")
    missing = [f for f in ("key", "image", "captions") if f not in record]
    if missing:
        raise RecordError(f"missing field(s) {missing}")
    if not isinstance(record["image"], bytes):
        raise RecordError(f"'image' must be bytes, got {type(record['image']).__name__}")
    captions = record["captions"]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise RecordError("'captions' must be a list of strings")
    return record


# --- Writing ------------------------------------------------------------------------------


def shard_name(prefix: str, index: int, num_shards: int) -> str:
    return f"{prefix}-{index:05d}-of-{num_shards:05d}.array_record"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass
class ShardInfo:
    file: str
    count: int
    sha256: str


def write_shard(path: str | os.PathLike, records: Iterable[bytes]) -> ShardInfo:
    """Writes encoded records to `path` atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = array_record_module.ArrayRecordWriter(str(tmp), _WRITER_OPTIONS)
    count = 0
    try:
        for raw in records:
            writer.write(raw)
            count += 1
    finally:
        writer.close()
    os.replace(tmp, path)
    return ShardInfo(file=path.name, count=count, sha256=file_sha256(path))


def write_manifest(
    directory: str | os.PathLike,
    shards: Sequence[ShardInfo],
    *,
    name: str,
    label_names: Sequence[str] | None = None,
    extra: dict | None = None,
) -> dict:
    """Writes manifest.json last, completing the dataset. Returns the manifest."""
    shards = sorted(shards, key=lambda s: s.file)
    content = hashlib.sha256("".join(s.sha256 for s in shards).encode()).hexdigest()
    manifest = {
        "format": FORMAT,
        "name": name,
        "count": sum(s.count for s in shards),
        "fields": list(FIELDS if label_names is not None else FIELDS[:3]),
        "shards": [dataclasses.asdict(s) for s in shards],
        "content_hash": content,
        "label_names": list(label_names) if label_names is not None else None,
        **(extra or {}),
    }
    path = Path(directory) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)
    return manifest


def write_dataset(
    directory: str | os.PathLike,
    records: Sequence[bytes],
    *,
    name: str,
    num_shards: int = 1,
    label_names: Sequence[str] | None = None,
    prefix: str = "data",
) -> dict:
    """Writes already-encoded records into `num_shards` shards plus the manifest (small data,
    tests and fixtures; launch/prepare_data.py is the converter for real sources)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bounds = [len(records) * i // num_shards for i in range(num_shards + 1)]
    shards = [
        write_shard(
            directory / shard_name(prefix, i, num_shards), records[bounds[i] : bounds[i + 1]]
        )
        for i in range(num_shards)
    ]
    return write_manifest(directory, shards, name=name, label_names=label_names)


# --- Reading ------------------------------------------------------------------------------


def load_manifest(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise DatasetError(
            f"Dataset directory {directory} does not exist. Convert your data with "
            f"launch/prepare_data.py (see docs/data.md) and point the config at its output."
        )
    if not path.is_file():
        unfinished = any(directory.glob("*.array_record*"))
        hint = (
            "it holds shards but no manifest: the conversion did not finish; rerun the same "
            "launch/prepare_data.py command to resume it"
            if unfinished
            else "it is not a jaxclip dataset; convert your data with launch/prepare_data.py"
        )
        raise DatasetError(f"No {MANIFEST} in {directory}: {hint}.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); rerun the conversion.") from e
    if manifest.get("format") != FORMAT:
        raise DatasetError(
            f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}; "
            f"reconvert the data with this version of launch/prepare_data.py."
        )
    return manifest


class RecordsSource:
    """A grain random-access source over one converted dataset.

    Item i is a dict {"index", "shard", "position", "raw", "read_error"}: `raw` holds the
    encoded record, or b"" with `read_error` set when the shard cannot be read there (a
    truncated or corrupt file). Decoding happens in the pipeline's workers. Readers open
    lazily per shard and are not pickled, so each grain worker opens its own.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory)
        self.shards = [s["file"] for s in self.manifest["shards"]]
        counts = [int(s["count"]) for s in self.manifest["shards"]]
        missing = [f for f in self.shards if not (self.directory / f).is_file()]
        if missing:
            raise DatasetError(
                f"{len(missing)} shard(s) listed in {self.directory / MANIFEST} are missing, "
                f"e.g. {missing[0]}. Copy the whole dataset directory, or reconvert it."
            )
        self.counts = counts
        self.offsets = [0]
        for c in counts:
            self.offsets.append(self.offsets[-1] + c)
        self._readers: dict[int, array_record_module.ArrayRecordReader | Exception] = {}

    @property
    def label_names(self) -> list[str] | None:
        return self.manifest.get("label_names")

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.directory.name)

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, position inside the shard) of a global record index."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        lo, hi = 0, len(self.shards) - 1
        while lo < hi:  # last shard whose offset <= index
            mid = (lo + hi + 1) // 2
            if self.offsets[mid] <= index:
                lo = mid
            else:
                hi = mid - 1
        return lo, index - self.offsets[lo]

    def _reader(self, shard: int):
        if shard not in self._readers:
            try:
                reader = array_record_module.ArrayRecordReader(
                    str(self.directory / self.shards[shard]), _READER_OPTIONS
                )
                # A truncated file loses its footer index: it opens with fewer records.
                if not reader.ok() or reader.num_records() != self.counts[shard]:
                    raise DatasetError(
                        f"holds {reader.num_records()} readable records, the manifest lists "
                        f"{self.counts[shard]} (truncated or corrupt file)"
                    )
                self._readers[shard] = reader
            except Exception as e:
                self._readers[shard] = e
        return self._readers[shard]

    def __getitem__(self, index) -> dict:
        index = int(index)
        shard, position = self.locate(index)
        item = {
            "index": index,
            "shard": self.shards[shard],
            "position": position,
            "raw": b"",
            "read_error": "",
        }
        reader = self._reader(shard)
        if isinstance(reader, Exception):
            item["read_error"] = f"cannot open shard: {reader}"
            return item
        try:
            item["raw"] = reader.read([position])[0]
        except Exception as e:
            item["read_error"] = f"cannot read record: {e}"
        else:
            if not item["raw"]:
                item["read_error"] = "empty record"
        return item

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = {}
        return state

    def __repr__(self) -> str:
        return f"RecordsSource({str(self.directory)!r}, {len(self)} records)"
