"""Precomputed caption embeddings for LIFT training (arXiv 2506.04209).

LIFT freezes a pretrained text encoder, so every caption's embedding is a constant: it is
computed ONCE, offline (``launch/embed_text.py``), and training reads rows by example index.

Layout of a store directory::

    manifest.json                     written last; its presence (complete=true) = usable store
    captions-00000-of-00004.npy       float16 (count, dim), rows of examples [start, start+count)
    captions-00000-of-00004.npy.json  sidecar {start, count, captions_sha256, encoder}
    ...
    eval_texts.npy, eval_texts.json   embeddings of every text the evaluators embed

The writer is resumable and multi-process: shards are independent, each array is written
atomically (``*.tmp`` then ``os.replace``) and its sidecar after it, so a shard whose sidecar
is present and matches the captions is finished; anything else is recomputed.

Everything in a store is deterministic (no timestamps), so a resumed build is byte-identical
to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

FORMAT = 1
MANIFEST = "manifest.json"
EVAL_TEXTS = "eval_texts.npy"
STORE_DTYPE = "float16"  # half the disk and page cache of float32; plenty for unit vectors
ROOT = Path(__file__).resolve().parent.parent.parent
# How long process 0 waits for other processes' shards before giving up.
SHARD_WAIT_TIMEOUT_S = 24 * 3600.0
# Fields a manifest's shard entry copies from the shard's sidecar.
SHARD_KEYS = ("start", "count", "captions_sha256")
_SHARD_RE = re.compile(r"captions-(\d{5})-of-(\d{5})\.npy$")

EmbedFn = Callable[[list[str]], np.ndarray]
CaptionsFn = Callable[[int, int], list[str]]


class StoreError(RuntimeError):
    """An embedding store that is missing, incomplete, stale or does not match the config."""


def rebuild_command(config_name: str | None, store_dir: str | Path | None = None) -> str:
    cmd = f"python launch/embed_text.py --config {config_name or 'NAME'}"
    return cmd + (f" --store_dir {store_dir}" if store_dir is not None else "")


# ---------------------------------------------------------------------------------------------
# Descriptions and hashes
# ---------------------------------------------------------------------------------------------


def _update_hash(hasher: Any, captions: Iterable[str]) -> None:
    for caption in captions:
        hasher.update(caption.encode("utf-8") + b"\n")


def captions_hash(captions: Iterable[str]) -> str:
    """sha256 over the captions in order, each as utf-8 + b"\\n"."""
    hasher = hashlib.sha256()
    _update_hash(hasher, captions)
    return hasher.hexdigest()


def default_store_dir(cfg: ml_collections.ConfigDict) -> Path:
    """cfg.text_encoder.store_dir, or ``<repo>/workdirs/embeddings/<config name>``."""
    if cfg.text_encoder.store_dir:
        return Path(cfg.text_encoder.store_dir)
    return ROOT / "workdirs" / "embeddings" / (cfg.name or "default")


def source_description(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The train split's identity: everything that changes its captions."""
    data = cfg.data
    desc: dict[str, Any] = {"source": data.source, "split": "train"}
    if data.source == "shapes":
        world = data.shapes
        desc.update(
            num_examples=int(world.num_train),
            seed=int(data.seed),
            caption_style=str(world.caption_style),
            noise_prob=float(world.noise_prob),
            max_objects=int(world.max_objects),
        )
    return desc


