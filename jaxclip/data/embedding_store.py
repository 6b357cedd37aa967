"""Precomputed caption embeddings for LIFT (arXiv 2506.04209): the on-disk store.

LIFT freezes a pretrained text encoder, so every caption's embedding is a constant: it is
computed once, offline (`launch/embed_text.py`), and training reads the row of the very
caption it drew. The store holds every usable caption of every record of every configured
dataset, in shards aligned with the dataset's own shards, plus the texts the evaluators
embed:

    <store>/manifest.json                      written last: encoder, datasets, eval texts
    <store>/eval_texts.npy, eval_texts.json    prompts and captions of the configured eval tasks
    <store>/<name>-<content hash[:12]>/        one directory per dataset version
        manifest.json                          written last: encoder, dataset identity, shards
        captions-00000-of-00004.npy            float16 (captions of the shard's records, dim)
        captions-00000-of-00004.offsets.npy    int64 (records + 1): each record's first row
        captions-00000-of-00004.json           sidecar: marks the shard finished

A dataset's directory is named by its content hash, so a reconverted dataset has none until
it is embedded again, and a mixture finds one directory per dataset. This module only
writes and reads: the embedding function is handed in (`jaxclip/frozen_encoder.py` makes
it), and so are the texts.

Builds are resumable and multi-process: process p embeds shards i with i % P == p; a shard
is finished when its sidecar (written after its arrays, each written atomically) names the
same dataset content hash and encoder, so a resumed build never re-reads finished shards.
Nothing in a store depends on time, so a resumed build is byte-identical to a straight one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging
from tqdm import tqdm

FORMAT = 2
MANIFEST = "manifest.json"
EVAL_TEXTS = "eval_texts.npy"
STORE_DTYPE = "float16"  # half the disk and page cache of float32; plenty for unit vectors
ROOT = Path(__file__).resolve().parent.parent.parent
SHARD_WAIT_TIMEOUT_S = 24 * 3600.0  # how long process 0 waits for the other processes' shards

EmbedFn = Callable[[list[str]], np.ndarray]


class StoreError(RuntimeError):
    """An embedding store that is missing, incomplete, stale or does not match the config."""


def rebuild_command(config_name: str | None, store_dir: str | Path | None = None) -> str:
    cmd = f"python launch/embed_text.py --config {config_name or 'NAME'}"
    return cmd + (f" --store_dir {store_dir}" if store_dir is not None else "")


def default_store_dir(text_encoder_cfg, config_name: str) -> Path:
    """text_encoder.store_dir, or `<repo>/workdirs/embeddings/<config name>`."""
    if text_encoder_cfg.store_dir:
        return Path(text_encoder_cfg.store_dir)
    return ROOT / "workdirs" / "embeddings" / (config_name or "default")


def texts_hash(texts: Sequence[str]) -> str:
    """sha256 over the texts in order, each as utf-8 + b"\\n"."""
    hasher = hashlib.sha256()
    for text in texts:
        hasher.update(text.encode("utf-8") + b"\n")
    return hasher.hexdigest()


def dataset_dirname(identity: dict) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(identity["name"])).strip("_") or "dataset"
    return f"{name}-{identity['content_hash'][:12]}"


def shard_name(index: int, total: int) -> str:
    return f"captions-{index:05d}-of-{total:05d}"


# --- Files ----------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write through `<path>.tmp` + os.replace: a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_npy(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
    _atomic_write(path, lambda f: f.write(data))


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _embed_unique(embed_fn: EmbedFn, texts: Sequence[str], dim: int) -> np.ndarray:
    """float16 (len(texts), dim), embedding each distinct text once (captions repeat a lot)."""
    if not texts:
        return np.zeros((0, dim), STORE_DTYPE)
    unique, inverse = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    rows = np.asarray(embed_fn([str(t) for t in unique]), np.float32)
    if rows.shape != (len(unique), dim):
        raise StoreError(
            f"The text encoder returned shape {rows.shape} for {len(unique)} texts; expected "
            f"({len(unique)}, {dim}). Set text_encoder.dim to the encoder's dimension."
        )
    return rows[inverse.reshape(-1)].astype(STORE_DTYPE)


def _finished(directory: Path, name: str, sidecar: dict, dim: int) -> dict | None:
    """The shard's sidecar if it is finished for this dataset and encoder, else None."""
    found = _read_json(directory / f"{name}.json")
    if not found or any(found.get(k) != v for k, v in sidecar.items()):
        return None
    try:
        rows = np.load(directory / f"{name}.npy", mmap_mode="r")
        offsets = np.load(directory / f"{name}.offsets.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    ok = rows.shape == (found["num_captions"], dim) and len(offsets) == sidecar["record_count"] + 1
    return found if ok and rows.dtype == np.dtype(STORE_DTYPE) else None


# --- Writing --------------------------------------------------------------------------------


def build_dataset(
    store_dir: str | Path,
    source,
    *,
    embed_fn: EmbedFn,
    encoder: dict,
    shard_size: int,
    process_index: int = 0,
    process_count: int = 1,
    progress: bool = True,
) -> Path:
    """Embeds every usable caption of `source` (a `data.sources` source); returns its dir."""
    identity = source.identity
    directory = Path(store_dir) / dataset_dirname(identity)
    directory.mkdir(parents=True, exist_ok=True)
    dim = int(encoder["dim"])
    plan = source.shard_bounds(shard_size)
    names = [shard_name(i, len(plan)) for i in range(len(plan))]
    if process_index == 0:
        (directory / MANIFEST).unlink(missing_ok=True)  # incomplete until rewritten
    bar = tqdm(total=len(source), disable=not progress, unit="record", desc=identity["name"])
    shards, reused = [], 0
    for i, (start, count) in enumerate(plan):
        mine = i % process_count == process_index
        if not mine and process_index != 0:
            continue
        expected = {
            "record_start": start,
            "record_count": count,
            "content_hash": identity["content_hash"],
            "encoder": encoder,
        }
        done = _finished(directory, names[i], expected, dim)
        if done is None and not mine:
            done = _wait_for(directory, names[i], expected, dim, owner=i % process_count)
        elif done is None:
            done = _embed_shard(directory, names[i], source, start, count, embed_fn, expected)
        else:
            reused += 1
        bar.update(count)
        keys = ("record_start", "record_count", "num_captions")
        shards.append({"file": names[i], **{k: done[k] for k in keys}})
    bar.close()
    if reused:
        logging.info("Reused %d finished shard(s) in %s", reused, directory)
    if process_index == 0:
        for debris in directory.glob("*.tmp"):  # every shard is finished: left by a crash
            debris.unlink(missing_ok=True)
        manifest = {
            "format": FORMAT,
            "encoder": encoder,
            "dataset": identity,
            "num_records": len(source),
            "num_captions": sum(s["num_captions"] for s in shards),
            "shards": shards,
            "dtype": STORE_DTYPE,
            "complete": True,
        }
        _write_json(directory / MANIFEST, manifest)
    return directory


def _embed_shard(directory, name, source, start, count, embed_fn, expected) -> dict:
    per_record = [source.captions(i) for i in range(start, start + count)]
    captions = [c for caps in per_record for c in caps]
    offsets = np.cumsum([0] + [len(c) for c in per_record]).astype(np.int64)
    rows = _embed_unique(embed_fn, captions, int(expected["encoder"]["dim"]))
    _write_npy(directory / f"{name}.npy", rows)
    _write_npy(directory / f"{name}.offsets.npy", offsets)
    sidecar = {
        **expected,
        "num_captions": len(captions),
        "captions_sha256": texts_hash(captions),
        "records_without_captions": int(sum(1 for c in per_record if not c)),
    }
    _write_json(directory / f"{name}.json", sidecar)  # last: marks the shard finished
    return sidecar


def _wait_for(directory, name, expected, dim, owner) -> dict:
    deadline, next_log = time.monotonic() + SHARD_WAIT_TIMEOUT_S, time.monotonic()
    while (done := _finished(directory, name, expected, dim)) is None:
        if time.monotonic() > deadline:
            raise StoreError(f"Timed out waiting for {directory / name} from process {owner}.")
        if time.monotonic() >= next_log:
            logging.info("Waiting for %s (embedded by process %d)", name, owner)
            next_log = time.monotonic() + 300
        time.sleep(2.0)
    return done


def write_eval_texts(store_dir: str | Path, texts: Sequence[str], embed_fn: EmbedFn, dim: int):
    """Embeds the evaluators' texts (prompts, retrieval captions): few, so always redone."""
    store_dir = Path(store_dir)
    texts = list(dict.fromkeys(str(t) for t in texts))
    _write_npy(store_dir / EVAL_TEXTS, _embed_unique(embed_fn, texts, dim))
    _write_json(store_dir / "eval_texts.json", texts)
    return {"file": EVAL_TEXTS, "count": len(texts), "sha256": texts_hash(texts)}


def start_build(store_dir: str | Path) -> None:
    """Marks the store unfinished until `write_manifest` (process 0, before embedding)."""
    Path(store_dir).mkdir(parents=True, exist_ok=True)
    (Path(store_dir) / MANIFEST).unlink(missing_ok=True)


def write_manifest(store_dir: str | Path, encoder: dict, datasets: list[Path], eval_entry: dict):
    """The store's manifest, written after every dataset and the eval texts are complete."""
    manifest = {
        "format": FORMAT,
        "encoder": encoder,
        "datasets": sorted(Path(d).name for d in datasets),
        "eval_texts": eval_entry,
        "complete": True,
    }
    _write_json(Path(store_dir) / MANIFEST, manifest)


# --- Reading --------------------------------------------------------------------------------


def check_encoder(found: dict, expected: dict, where: Path, command: str) -> None:
    """Every field of `expected` (from the config) must equal the store's."""
    diffs = [
        f"encoder.{k}: store has {found.get(k)!r}, the config wants {v!r}"
        for k, v in expected.items()
        if found.get(k) != v
    ]
    if diffs:
        raise StoreError(
            f"The embedding store {where} was made with another text encoder:\n  "
            + "\n  ".join(diffs)
            + f"\nRebuild it with `{command}` (plus this run's --config.* overrides)."
        )


class DatasetEmbeddings:
    """One dataset's caption rows, memory-mapped per shard (maps are dropped when pickled,
    so the object travels to grain workers, which map the files themselves)."""

    def __init__(self, directory: Path, manifest: dict):
        self.path = Path(directory)
        self.manifest = manifest
        self.dim = int(manifest["encoder"]["dim"])
        self._starts = np.array([s["record_start"] for s in manifest["shards"]], np.int64)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def open(cls, store_dir: str | Path, identity: dict, encoder: dict, command: str):
        """The complete embeddings of dataset `identity`, or a StoreError saying what to do."""
        store_dir = Path(store_dir)
        directory = store_dir / dataset_dirname(identity)
        manifest = _read_json(directory / MANIFEST)
        if manifest is None or not manifest.get("complete"):
            raise StoreError(_missing_dataset(store_dir, directory, identity, encoder, command))
        if manifest.get("format") != FORMAT:
            raise StoreError(
                f"{directory} has store format {manifest.get('format')}; this code reads "
                f"{FORMAT}. Rebuild it with `{command}`."
            )
        check_encoder(manifest["encoder"], encoder, directory, command)
        return cls(directory, manifest)

    def _shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._maps:
            name = self.manifest["shards"][i]["file"]
            rows = np.load(self.path / f"{name}.npy", mmap_mode="r")
            offsets = np.load(self.path / f"{name}.offsets.npy", mmap_mode="r")
            self._maps[i] = rows, offsets
        return self._maps[i]

    def lookup(self, record: int, caption: int, count: int) -> np.ndarray:
        """float16 (dim,): caption `caption` of `record`, which has `count` usable captions."""
        shard = int(np.searchsorted(self._starts, record, side="right")) - 1
        rows, offsets = self._shard(shard)
        local = record - int(self._starts[shard])
        first, end = int(offsets[local]), int(offsets[local + 1])
        if end - first != count:
            raise StoreError(
                f"Stale embedding store {self.path}: record {record} has {count} usable "
                f"captions but {end - first} stored embeddings; the dataset changed after the "
                f"store was built. Rebuild the store with launch/embed_text.py."
            )
        return np.asarray(rows[first + caption])

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _maps={})


