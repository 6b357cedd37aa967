"""Training on converted datasets: settings, augmentation, bad records, mixtures, resume.

(The global order of records over processes and workers is tested in test_global_order.py.)"""

import json
import logging
import shutil
from pathlib import Path

import grain
import msgpack
import numpy as np
import pytest
from data_fixtures import bomb_png, corrupt_image_bytes, encode, example
from PIL import Image
from tiny import tiny_config

from jaxclip import train as train_lib
from jaxclip.config import ConfigError
from jaxclip.data import bad_records, images, pipeline, records, sources
from jaxclip.data.global_order import MixtureOrder
from jaxclip.data.pipeline import make_tokenizer

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
        "data.read_threads": 0,
        "data.batch_size": 8,
    }
    values.update(overrides)
    return tiny_config(**values)


def tokenized(cfg):
    return pipeline.TokenizedCaption(make_tokenizer(cfg.data))


def loader_batches(cfg, count, process_batch=None):
    """`count` batches of one uninterrupted single-process loader, with their bad-record
    totals after each batch."""
    batches = pipeline.train_loader(
        cfg.data, tokenized(cfg), process_batch or cfg.data.batch_size, process_index=0,
        process_count=1,
    )  # fmt: skip
    taken = []
    for _ in range(count):
        taken.append(next(batches))
        taken[-1]["totals"] = dict(batches.totals)
    batches.close()
    return taken


# --- Configuration ------------------------------------------------------------------------


def test_paths_name_datasets_and_weights():
    assert sources.parse_paths("/a") == [sources.DatasetSpec("/a", 1.0)]
    assert sources.parse_paths("/a:0.7, gs://b/c:0.3,/d") == [
        sources.DatasetSpec("/a", 0.7),
        sources.DatasetSpec("gs://b/c", 0.3),
        sources.DatasetSpec("/d", 1.0),
    ]