def encoder_description(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    te = cfg.text_encoder
    return {"id": str(te.name), "dim": int(te.dim), "max_length": int(te.max_length)}


def expected_description(
    cfg: ml_collections.ConfigDict, captions_sha256: str | None
) -> dict[str, Any]:
    """What a store for `cfg` must contain; a None hash is not checked by `validate`."""
    source = source_description(cfg)
    return {
        "encoder": encoder_description(cfg),
        "source": source,
        "num_examples": source.get("num_examples"),
        "captions_sha256": captions_sha256,
    }


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def shard_name(index: int, total: int) -> str:
    return f"captions-{index:05d}-of-{total:05d}.npy"


def shard_plan(num_examples: int, shard_size: int) -> list[tuple[int, int]]:
    """(start, count) of every shard; the last one may be partial."""
    if shard_size < 1 or num_examples < 1:
        raise ValueError(
            f"need shard_size >= 1 and num_examples >= 1, got {shard_size}, {num_examples}"
        )
    return [(s, min(shard_size, num_examples - s)) for s in range(0, num_examples, shard_size)]


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write through `<path>.tmp` + os.replace: a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_npy(path: Path, array: np.ndarray) -> None:
    # np.save on a file object: given a name it would append ".npy" to "x.npy.tmp".
    _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: f.write(_json_bytes(obj)))


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _shard_is_finished(path: Path, sidecar: dict[str, Any], dim: int) -> bool:
    """True when the shard's sidecar equals `sidecar` and its array has the right header."""
    if _read_json(path.with_name(path.name + ".json")) != sidecar:
        return False
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return array.shape == (sidecar["count"], dim) and array.dtype == np.dtype(STORE_DTYPE)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _embed_unique(embed_fn: EmbedFn, texts: Sequence[str], dim: int) -> np.ndarray:
    """float32 (len(texts), dim), embedding each distinct text once (captions repeat a lot)."""
    if not texts:
        return np.zeros((0, dim), np.float32)
    unique, inverse = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    rows = np.asarray(embed_fn([str(t) for t in unique]), np.float32)
    if rows.shape != (len(unique), dim):
        raise StoreError(
            f"embed_fn returned shape {rows.shape} for {len(unique)} texts; expected "
            f"({len(unique)}, {dim}) (cfg.text_encoder.dim={dim})"
        )
    return rows[inverse.reshape(-1)]


def _wait_for_shard(path: Path, sidecar: dict[str, Any], dim: int, owner: int) -> None:
    deadline = time.monotonic() + SHARD_WAIT_TIMEOUT_S
    next_log = time.monotonic()
    while not _shard_is_finished(path, sidecar, dim):
        if time.monotonic() > deadline:
            raise StoreError(f"timed out waiting for {path.name} from process {owner}")
        if time.monotonic() >= next_log:
            logging.info("waiting for %s (written by process %d)", path.name, owner)
            next_log = time.monotonic() + 300
        time.sleep(2.0)


def _clean_stale_files(store_dir: Path, keep: set[str]) -> None:
    """Drop leftover *.tmp files and shards of an older plan (another shard_size)."""
    for path in store_dir.iterdir():
        match = _SHARD_RE.match(path.name.removesuffix(".json"))
        stale_shard = match is not None and path.name.removesuffix(".json") not in keep
        if path.name.endswith(".tmp") or stale_shard:
            path.unlink(missing_ok=True)


