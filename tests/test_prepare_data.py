"""Converting real sources (webdataset tars, image folders, TFDS) into jaxclip records.

Every test builds its input on disk (tests/data_fixtures.py), converts it with the real
converter, and reads the result back through `RecordsSource` + `decode_record`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import data_fixtures as fx
import numpy as np
import pytest
from PIL import Image

from jaxclip.data import convert, records
from jaxclip.data.convert.webdataset import expand_braces, resolve_tars
from jaxclip.data.convert.writer import ImageOptions, reencode_image

ROOT = Path(__file__).resolve().parent.parent
QUIET = dict(progress=False)


def read_all(directory) -> list[dict]:
    source = records.RecordsSource(directory)
    items = [source[i] for i in range(len(source))]
    assert all(not item["read_error"] for item in items)
    return [records.decode_record(item["raw"]) for item in items]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def skipped_counts(manifest) -> dict[str, int]:
    return {reason: n for reason, n in manifest["skipped"].items() if n}


# --- Webdataset --------------------------------------------------------------------------------


def test_webdataset_keeps_good_samples_and_counts_every_skip_reason(tmp_path):
    wds = fx.make_webdataset(
        tmp_path / "tars",
        14,
        shards=2,
        corrupt=[1],
        bombs=[2],
        empty_captions=[3],
        missing_text=[4],
        missing_image=[8],
        truncate_last=True,
        json_captions=True,
        image_size=(96, 64),
    )
    manifest = convert.webdataset(
        wds.pattern, tmp_path / "out", options=ImageOptions(max_side=32), **QUIET
    )
    got = read_all(tmp_path / "out")

    assert [r["key"] for r in got] == wds.expected_keys
    assert manifest["count"] == len(wds.expected_keys) == 5
    assert skipped_counts(manifest) == {reason: len(v) for reason, v in wds.skipped.items()}
    assert {"undecodable_image", "decompression_bomb", "empty_caption"} <= set(wds.skipped)
    assert {"missing_pair_member", "truncated_tar"} <= set(wds.skipped)
    examples = manifest["skipped_examples"]
    for reason, keys in wds.skipped.items():
        assert all(any(k in e for e in examples[reason]) for k in keys), (reason, examples)
    assert "00001.tar" in examples["truncated_tar"][0]
    assert manifest["fields"] == ["key", "image", "captions"] and manifest["label_names"] is None

    for record in got:  # .txt and .json hold the same caption: it is kept once
        assert record["captions"] == [wds.captions[record["key"]]]
        # Shorter side 64 -> 32, aspect kept; the content is the original scene, resized.
        index = wds.keys.index(record["key"])
        reference, _, _ = fx.example(index, (96, 64))
        reference = np.asarray(reference.resize((48, 32), Image.Resampling.BICUBIC), np.float32)
        image = pixels(record["image"])
        assert image.shape == (32, 48, 3)
        assert np.abs(image - reference).mean() < 8.0


def test_webdataset_reads_json_captions_png_images_and_gzip_tars(tmp_path):
    wds = fx.make_webdataset(
        tmp_path / "tars", 6, shards=2, fmt="png", json_captions=True, txt_captions=False
    )
    gz = tmp_path / "gz" / "00000.tar.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(wds.tars[0].read_bytes()))

    convert.webdataset([str(gz), str(wds.tars[1])], tmp_path / "out", **QUIET)
    got = read_all(tmp_path / "out")

    assert [r["key"] for r in got] == wds.keys
    assert [r["captions"] for r in got] == [[wds.captions[k]] for k in wds.keys]
    assert all(Image.open(io.BytesIO(r["image"])).format == "JPEG" for r in got)


def test_a_tar_cut_between_members_is_reported_as_truncated(tmp_path):
    """No read error here: only the missing end-of-archive blocks show the damage. The sample
    whose caption was cut off is part of that loss, not a 'missing pair member'."""
    wds = fx.make_webdataset(tmp_path / "tars", 4, shards=1)
    path = wds.tars[0]
    with tarfile.open(path) as tar:
        last_caption = tar.getmembers()[-1]
    assert last_caption.name.endswith(".txt")
    with open(path, "r+b") as f:
        f.truncate(last_caption.offset)  # ends right after the last sample's image

    manifest = convert.webdataset(str(path), tmp_path / "out", **QUIET)

    assert [r["key"] for r in read_all(tmp_path / "out")] == wds.keys[:3]
    assert skipped_counts(manifest) == {"truncated_tar": 1}
    assert "end-of-archive" in manifest["skipped_examples"]["truncated_tar"][0]


def test_input_patterns_expand_like_the_shell(tmp_path):
    assert expand_braces("d/{00008..00011}.tar") == [f"d/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    wds = fx.make_webdataset(tmp_path / "tars", 6, shards=3)
    names = [str(p) for p in wds.tars]
    assert resolve_tars(wds.pattern) == names
    assert resolve_tars(f"{tmp_path}/tars/*.tar") == names
    assert resolve_tars(str(tmp_path / "tars")) == names
    assert resolve_tars(f"{names[2]}::{names[0]}") == [names[2], names[0]]
    with pytest.raises(convert.ConversionError, match="2 of the 5 tar files .* do not exist"):
        resolve_tars(f"{tmp_path}/tars/{{00000..00004}}.tar")


# --- Image folders -----------------------------------------------------------------------------


@pytest.mark.parametrize("captions_format", ["csv", "jsonl"])
def test_image_folder_with_a_captions_file(tmp_path, captions_format):
    folder = fx.make_image_folder(
        tmp_path / "src",
        9,
        captions_format,
        captions_per_image=2,
        corrupt=[2],
        empty_captions=[3],
        missing_files=[5],
        image_size=(40, 60),
        fmt="png",
    )
    manifest = convert.image_folder(
        folder.root,
        tmp_path / "out",
        captions_file=folder.captions_file,
        options=ImageOptions(max_side=30, resize_side="longer"),
        records_per_shard=2,
        **QUIET,
    )
    got = read_all(tmp_path / "out")

    assert [r["key"] for r in got] == folder.expected_keys
    assert [r["captions"] for r in got] == [folder.captions[k] for k in folder.expected_keys]
    assert len(manifest["shards"]) == 5  # 9 listed rows, at most 2 per shard
    assert skipped_counts(manifest) == {reason: len(v) for reason, v in folder.skipped.items()}
    assert manifest["input_records"] == 9
    assert all(pixels(r["image"]).shape == (30, 20, 3) for r in got)  # longer side 60 -> 30


def test_captions_file_rows_of_one_image_merge_and_bad_rows_are_skipped(tmp_path):
    folder = fx.make_image_folder(tmp_path / "src", 2, "jsonl")
    first, second = folder.keys
    lines = [
        json.dumps({"path": first, "caption": "one"}),
        "{not json",
        json.dumps({"image": second, "captions": ["three", "four"]}),
        json.dumps({"path": first, "caption": "two"}),
        json.dumps({"caption": "no path"}),
    ]
    captions_file = tmp_path / "src" / "pairs.jsonl"
    captions_file.write_text("\n".join(lines) + "\n")

    manifest = convert.image_folder(
        None, tmp_path / "out", captions_file=captions_file, **QUIET
    )  # paths are relative to the captions file's folder by default

    got = read_all(tmp_path / "out")
    assert [(r["key"], r["captions"]) for r in got] == [
        (first, ["one", "two"]),
        (second, ["three", "four"]),
    ]
    assert skipped_counts(manifest) == {"bad_caption_entry": 2}
    assert any("pairs.jsonl:2" in e for e in manifest["skipped_examples"]["bad_caption_entry"])


def test_class_folders_become_labels_in_sorted_class_order(tmp_path):
    folder = fx.make_class_folder(tmp_path / "src", ["white", "red", "green"], per_class=2)
    manifest = convert.image_folder(folder.root, tmp_path / "out", num_shards=2, **QUIET)
    got = read_all(tmp_path / "out")

    assert manifest["label_names"] == ["green", "red", "white"]
    assert manifest["fields"] == ["key", "image", "captions", "label"]
    assert [(r["key"], r["label"]) for r in got] == [(k, folder.labels[k]) for k in folder.keys]
    assert all(r["captions"] == [] for r in got)
    # Each record holds its own file's picture (a scene coloured like its class).
    classes = ["white", "red", "green"]
    for record in got:
        name, k = record["key"].split("/")[0], int(record["key"][-7:-4])
        image = pixels(record["image"])  # re-encoded as JPEG: compare loosely
        distance = [
            np.abs(image - np.asarray(fx.example(classes.index(name) * 2 + k, (40, 40), c)[0]))
            .astype(np.float32)
            .mean()
            for c in range(len(fx.CLASS_NAMES))
        ]
        assert np.argmin(distance) == fx.CLASS_NAMES.index(name) and min(distance) < 5


# --- TFDS --------------------------------------------------------------------------------------


def test_tfds_dataset_converts_each_split_with_captions_and_class_names(tmp_path):
    tiny = fx.make_tfds_dataset(tmp_path / "tfds", captions="coco", splits={"train": 5, "test": 3})

    manifests = convert.tfds(tiny.name, tmp_path / "out", data_dir=str(tiny.data_dir), **QUIET)

    assert set(manifests) == {"train", "test"}
    for split, count in tiny.splits.items():
        manifest = records.load_manifest(tmp_path / "out" / split)
        assert manifest["count"] == count and manifest["split"] == split
        assert manifest["label_names"] == list(fx.CLASS_NAMES)
        assert manifest["source"]["text_feature"] == "captions/text"
        got = read_all(tmp_path / "out" / split)
        assert [(r["captions"], r["label"]) for r in got] == tiny.examples[split]
        assert [r["key"] for r in got] == [f"{split}/{i}" for i in range(count)]


def test_tfds_dataset_with_labels_only_needs_no_captions(tmp_path):
    tiny = fx.make_tfds_dataset(tmp_path / "tfds", "tiny_labels", captions=None)

    manifests = convert.tfds(
        tiny.name, tmp_path / "out", splits=["test"], data_dir=str(tiny.data_dir), **QUIET
    )

    assert list(manifests) == ["test"] and not (tmp_path / "out" / "train").exists()
    got = read_all(tmp_path / "out" / "test")
    assert [r["label"] for r in got] == [label for _, label in tiny.examples["test"]]
    assert all(r["captions"] == [] for r in got)
    with pytest.raises(convert.ConversionError, match="not a Text .* feature"):
        convert.tfds(tiny.name, tmp_path / "x", data_dir=str(tiny.data_dir), text_feature="label")


# --- Resume and determinism --------------------------------------------------------------------


def _folder_dataset(tmp_path):
    return fx.make_image_folder(tmp_path / "src", 8, "csv", corrupt=[3], image_size=(64, 48))


def test_a_rerun_after_losing_a_shard_and_the_manifest_rewrites_only_what_is_missing(tmp_path):
    folder = _folder_dataset(tmp_path)
    out = tmp_path / "out"
    kwargs = dict(captions_file=folder.captions_file, num_shards=4, **QUIET)
    first = convert.image_folder(folder.root, out, **kwargs)
    shards = [out / s["file"] for s in first["shards"]]
    kept_mtimes = {p: p.stat().st_mtime_ns for p in shards[1:]}
    (out / records.MANIFEST).unlink()  # as if killed before the end ...
    shards[0].unlink()
    shards[0].with_name(shards[0].name + ".tmp").write_bytes(b"half a shard")

    second = convert.image_folder(folder.root, out, **kwargs)

    assert second["content_hash"] == first["content_hash"]
    assert second["skipped"] == first["skipped"] and second["count"] == first["count"] == 7
    assert {p: p.stat().st_mtime_ns for p in shards[1:]} == kept_mtimes  # not rewritten
    assert shards[0].is_file() and not shards[0].with_name(shards[0].name + ".tmp").exists()


def test_parallel_and_serial_conversions_write_identical_shards(tmp_path):
    folder = _folder_dataset(tmp_path)
    kwargs = dict(captions_file=folder.captions_file, num_shards=3, name="shapes", **QUIET)
    serial = convert.image_folder(folder.root, tmp_path / "serial", workers=1, **kwargs)
    parallel = convert.image_folder(folder.root, tmp_path / "parallel", workers=2, **kwargs)
    assert parallel["content_hash"] == serial["content_hash"]
    assert parallel["shards"] == serial["shards"]


def test_a_rerun_with_other_options_is_refused_instead_of_mixing_shards(tmp_path):
    folder = _folder_dataset(tmp_path)
    kwargs = dict(captions_file=folder.captions_file, **QUIET)
    convert.image_folder(folder.root, tmp_path / "out", **kwargs)
    with pytest.raises(convert.ConversionError, match="different inputs or options"):
        convert.image_folder(
            folder.root, tmp_path / "out", options=ImageOptions(max_side=16), **kwargs
        )
    with pytest.raises(convert.ConversionError, match="different inputs or options"):
        convert.image_folder(folder.root, tmp_path / "out", num_shards=2, **kwargs)


def test_input_where_every_record_is_bad_is_an_error_naming_the_reasons(tmp_path):
    folder = fx.make_image_folder(tmp_path / "src", 3, "csv", image_size=(48, 32))
    with pytest.raises(
        convert.ConversionError, match="(?s)No usable record.*decompression_bomb: 3"
    ):
        convert.image_folder(
            folder.root,
            tmp_path / "out",
            captions_file=folder.captions_file,
            options=ImageOptions(max_pixels=1000),  # 48 x 32 = 1536 pixels each
            **QUIET,
        )


# --- Image re-encoding -------------------------------------------------------------------------


def test_reencoding_bounds_the_side_keeps_small_jpegs_and_never_upscales():
    image, _, _ = fx.example(0, (120, 80))
    jpeg, png = fx.encode(image, "jpg"), fx.encode(image, "png")
    options = ImageOptions(max_side=40)

    assert Image.open(io.BytesIO(reencode_image(jpeg, options))).size == (60, 40)
    longer = ImageOptions(max_side=40, resize_side="longer")
    assert Image.open(io.BytesIO(reencode_image(jpeg, longer))).size == (40, 27)
    assert reencode_image(jpeg, ImageOptions(max_side=80)) == jpeg  # already small: untouched
    small_png = reencode_image(png, ImageOptions(max_side=200))
    assert Image.open(io.BytesIO(small_png)).format == "JPEG"
    assert Image.open(io.BytesIO(small_png)).size == (120, 80)  # not upscaled


def test_reencoding_applies_the_exif_rotation():
    image, _, _ = fx.example(1, (60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif)
    out = Image.open(io.BytesIO(reencode_image(buffer.getvalue(), ImageOptions(max_side=256))))
    assert out.size == (40, 60)
    upright = np.asarray(image.transpose(Image.Transpose.ROTATE_270), np.float32)
    assert np.abs(np.asarray(out, np.float32) - upright).mean() < 6.0


# --- Command line ------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "launch/prepare_data.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_command_line_converts_a_webdataset_and_prints_the_skip_report(tmp_path):
    wds = fx.make_webdataset(tmp_path / "tars", 6, shards=2, corrupt=[0])
    out = run_cli(
        "--source=webdataset",
        f"--input={wds.pattern}",
        f"--output={tmp_path / 'out'}",
        "--workers=1",
        "--progress=false",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "5 records in 2 shards (of 6 read" in out.stdout
    assert "undecodable_image: 1" in out.stdout
    assert records.load_manifest(tmp_path / "out")["name"] == "out"


def test_command_line_errors_say_what_is_missing(tmp_path):
    out = run_cli("--source=webdataset", f"--output={tmp_path}")
    assert out.returncode != 0 and "--source=webdataset needs --input" in out.stderr
    out = run_cli("--source=folder", f"--input={tmp_path / 'nowhere'}", f"--output={tmp_path}")
    assert out.returncode != 0 and "is not a directory" in out.stderr
    out = run_cli("--source=tfds", "--tfds_name=cifar10", f"--tfds_data_dir={tmp_path}/none")
    assert out.returncode != 0 and "--output is required" in out.stderr
    out = run_cli(
        "--source=tfds", "--tfds_name=cifar10", f"--tfds_data_dir={tmp_path}", "--output=o"
    )
    assert out.returncode != 0 and "--file_format=array_record" in out.stderr
    assert not os.path.exists(ROOT / "o")
