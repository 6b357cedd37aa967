"""Training on converted datasets: sharding, mixtures, augmentation, bad records, resume."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grain
import msgpack
import numpy as np
import pytest
from data_fixtures import bomb_png, corrupt_image_bytes, encode, example
from PIL import Image
from tiny import tiny_config
from training_processes import saved_steps

from jaxclip import train as train_lib
from jaxclip.checkpoint import CheckpointError
from jaxclip.config import ConfigError
from jaxclip.data import bad_records, images, record_pipeline, records
from jaxclip.data.pipeline import make_tokenizer, train_loader

# --- Data written on disk for the tests ---------------------------------------------------

# Which kind of damage a record index gets (see `damaged_record`).
DAMAGE = {
    3: "corrupt_image",
    5: "missing_field",
    9: "empty_captions",
    17: "bomb",
    30: "corrupt_image",
}


def good_record(i: int, size=(40, 32)) -> bytes:
    image, caption, _ = example(i, size)
    return records.encode_record(f"k{i}", encode(image, "jpg"), [caption, f"{caption} again"])


def damaged_record(i: int, kind: str) -> bytes:
    """Record i damaged as the training host may meet it (the converter would have skipped
    these; a dataset written by other tools, or damaged later, may hold them)."""
    if kind == "corrupt_image":
        return records.encode_record(f"k{i}", corrupt_image_bytes(i), ["a red circle"])
    if kind == "bomb":
        return records.encode_record(f"k{i}", bomb_png(), ["a red circle"])
    if kind == "empty_captions":
        return records.encode_record(f"k{i}", encode(example(i)[0]), ["", "  "])
    assert kind == "missing_field"
    return msgpack.packb({"key": f"k{i}", "captions": ["a red circle"]})  # no image


def write_dataset(directory, shard_sizes, damage=None, truncate_last=False) -> Path:
    """A converted dataset with the given shard sizes; `damage` maps index -> kind."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    damage = damage or {}
    shards, start = [], 0
    for s, size in enumerate(shard_sizes):
        raw = [
            damaged_record(i, damage[i]) if i in damage else good_record(i)
            for i in range(start, start + size)
        ]
        path = directory / records.shard_name("data", s, len(shard_sizes))
        shards.append(records.write_shard(path, raw))
        start += size
    records.write_manifest(directory, shards, name=directory.name)
    if truncate_last:
        path = directory / shards[-1].file
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return directory


@pytest.fixture(scope="module")
def damaged_dir(tmp_path_factory):
    """48 records: 5 damaged in intact shards, and the 8 of a truncated last shard."""
    root = tmp_path_factory.mktemp("damaged")
    return write_dataset(root / "damaged", [20, 20, 8], DAMAGE, truncate_last=True)


DAMAGED_GOOD = sorted(set(range(40)) - set(DAMAGE))  # 35 good records
DAMAGED_BAD = 48 - len(DAMAGED_GOOD)


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("clean") / "clean", [24, 24])


def records_config(paths, **overrides):
    values = {
        "data.source": "records",
        "data.records.paths": ",".join(str(p) for p in paths),
        "data.bad_fraction_min_records": 10,
        "data.records.read_threads": 0,
        "data.batch_size": 8,
    }
    values.update(overrides)
    return tiny_config(**values)


def loader_batches(cfg, count, shard=(0, 1), process_batch=None):
    loader = record_pipeline.train_loader(
        cfg.data,
        make_tokenizer(cfg.data),
        process_batch or cfg.data.batch_size,
        grain.sharding.ShardOptions(*shard, drop_remainder=True),
    )
    iterator = iter(loader)
    return iterator, [next(iterator) for _ in range(count)]


# --- Configuration ------------------------------------------------------------------------


def test_paths_name_datasets_and_weights():
    assert record_pipeline.parse_paths("/a") == [record_pipeline.DatasetSpec("/a", 1.0)]
    assert record_pipeline.parse_paths("/a:0.7, gs://b/c:0.3,/d") == [
        record_pipeline.DatasetSpec("/a", 0.7),
        record_pipeline.DatasetSpec("gs://b/c", 0.3),
        record_pipeline.DatasetSpec("/d", 1.0),
    ]