def build_store(
    cfg: ml_collections.ConfigDict,
    store_dir: str | Path,
    *,
    embed_fn: EmbedFn,
    captions_fn: CaptionsFn,
    num_examples: int,
    eval_texts: Sequence[str],
    progress: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    encoder_info: Mapping[str, Any] | None = None,
) -> Path:
    """Embeds every caption (resumably) and writes the store; returns its directory.

    Process p embeds shards i with i % process_count == p. Process 0 also hashes every
    caption, waits for the other processes' shards, embeds `eval_texts` and writes the
    manifest last. `encoder_info` (from `make_embed_fn`) supplies pooling/normalize.
    """
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    te = cfg.text_encoder
    dim = int(te.dim)
    info = dict(encoder_info or {})
    encoder = {
        **encoder_description(cfg),
        "pooling": info.get("pooling"),
        "normalize": info.get("normalize"),
    }
    source = {**source_description(cfg), "num_examples": int(num_examples)}
    plan = shard_plan(int(num_examples), int(te.shard_size))
    names = [shard_name(i, len(plan)) for i in range(len(plan))]
    if process_index == 0:
        # The store is incomplete from here until the new manifest is written.
        (store_dir / MANIFEST).unlink(missing_ok=True)

    total_hash = hashlib.sha256()
    shards, skipped = [], 0
    bar = tqdm(total=num_examples, disable=not progress, unit="caption", desc="embedding")
    for i, (start, count) in enumerate(plan):
        mine = i % process_count == process_index
        if not mine and process_index != 0:
            continue
        captions = captions_fn(start, start + count)
        if len(captions) != count:
            raise StoreError(f"captions_fn({start}, {start + count}) gave {len(captions)} captions")
        if process_index == 0:
            _update_hash(total_hash, captions)
        sidecar = {
            "start": start,
            "count": count,
            "captions_sha256": captions_hash(captions),
            "encoder": encoder,
        }
        path = store_dir / names[i]
        if not mine:
            _wait_for_shard(path, sidecar, dim, owner=i % process_count)
        elif _shard_is_finished(path, sidecar, dim):
            skipped += 1
        else:
            rows = _embed_unique(embed_fn, captions, dim).astype(STORE_DTYPE)
            _write_npy(path, rows)
            _write_json(path.with_name(path.name + ".json"), sidecar)  # after: marks it done
        bar.update(count)
        shards.append({"file": names[i], **{k: sidecar[k] for k in SHARD_KEYS}})
    bar.close()
    if skipped:
        logging.info("reused %d finished shard(s) in %s", skipped, store_dir)
    if process_index != 0:
        return store_dir

    # Evaluation texts are few: recomputing them each time keeps them in step with the encoder.
    texts = [str(t) for t in eval_texts]
    _write_npy(store_dir / EVAL_TEXTS, _embed_unique(embed_fn, texts, dim).astype(STORE_DTYPE))
    _write_json(store_dir / "eval_texts.json", texts)
    eval_entry = {
        "file": EVAL_TEXTS,
        "count": len(texts),
        "sha256": captions_hash(texts),
    }
    _clean_stale_files(store_dir, set(names))
    manifest = {
        "format": FORMAT,
        "encoder": encoder,
        "source": source,
        "num_examples": int(num_examples),
        "num_captions": int(num_examples),
        "captions_sha256": total_hash.hexdigest(),
        "shards": shards,
        "eval_texts": eval_entry,
        "dtype": STORE_DTYPE,
        "complete": True,
    }
    _write_json(store_dir / MANIFEST, manifest)
    return store_dir


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _missing_shards_message(store_dir: Path) -> str:
    """Which shards are unfinished, judged from the file names alone (no manifest yet)."""
    totals, finished = set(), set()
    for path in store_dir.glob("captions-*-of-*.npy"):
        match = _SHARD_RE.match(path.name)
        if match:
            totals.add(int(match.group(2)))
            if (store_dir / (path.name + ".json")).exists():
                finished.add(path.name)
    if len(totals) != 1:
        return "no shards written yet" if not totals else "shards of several builds present"
    total = totals.pop()
    missing = [shard_name(i, total) for i in range(total) if shard_name(i, total) not in finished]
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return f"{total - len(missing)} of {total} shards finished; missing: {shown or 'none'}"