def _missing_dataset(
    store_dir: Path, directory: Path, identity: dict, encoder: dict, command: str
) -> str:
    others = sorted(
        p.name
        for p in store_dir.glob(f"{directory.name[:-13]}-*")
        if p != directory and (p / MANIFEST).is_file()
    )
    what = f"dataset {identity['name']!r} (content hash {identity['content_hash'][:12]})"
    if others:
        why = (
            f"the store holds another version of it ({', '.join(others)}): its content "
            f"changed since the store was built (a reconverted dataset"
        )
        stored = (_read_json(store_dir / others[-1] / MANIFEST) or {}).get("dataset", {})
        old, new = stored.get("description", {}), identity.get("description", {})
        changed = [
            f"{k}: stored {old.get(k)!r}, now {v!r}" for k, v in new.items() if old.get(k) != v
        ]
        why += f"; changed settings: {', '.join(changed)})" if changed else ")"
    elif directory.is_dir():
        why = "its embedding was started but not finished"
    else:
        why = "no embeddings were made for it (a new dataset in the mixture, or no store yet)"
    return (
        f"The embedding store {store_dir} has no complete {encoder['name']} caption "
        f"embeddings for {what}: "
        f"{why}. Build them (finished shards are kept, nothing else is re-embedded):\n"
        f"    {command}"
    )