@pytest.mark.parametrize(
    "override, message",
    [
        ({"data.records.paths": ""}, r"needs data.records.paths.*prepare_data.py"),
        ({"data.records.paths": "/a:0.5,/b:0"}, r"'/b:0' has weight 0; weights must be positive"),
        ({"data.records.paths": "/a:-1"}, r"weights must be positive"),
        ({"data.records.caption": "longest"}, r"data.records.caption='longest'; use one of"),
        ({"data.augment.crop_scale": "(0.5, 1.5)"}, r"crop_scale=\(0.5, 1.5\) must satisfy"),
        ({"data.max_bad_fraction": "2.0"}, r"max_bad_fraction=2.0 must be in \[0, 1\]"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(override, message):
    cfg = records_config(["/a"], **override)
    with pytest.raises(ConfigError, match=message):
        record_pipeline.check_config(cfg.data)


def test_missing_dataset_directory_says_how_to_make_it(tmp_path):
    cfg = records_config([tmp_path / "nowhere"])
    with pytest.raises(records.DatasetError, match=r"does not exist.*prepare_data.py"):
        train_loader(cfg.data, make_tokenizer(cfg.data), 8)


def test_lift_on_records_is_refused(clean_dir):
    cfg = records_config([clean_dir])
    with pytest.raises(ValueError, match=r"LIFT .* shapes world only"):
        train_loader(cfg.data, make_tokenizer(cfg.data), 8, text_store=object())


# --- Decoding and augmentation --------------------------------------------------------------


def raw_item(raw: bytes, index=7) -> dict:
    return {
        "index": index,
        "shard": "data-00000-of-00001.array_record",
        "position": index,
        "raw": raw,
        "read_error": "",
        "directory": "/d",
        "index_offset": 100,
    }


@pytest.mark.parametrize("flip", [False, True])
def test_training_view_is_the_crop_an_independent_reference_computes(flip):
    tokenizer = make_tokenizer(records_config(["/d"]).data)
    scale, ratio = (0.3, 1.0), (3 / 4, 4 / 3)
    decode = record_pipeline.DecodeExample(
        tokenizer,
        24,
        crop_scale=scale,
        crop_ratio=ratio,
        flip=flip,
        caption="random",
        max_pixels=10**6,
    )
    # Noise, stored losslessly: any misplaced box or missed flip changes many pixels.
    pixels = np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    captions = ["a red circle", "a blue square", "a green star"]
    raw = records.encode_record("k", encode(Image.fromarray(pixels), "png"), captions)
    flipped = []
    for seed in range(12):
        got = decode.random_map(raw_item(raw), np.random.default_rng(seed))
        # The reference replays the same draws in the documented order: caption, box, flip.
        rng = np.random.default_rng(seed)
        caption = captions[rng.integers(3)]
        left, top, w, h = images.random_resized_crop_box(70, 50, rng, scale, ratio)
        assert left >= 0 and left + w <= 70 and top >= 0 and top + h <= 50
        assert 0.3 * 3500 * 0.9 <= w * h <= 3500  # area within scale (up to rounding)
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1  # aspect within ratio (up to rounding)

        def view(dx, box=(left, top, w, h)):
            x, y, bw, bh = box
            crop = Image.fromarray(pixels[y : y + bh, x + dx : x + dx + bw])
            return np.asarray(crop.resize((24, 24), Image.Resampling.BICUBIC)).astype(int)

        mirrored = flip and rng.random() < 0.5
        flipped.append(mirrored)
        reference, shifted = view(0), view(1 if left + w < 70 else -1)
        if mirrored:
            reference, shifted = reference[:, ::-1], shifted[:, ::-1]
        # PIL's box resize reads pixels just outside the box (the filter's support, <= 3
        # output pixels here) where the crop-then-resize reference clamps: compare inside.
        image = got["image"].astype(int)
        assert got["image"].shape == (24, 24, 3) and got["image"].dtype == np.uint8
        assert np.abs(image - reference)[4:-4, 4:-4].max() <= 1
        assert np.abs(image - shifted)[4:-4, 4:-4].mean() > 10  # a 1-pixel error would show
        tokens, mask = tokenizer([caption])
        np.testing.assert_array_equal(got["tokens"], tokens[0])
        np.testing.assert_array_equal(got["mask"], mask[0])
        assert got["index"] == 107  # dataset offset + record index
    assert set(flipped) == ({True, False} if flip else {False})
    # data.max_image_pixels: 70x50 = 3500 pixels declared, refused from the header.
    decode.max_pixels = 3499
    refused = decode.random_map(raw_item(raw), np.random.default_rng(0))
    assert "3500 pixels, above the limit of 3499" in refused["bad"]
    assert refused["where"] == "/d/data-00000-of-00001.array_record record 7 (index 7)"


def test_first_caption_mode_and_evaluation_crop():
    tokenizer = make_tokenizer(records_config(["/d"]).data)
    decode = record_pipeline.DecodeExample(
        tokenizer,
        16,
        crop_scale=(1, 1),
        crop_ratio=(1, 1),
        flip=False,
        caption="first",
        max_pixels=10**6,
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    raw = records.encode_record("k", encode(image, "png"), ["", "a red circle", "a blue star"])
    for seed in range(5):  # blank captions are passed over; "first" never draws another
        got = decode.random_map(raw_item(raw), np.random.default_rng(seed))
        np.testing.assert_array_equal(got["tokens"], tokenizer(["a red circle"])[0][0])
    # Evaluation view: shorter side to 16, then the centre. The reference resizes the whole
    # 64x32 image to 32x16 (an exact factor, so both sample the same points) and slices.
    wide = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 64, 3), np.uint8))
    reference = np.asarray(wide.resize((32, 16), Image.Resampling.BICUBIC))[:, 8:24]
    np.testing.assert_array_equal(images.resize_center_crop(wide, 16), reference)


# --- Sharding, shuffling, mixtures --------------------------------------------------------

_HOST = """
import json, sys
sys.path.insert(0, {tests!r})
import conftest  # noqa: F401  (absl flags, as the launchers set them)
import grain
from tiny import tiny_config
from jaxclip.data import record_pipeline
from jaxclip.data.pipeline import make_tokenizer

cfg = tiny_config(**{{"data.source": "records", "data.records.paths": {path!r},
                     "data.records.read_threads": 0}})
shard = grain.sharding.ShardOptions({index}, 2, drop_remainder=True)
it = iter(record_pipeline.train_loader(cfg.data, make_tokenizer(cfg.data), 6, shard))
print(json.dumps([next(it)["index"].tolist() for _ in range(8)]))
"""


def test_two_processes_read_disjoint_halves_that_cover_the_dataset(clean_dir):
    """Two separate Python processes, as two hosts would be: 48 records, 24 each."""
    tests = str(Path(__file__).parent)
    hosts = [
        subprocess.Popen(
            [sys.executable, "-c", _HOST.format(tests=tests, path=str(clean_dir), index=i)],
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
        )
        for i in range(2)
    ]
    batches = [json.loads(h.communicate(timeout=120)[0]) for h in hosts]
    assert [h.returncode for h in hosts] == [0, 0]
    epochs = [[np.concatenate(b[:4]), np.concatenate(b[4:])] for b in batches]
    for first, second in epochs:
        # Each host: its 24 records once per epoch, in a new order each epoch.
        assert sorted(first) == sorted(second) and len(set(first)) == 24
        assert list(first) != list(second)
    halves = [set(e[0]) for e in epochs]
    assert not halves[0] & halves[1]
    assert halves[0] | halves[1] == set(range(48))


def test_mixture_draws_datasets_in_proportion(tmp_path):
    a = write_dataset(tmp_path / "a", [12])
    b = write_dataset(tmp_path / "b", [30])
    cfg = records_config([f"{a}:0.25", f"{b}:0.75"])
    stream = record_pipeline.example_stream(
        cfg.data, make_tokenizer(cfg.data), grain.sharding.NoSharding()
    )
    index = np.array([stream[i]["index"] for i in range(400)])
    from_a = index < 12  # b's indices come after a's 12
    assert abs(from_a.mean() - 0.25) < 0.02
    for window in np.split(from_a, 4):  # interleaved throughout, not in blocks
        assert abs(window.mean() - 0.25) < 0.05
    # Every record of each dataset is drawn, about equally often (one shuffled epoch after
    # another): a has 100 draws over 12 records, b 300 over 30.
    counts_a = np.bincount(index[from_a], minlength=12)
    counts_b = np.bincount(index[~from_a] - 12, minlength=30)
    assert counts_a.min() >= 8 and counts_a.max() <= 9
    assert counts_b.min() >= 10 and counts_b.max() <= 10


# --- Bad records ----------------------------------------------------------------------------


def test_bad_records_are_skipped_counted_and_named_in_warnings(damaged_dir, caplog):
    cfg = records_config([damaged_dir], **{"data.max_bad_fraction": 0.5})
    caplog.set_level(logging.WARNING)
    batch_size = 5  # 35 good records: one epoch of good records is exactly 7 batches
    iterator, batches = loader_batches(cfg, 14, process_batch=batch_size)
    epochs = [np.concatenate([b["index"] for b in batches[k : k + 7]]) for k in (0, 7)]
    for good in epochs:  # every good record once per epoch, no damaged one ever
        assert sorted(good) == DAMAGED_GOOD
    stats = [bad_records.pop_metrics(b) for b in batches]
    seen = [s["data/seen_records"] for s in stats]
    bad = [s["data/bad_records"] for s in stats]
    assert all(
        s - b == batch_size * (k + 1) for k, (s, b) in enumerate(zip(seen, bad, strict=True))
    )
    # By the end of the second epoch's good records all 13 damaged records of the first
    # epoch were passed, and at most the 13 of the second.
    assert DAMAGED_BAD <= bad[-1] <= 2 * DAMAGED_BAD
    assert bad == sorted(bad) and stats[-1]["data/bad_fraction"] == bad[-1] / seen[-1]
    warnings = [r.getMessage() for r in caplog.records if "Skipping bad record" in r.getMessage()]
    assert len(warnings) == bad_records.WARN_FIRST
    reasons = {
        "truncated": "data-00002-of-00003.array_record record",
        "cannot decode image": "data-00000-of-00003.array_record record 3 (index 3)",
        "missing field(s) ['image']": "data-00000-of-00003.array_record record 5 (index 5)",
        "no non-empty caption": "data-00000-of-00003.array_record record 9 (index 9)",
        "decompression bomb": "data-00000-of-00003.array_record record 17 (index 17)",
    }
    everything = bad_records_described(cfg)
    for reason, where in reasons.items():
        assert any(reason in w and where in w for w in everything), (reason, everything)
    assert all(any(line in w for line in everything) for w in warnings)


def bad_records_described(cfg) -> list[str]:
    """Every damaged record's description, straight from the decoding step."""
    stream = record_pipeline.example_stream(
        cfg.data, make_tokenizer(cfg.data), grain.sharding.NoSharding()
    )
    elements = [stream[i] for i in range(48)]  # one epoch
    return [f"{e['where']}: {e['bad']}" for e in elements if "bad" in e]


def test_too_many_bad_records_stop_the_run_with_a_message_naming_one(damaged_dir, tmp_path):
    cfg = records_config([damaged_dir], **{"data.max_bad_fraction": 0.1, "train.steps": 6})
    with pytest.raises(bad_records.BadDataError) as error:
        train_lib.train(cfg, tmp_path, progress=False)
    message = str(error.value)
    assert "data.max_bad_fraction=0.1" in message
    assert f"{damaged_dir}/data-0000" in message and "array_record record" in message
    assert "reconvert it with launch/prepare_data.py" in message
    assert "--config.data.max_bad_fraction=" in message


# --- Training and exact resume -------------------------------------------------------------


def logged_steps(workdir) -> list[int]:
    with open(Path(workdir) / "metrics.jsonl") as f:
        return [r["step"] for r in map(json.loads, f) if "train/loss" in r]


def metrics_rows(workdir) -> dict[int, dict]:
    with open(Path(workdir) / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r for r in rows if "train/loss" in r}


def test_resumed_training_with_two_workers_continues_the_same_batches(damaged_dir, tmp_path):
    """Two worker processes (two decode threads each), bad records skipped: resuming from a
    checkpoint saved in the middle of a run reads the batches, and counts the bad records, of
    one uninterrupted loader."""
    cfg = records_config(
        [damaged_dir],
        **{
            "data.max_bad_fraction": 0.5,
            "data.worker_count": 2,
            "data.records.read_threads": 2,
            "data.batch_size": 16,
            "train.steps": 6,
            "train.checkpoint_every": 3,
        },
    )
    train_lib.train(cfg, tmp_path, progress=False)
    straight = metrics_rows(tmp_path)
    # Back to step 3, saved while the loop (and the workers) went on: resume from there.
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    train_lib.train(cfg, tmp_path, progress=False)
    resumed = metrics_rows(tmp_path)  # the later rows of steps 4-6 replace the first ones
    assert sorted(straight) == sorted(resumed) == list(range(1, 7))
    assert logged_steps(tmp_path) == [1, 2, 3, 4, 5, 6, 4, 5, 6]  # it resumed at step 4

    iterator, batches = loader_batches(cfg, 6)  # the reference: never interrupted
    iterator.close()
    for step, batch in enumerate(batches, start=1):
        stats = bad_records.pop_metrics(batch)
        for rows in (straight, resumed):
            assert rows[step]["train/data/index_sum"] == int(batch["index"].sum()), step
            for key, value in stats.items():
                assert rows[step][f"train/{key}"] == value, (step, key)
        assert straight[step]["train/loss"] == resumed[step]["train/loss"], step
    # Training saw the damage: bad records were counted, none was trained on.
    final = resumed[6]
    assert 0 < final["train/data/bad_records"] < final["train/data/seen_records"]
    assert final["train/data/seen_records"] - final["train/data/bad_records"] == 6 * 16


def test_training_on_converted_webdataset_image_folder_and_tfds(tmp_path):
    """The three kinds of source, each converted by the real converter, trained as one
    mixture: every dataset feeds the batches, and the damage the converter removed is gone."""
    from data_fixtures import make_image_folder, make_tfds_dataset, make_webdataset

    from jaxclip.data import convert

    quiet = dict(progress=False, workers=1)
    tars = make_webdataset(
        tmp_path / "tars", 16, corrupt=[1], empty_captions=[3], truncate_last=True
    )
    convert.webdataset(tars.pattern, tmp_path / "wds", **quiet)
    folder = make_image_folder(tmp_path / "folder", 12, "csv", captions_per_image=2, corrupt=[2])
    convert.image_folder(
        folder.root, tmp_path / "images", captions_file=folder.captions_file, **quiet
    )
    tiny = make_tfds_dataset(tmp_path / "tfds", captions="coco", splits={"train": 12})
    convert.tfds(tiny.name, tmp_path / "coco", data_dir=str(tiny.data_dir), **quiet)
    paths = [tmp_path / "wds", tmp_path / "images", tmp_path / "coco" / "train"]
    sizes = [len(records.RecordsSource(p)) for p in paths]
    assert sizes == [len(tars.expected_keys), len(folder.expected_keys), 12]

    cfg = records_config(paths, **{"data.batch_size": 16, "train.steps": 3})
    results = train_lib.train(cfg, tmp_path / "run", progress=False)
    assert np.isfinite(results["train/loss"])
    assert results["train/data/bad_records"] == 0
    assert results["train/data/seen_records"] == 3 * 16
    _, batches = loader_batches(cfg, 3)  # what those steps read
    index = np.concatenate([b["index"] for b in batches])
    offsets = np.cumsum([0, *sizes])
    assert all(
        ((index >= lo) & (index < hi)).sum() >= 12
        for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)
    )


def test_resuming_with_another_worker_count_says_which_to_set(clean_dir):
    iterator, _ = loader_batches(records_config([clean_dir]), 1)  # no worker processes
    state = iterator.get_state()
    cfg = records_config([clean_dir], **{"data.worker_count": 3})
    other = iter(train_loader(cfg.data, make_tokenizer(cfg.data), 8))
    with pytest.raises(ValueError, match=r"worker_count=0; this run has 3.*worker_count=0"):
        other.set_state(state)
    other.close()


def test_resuming_records_on_another_layout_is_refused_with_the_layout_to_use(clean_dir, tmp_path):
    """Per-host ranges: a position saved by one layout means nothing to another."""
    train_lib.train(records_config([clean_dir], **{"train.steps": 2}), tmp_path, progress=False)
    other = records_config([clean_dir], **{"train.steps": 4, "data.worker_count": 2})
    with pytest.raises(CheckpointError, match=r"run 1 process\(es\) with --config.data.worker_co"):
        train_lib.train(other, tmp_path, progress=False)
    assert saved_steps(tmp_path) == [2]  # nothing lost