class EmbeddingStore:
    """Read side of a store: rows by example index, eval-text embeddings, validation.

    Shard arrays are memory-mapped lazily and dropped when pickled, so a store can be shipped
    to grain worker processes; each process maps the files itself (the OS shares the pages).
    """

    def __init__(self, store_dir: Path, manifest: dict[str, Any]):
        self.path = Path(store_dir)
        self._manifest = manifest
        self._starts = np.array([s["start"] for s in manifest["shards"]], np.int64)
        self._arrays: dict[int, np.ndarray] = {}
        self._eval_index: dict[str, int] | None = None
        self._eval_rows: np.ndarray | None = None

    @classmethod
    def open(cls, store_dir: str | Path, config_name: str | None = None) -> EmbeddingStore:
        """Opens a complete store, or raises StoreError saying how to finish/build it."""
        store_dir = Path(store_dir)
        command = rebuild_command(config_name, store_dir)
        if not store_dir.is_dir():
            raise StoreError(f"no embedding store at {store_dir}; build it with `{command}`")
        manifest = _read_json(store_dir / MANIFEST)
        if manifest is None:
            raise StoreError(
                f"embedding store {store_dir} is incomplete (no manifest.json): "
                f"{_missing_shards_message(store_dir)}. Finish it with `{command}` "
                "(it resumes, reusing finished shards)."
            )
        shards = manifest.get("shards", [])
        missing = [s["file"] for s in shards if not (store_dir / s["file"]).exists()]
        if not manifest.get("complete") or missing:
            raise StoreError(
                f"embedding store {store_dir} is incomplete: missing shards "
                f"{missing or 'unknown'}. Finish it with `{command}`."
            )
        if manifest.get("format") != FORMAT:
            raise StoreError(
                f"embedding store {store_dir} has format {manifest.get('format')}, this code "
                f"reads format {FORMAT}; rebuild it with `{command}`"
            )
        return cls(store_dir, manifest)

    def __len__(self) -> int:
        return int(self._manifest["num_examples"])

    @property
    def dim(self) -> int:
        return int(self._manifest["encoder"]["dim"])

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._arrays:
            self._arrays[i] = np.load(self.path / self._manifest["shards"][i]["file"], "r")
        return self._arrays[i]

    def lookup(self, indices: np.ndarray) -> np.ndarray:
        """float16 (*indices.shape, dim): the caption embedding of each example index."""
        indices = np.asarray(indices, np.int64)
        flat = indices.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            bad = flat[(flat < 0) | (flat >= len(self))][0]
            raise IndexError(f"index {bad} out of range for a store of {len(self)} examples")
        out = np.empty((flat.size, self.dim), np.dtype(STORE_DTYPE))
        shard_ids = np.searchsorted(self._starts, flat, side="right") - 1
        for s in np.unique(shard_ids):
            where = np.nonzero(shard_ids == s)[0]
            out[where] = self._shard(int(s))[flat[where] - self._starts[s]]
        return out.reshape(*indices.shape, self.dim)

    def _load_eval(self) -> tuple[dict[str, int], np.ndarray]:
        if self._eval_index is None:
            texts = _read_json(self.path / "eval_texts.json") or []
            self._eval_index = {t: i for i, t in enumerate(texts)}
            self._eval_rows = np.load(self.path / self._manifest["eval_texts"]["file"])
        return self._eval_index, self._eval_rows

    def eval_text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (n, dim) for texts embedded at build time; StoreError if any is absent."""
        index, rows = self._load_eval()
        absent = [t for t in texts if t not in index]
        if absent:
            raise StoreError(
                f"stale store {self.path}: {len(absent)} evaluation text(s) were not embedded "
                f"when it was built, first {absent[:3]}; the evaluators changed since. Rebuild "
                f"it with `{rebuild_command(None, self.path)}` using this run's config."
            )
        return rows[[index[t] for t in texts]].astype(np.float32).reshape(len(texts), self.dim)

    def validate(self, expected: Mapping[str, Any], config_name: str | None = None) -> None:
        """Raises StoreError listing every field that differs from `expected_description`.

        `expected` may also carry "first_shard_captions_sha256": the hash of shard 0's
        captions, which catches a changed caption generator without hashing every caption.
        """
        got = self._manifest
        diffs = []
        for key, want in expected.get("encoder", {}).items():
            if got["encoder"].get(key) != want:
                diffs.append(f"encoder.{key}: store has {got['encoder'].get(key)!r}, want {want!r}")
        for key, want in expected.get("source", {}).items():
            if got["source"].get(key) != want:
                diffs.append(f"source.{key}: store has {got['source'].get(key)!r}, want {want!r}")
        for key in ("num_examples", "captions_sha256"):
            want = expected.get(key)
            if want is not None and got.get(key) != want:
                diffs.append(f"{key}: store has {got.get(key)!r}, want {want!r}")
        # A cheap check for callers that hash only the first shard's captions.
        want = expected.get("first_shard_captions_sha256")
        have = got["shards"][0]["captions_sha256"]
        if want is not None and have != want:
            diffs.append(f"first_shard_captions_sha256: store has {have!r}, want {want!r}")
        if diffs:
            raise StoreError(
                f"embedding store {self.path} does not match the config:\n  "
                + "\n  ".join(diffs)
                + f"\nRebuild it with `{rebuild_command(config_name, self.path)}` "
                "(plus this run's --config.* overrides)."
            )

    # Memory maps hold file handles: drop them when pickled, reopen lazily after.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_arrays={}, _eval_index=None, _eval_rows=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


# ---------------------------------------------------------------------------------------------
# The frozen encoder
# ---------------------------------------------------------------------------------------------


def make_embed_fn(cfg: ml_collections.ConfigDict, mesh) -> tuple[EmbedFn, dict[str, Any]]:
    """(embed_fn, info) for the configured frozen encoder; embed_fn returns float32 numpy.

    `mesh` must hold this process's devices only: each process embeds its own shards.
    The batch is split over the mesh's batch axes and padded to a fixed size; the token
    length is trimmed to a power-of-two bucket (>= 16) so short captions stay cheap while
    only a handful of shapes ever compile.
    """
    import jax
    from flax import nnx

    from jaxclip import mesh as mesh_lib
    from jaxclip.models.sentence_encoder import MINILM_ID, load_sentence_encoder, minilm_dir

    te = cfg.text_encoder
    if te.name != MINILM_ID:
        raise StoreError(
            f"jaxclip cannot run text encoder {te.name!r} yet (only {MINILM_ID!r}). Produce the "
            "store elsewhere in the documented format (see jaxclip/data/embedding_store.py) "
            "and point --config.text_encoder.store_dir at it."
        )
    local = set(jax.local_devices())
    if any(d not in local for d in mesh.devices.flat):
        raise ValueError("make_embed_fn needs a mesh of this process's local devices only")
    model, tokenizer, info = load_sentence_encoder(te.path or minilm_dir(), encoder_id=str(te.name))
    if info["dim"] != te.dim:
        raise StoreError(f"{te.name} has dim {info['dim']}, config says {te.dim}")
    if te.max_length > info["max_length"]:
        raise StoreError(
            f"{te.name} takes at most {info['max_length']} tokens, config says {te.max_length}"
        )
    tokenizer = type(tokenizer).from_file(Path(info["model_dir"]) / "tokenizer.json", te.max_length)
    info = {**info, "max_length": int(te.max_length)}

    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = -(-int(te.batch_size) // shards) * shards  # round up to a multiple of the shards
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, mesh_lib.replicated(mesh))
    in_sharding = mesh_lib.batch_sharding(mesh, 2)

    @jax.jit
    def forward(state, tokens, mask):
        return nnx.merge(graphdef, state)(tokens, mask)[0]

    def embed_fn(texts: list[str]) -> np.ndarray:
        unique, inverse = np.unique(np.asarray(texts, dtype=str), return_inverse=True)
        out = np.zeros((len(unique), te.dim), np.float32)
        for lo in range(0, len(unique), batch):
            chunk = [str(t) for t in unique[lo : lo + batch]]
            tokens, mask = tokenizer(chunk)
            longest = int(mask.sum(1).max())
            length = min(max(16, 1 << (longest - 1).bit_length()), tokens.shape[1])
            pad = batch - len(chunk)
            tokens = np.pad(
                tokens[:, :length], ((0, pad), (0, 0)), constant_values=tokenizer.pad_id
            )
            mask = np.pad(mask[:, :length], ((0, pad), (0, 0)))
            pooled = forward(
                state, jax.device_put(tokens, in_sharding), jax.device_put(mask, in_sharding)
            )
            out[lo : lo + len(chunk)] = np.asarray(pooled)[: len(chunk)]
        return out[inverse.reshape(-1)]

    return embed_fn, info