class EvalTexts:
    """The evaluators' text embeddings, by text."""

    def __init__(self, store_dir: str | Path, encoder: dict, command: str):
        self.path = Path(store_dir)
        self.command = command
        manifest = _read_json(self.path / MANIFEST)
        texts = _read_json(self.path / "eval_texts.json")
        if not manifest or not manifest.get("complete") or texts is None:
            raise StoreError(
                f"The embedding store {self.path} is missing or unfinished (no complete "
                f"manifest.json). Build it (it resumes, keeping finished shards):\n    {command}"
            )
        check_encoder(manifest["encoder"], encoder, self.path, command)
        self._index = {t: i for i, t in enumerate(texts)}
        self._rows: np.ndarray | None = None

    def __contains__(self, text: str) -> bool:
        return text in self._index

    def missing(self, texts: Sequence[str]) -> list[str]:
        return [t for t in dict.fromkeys(texts) if t not in self._index]

    def require(self, texts: Sequence[str]) -> None:
        """Raises StoreError naming the texts the store lacks and the command that adds them."""
        absent = self.missing(texts)
        if absent:
            raise StoreError(
                f"{len(absent)} evaluation text(s) are not in the embedding store {self.path} "
                f"(first {absent[:3]}): the evaluation tasks changed since it was built. "
                f"Rebuild it with the tasks you evaluate (only the evaluation texts are "
                f'embedded again):\n    {self.command} --config.eval.tasks="(...)"'
            )

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (n, dim) of texts embedded when the store was built."""
        self.require(texts)
        if self._rows is None:
            self._rows = np.load(self.path / EVAL_TEXTS)
        return self._rows[[self._index[t] for t in texts]].astype(np.float32)