@pytest.mark.parametrize(
    "override, message",
    [
        ({"data.records.paths": ""}, r"needs data.records.paths.*prepare_data.py"),
        ({"data.records.paths": "/a:0.5,/b:0"}, r"'/b:0' has weight 0; weights must be positive"),
        ({"data.records.paths": "/a:-1"}, r"weights must be positive"),
        ({"data.caption": "longest"}, r"data.caption='longest'; use one of"),
        ({"data.augment.crop_scale": "(0.5, 1.5)"}, r"crop_scale=\(0.5, 1.5\) must satisfy"),
        ({"data.max_bad_fraction": "2.0"}, r"max_bad_fraction=2.0 must be in \[0, 1\]"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(override, message):
    cfg = records_config(["/a"], **override)
    with pytest.raises(ConfigError, match=message):
        sources.training_sources(cfg.data)


def test_missing_dataset_directory_says_how_to_make_it(tmp_path):
    cfg = records_config([tmp_path / "nowhere"])
    with pytest.raises(records.DatasetError, match=r"does not exist.*prepare_data.py"):
        pipeline.train_loader(cfg.data, tokenized(cfg), 8)


# --- Decoding and augmentation --------------------------------------------------------------


def one_record_dataset(directory, image: Image.Image, captions, fmt="png") -> str:
    records.write_dataset(
        directory, [records.encode_record("k", encode(image, fmt), captions)], name="one"
    )
    return str(directory)


def examples_of(cfg, directory) -> pipeline.TrainExamples:
    data = sources.training_sources(cfg.data)
    return pipeline.TrainExamples(
        [s for s, _ in data], [w for _, w in data], cfg.data, tokenized(cfg)
    )


@pytest.mark.parametrize("flip", [False, True])
def test_training_view_is_the_crop_an_independent_reference_computes(flip, tmp_path):
    scale, ratio = (0.3, 1.0), (3 / 4, 4 / 3)
    # Noise, stored losslessly: any misplaced box or missed flip changes many pixels.
    pixels = np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    captions = ["a red circle", "a blue square", "a green star"]
    directory = one_record_dataset(tmp_path / "one", Image.fromarray(pixels), captions)
    cfg = records_config(
        [directory],
        **{
            "data.image_size": 24,
            "data.augment.crop_scale": repr(scale),
            "data.augment.crop_ratio": repr(ratio),
            "data.augment.flip": flip,
            "data.seed": 5,
        },
    )
    examples, tokenizer = examples_of(cfg, directory), make_tokenizer(cfg.data)
    flipped = []
    for position in range(12):
        got = examples[position]
        # The reference replays the documented draws from the position: caption, box, flip.
        rng = np.random.Generator(np.random.Philox(key=5 + position))
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
        assert got["index"] == 0 and got["bad"] == 0
    assert set(flipped) == ({True, False} if flip else {False})


def test_batches_equal_their_examples_in_or_out_of_shared_memory(clean_dir):
    """A batch (as a worker builds it, in shared memory, or in the main process) is its
    positions' examples taken one at a time, row for row; its large arrays leave a worker
    as shared memory, never as the staging array the worker reuses for the next batch."""
    cfg = records_config([clean_dir], **{"data.image_size": 80, "data.augment.flip": True})
    examples = examples_of(cfg, clean_dir)
    in_worker = pipeline.TrainBatches(examples, 6, shared_memory=True)
    in_main = pipeline.TrainBatches(examples, 6, threads=2)
    for block in (0, 3):
        shared, plain = in_worker[block], in_main[block]
        assert isinstance(shared["image"], grain.multiprocessing.SharedMemoryArray)
        shared["image"].unlink_on_del()
        assert not isinstance(plain["image"], grain.multiprocessing.SharedMemoryArray)
        for row, position in enumerate(range(6 * block, 6 * block + 6)):
            one = examples[position]
            for name, want in one.items():
                np.testing.assert_array_equal(shared[name][row], want, err_msg=name)
                np.testing.assert_array_equal(plain[name][row], want, err_msg=name)
    assert not np.shares_memory(in_worker[1]["image"], in_worker._staging)


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    pixels = np.zeros((50, 70, 3), np.uint8)
    directory = one_record_dataset(tmp_path / "one", Image.fromarray(pixels), ["a red circle"])
    cfg = records_config([directory], **{"data.max_image_pixels": 3499})
    ((source, _),) = sources.training_sources(cfg.data)
    with pytest.raises(sources.BadRecord) as refused:
        source.load(0)
    assert "3500 pixels, above the limit of 3499" in refused.value.reason
    assert refused.value.where == f"{directory}/data-00000-of-00001.array_record record 0 (index 0)"


def test_first_caption_mode_and_evaluation_crop(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    directory = one_record_dataset(tmp_path / "one", image, ["", "a red circle", "a blue star"])
    cfg = records_config([directory], **{"data.caption": "first", "data.image_size": 16})
    examples, tokenizer = examples_of(cfg, directory), make_tokenizer(cfg.data)
    for position in range(5):  # blank captions are passed over; "first" never draws another
        got = examples[position]
        np.testing.assert_array_equal(got["tokens"], tokenizer(["a red circle"])[0][0])
    # Evaluation view: shorter side to 16, then the centre. The reference resizes the whole
    # 64x32 image to 32x16 (an exact factor, so both sample the same points) and slices.
    wide = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 64, 3), np.uint8))
    reference = np.asarray(wide.resize((32, 16), Image.Resampling.BICUBIC))[:, 8:24]
    np.testing.assert_array_equal(images.resize_center_crop(wide, 16), reference)


# --- Bad records ----------------------------------------------------------------------------


def test_bad_records_are_replaced_counted_and_named_in_warnings(damaged_dir, caplog):
    cfg = records_config([damaged_dir], **{"data.max_bad_fraction": 0.5})
    caplog.set_level(logging.WARNING)
    batch_size, count = 6, 16  # two epochs of the 48 records
    batches = loader_batches(cfg, count, process_batch=batch_size)
    trained = np.concatenate([b["index"] for b in batches])
    assert not set(trained) & set(range(40, 48)) - set(DAMAGED_GOOD)
    assert not set(trained) - set(DAMAGED_GOOD)  # no damaged record is ever trained on
    # Every position of the order whose record is damaged was passed (and counted): an
    # independent count from the order alone; a stand-in may itself be damaged (more).
    order = MixtureOrder([48], [1.0], cfg.data.seed)
    damaged = sum(order[p][1] not in DAMAGED_GOOD for p in range(batch_size * count))
    seen = [b["totals"]["seen_records"] for b in batches]
    bad = [b["totals"]["bad_records"] for b in batches]
    assert bad[-1] >= damaged > 0 and bad == sorted(bad)
    assert all(
        s - b == batch_size * (k + 1) for k, (s, b) in enumerate(zip(seen, bad, strict=True))
    )
    warnings = [r.getMessage() for r in caplog.records if "Skipping bad record" in r.getMessage()]
    assert len(warnings) == bad_records.WARN_FIRST
    reasons = {
        "truncated": "data-00002-of-00003.array_record record",
        "cannot decode image": "data-00000-of-00003.array_record record 3 (index 3)",
        "missing field(s) ['image']": "data-00000-of-00003.array_record record 5 (index 5)",
        "no non-empty caption": "data-00000-of-00003.array_record record 9 (index 9)",
        "decompression bomb": "data-00000-of-00003.array_record record 17 (index 17)",
    }
    described = bad_records_described(cfg)
    for reason, where in reasons.items():
        assert any(reason in w and where in w for w in described), (reason, described)
    assert all(any(line in w for line in described) for w in warnings)


def bad_records_described(cfg) -> list[str]:
    """Every damaged record's description, straight from the source."""
    ((source, _),) = sources.training_sources(cfg.data)
    described = []
    for i in range(len(source)):
        try:
            source.load(i)
        except sources.BadRecord as e:
            described.append(f"{e.where}: {e.reason}")
    return described


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
    """Two worker processes (two decode threads each), bad records replaced: resuming from a
    checkpoint saved in the middle of a run reads the batches, and counts the bad records, of
    one uninterrupted loader without workers."""
    cfg = records_config(
        [damaged_dir],
        **{
            "data.max_bad_fraction": 0.5,
            "data.worker_count": 2,
            "data.read_threads": 2,
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

    with cfg.unlocked():
        cfg.data.worker_count = 0
    batches = loader_batches(cfg, 6)  # the reference: never interrupted, no workers
    for step, batch in enumerate(batches, start=1):
        totals = batch["totals"]
        stats = bad_records.metrics(totals["seen_records"], totals["bad_records"])
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
    batches = loader_batches(cfg, 3)  # what those steps read
    index = np.concatenate([b["index"] for b in batches])
    offsets = np.cumsum([0, *sizes])
    assert all(
        ((index >= lo) & (index < hi)).sum() >= 12
        for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)
    )


def test_records_resume_with_another_worker_count_equals_an_uninterrupted_run(
    damaged_dir, tmp_path
):
    """No layout is refused any more: a position is a step, whatever read it."""
    overrides = {"data.max_bad_fraction": 0.5, "train.steps": 4, "train.checkpoint_every": 100}
    cfg = records_config([damaged_dir], **overrides)
    train_lib.train(cfg, tmp_path / "straight", progress=False)
    train_lib.train(cfg, tmp_path / "resumed", stop_at_step=2, progress=False)
    more = records_config([damaged_dir], **overrides, **{"data.worker_count": 3})
    train_lib.train(more, tmp_path / "resumed", progress=False)
    straight, resumed = metrics_rows(tmp_path / "straight"), metrics_rows(tmp_path / "resumed")
    for step in range(1, 5):
        for key in ("train/loss", "train/data/index_sum", "train/data/bad_records"):
            assert resumed[step][key] == straight[step][key], (step, key)
