"""The on-disk record format and the image helpers, against independent references."""

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from jaxclip.data import images, records


def _encoded(n, labels=True):
    return [
        records.encode_record(
            f"k{i}", bytes([i]) * (i + 1), [f"c{i}", f"d{i}"], i % 3 if labels else None
        )
        for i in range(n)
    ]


def test_round_trip_across_shards(tmp_path):
    manifest = records.write_dataset(
        tmp_path, _encoded(25), name="toy", num_shards=3, label_names=["a", "b", "c"]
    )
    assert manifest["count"] == 25
    assert [s["count"] for s in manifest["shards"]] == [8, 8, 9]
    assert manifest["fields"] == ["key", "image", "captions", "label"]
    on_disk = json.loads((tmp_path / records.MANIFEST).read_text())
    assert on_disk == manifest
    # A pickled source (as grain workers receive it) reads the same records.
    source = pickle.loads(pickle.dumps(records.RecordsSource(tmp_path)))
    assert len(source) == 25 and source.label_names == ["a", "b", "c"]
    for i in range(25):
        item = source[i]
        assert item["read_error"] == ""
        record = records.decode_record(item["raw"])
        assert record == {
            "key": f"k{i}",
            "image": bytes([i]) * (i + 1),
            "captions": [f"c{i}", f"d{i}"],
            "label": i % 3,
        }
    assert (source[8]["shard"], source[8]["position"]) == ("data-00001-of-00003.array_record", 0)
    with pytest.raises(IndexError):
        source[25]


def test_content_hash_is_deterministic_and_content_sensitive(tmp_path):
    a = records.write_dataset(tmp_path / "a", _encoded(10), name="x", num_shards=2)
    b = records.write_dataset(tmp_path / "b", _encoded(10), name="x", num_shards=2)
    c = records.write_dataset(tmp_path / "c", _encoded(11)[1:], name="x", num_shards=2)
    assert a["content_hash"] == b["content_hash"] != c["content_hash"]


def test_truncated_shard_gives_read_errors_not_exceptions(tmp_path):
    records.write_dataset(tmp_path, _encoded(20), name="toy", num_shards=2)
    shard = tmp_path / "data-00001-of-00002.array_record"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    source = records.RecordsSource(tmp_path)
    assert records.decode_record(source[9]["raw"])["key"] == "k9"  # first shard intact
    bad = source[10]
    assert bad["raw"] == b"" and "truncated or corrupt" in bad["read_error"]


def test_decode_record_names_the_problem():
    with pytest.raises(records.RecordError, match="msgpack"):
        records.decode_record(b"\xc1garbage")
    import msgpack

    with pytest.raises(records.RecordError, match="captions"):
        records.decode_record(msgpack.packb({"key": "a", "image": b"x"}))
    with pytest.raises(records.RecordError, match="list of strings"):
        records.decode_record(msgpack.packb({"key": "a", "image": b"x", "captions": "one"}))


def test_missing_and_unfinished_datasets_explain_the_fix(tmp_path):
    with pytest.raises(records.DatasetError, match="prepare_data.py"):
        records.RecordsSource(tmp_path / "nowhere")
    records.write_dataset(tmp_path / "d", _encoded(4), name="toy", num_shards=2)
    (tmp_path / "d" / records.MANIFEST).unlink()
    with pytest.raises(records.DatasetError, match="did not finish"):
        records.RecordsSource(tmp_path / "d")
    records.write_dataset(tmp_path / "e", _encoded(4), name="toy", num_shards=2)
    (tmp_path / "e" / "data-00000-of-00002.array_record").unlink()
    with pytest.raises(records.DatasetError, match="missing"):
        records.RecordsSource(tmp_path / "e")


def _jpeg(array, quality=95):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _smooth(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)


def test_decode_refuses_bad_images_with_reasons():
    good = _jpeg(_smooth(60, 80))
    assert images.decode_image(good).size == (80, 60)
    with pytest.raises(images.ImageError, match="truncated"):
        images.decode_image(good[: len(good) // 2])
    with pytest.raises(images.ImageError, match="cannot decode"):
        images.decode_image(b"not an image")
    with pytest.raises(images.ImageError, match="empty"):
        images.decode_image(b"")
    # The bomb check uses the header only: 60*80 pixels against a limit of 1000.
    with pytest.raises(images.ImageError, match="decompression bomb"):
        images.decode_image(good, max_pixels=1000)


def test_center_crop_matches_resize_then_slice():
    image = Image.fromarray(_smooth(90, 150))
    got = images.resize_center_crop(image, 48).astype(int)
    # Independent reference: resize the whole image so the short side is 48, slice the centre.
    full = np.asarray(image.resize((80, 48), Image.Resampling.BICUBIC)).astype(int)
    reference = full[:, 16:64]
    assert got.shape == (48, 48, 3)
    assert np.abs(got - reference).max() <= 2


def test_random_resized_crop_box_respects_bounds():
    rng = np.random.default_rng(0)
    for _ in range(500):
        w, h = int(rng.integers(10, 400)), int(rng.integers(10, 400))
        left, top, cw, ch = images.random_resized_crop_box(w, h, rng, (0.3, 1.0))
        assert left >= 0 and top >= 0 and cw > 0 and ch > 0
        assert left + cw <= w and top + ch <= h
    # With scale (1, 1) and a square image the crop is the whole image.
    assert images.random_resized_crop_box(50, 50, rng, (1.0, 1.0), (1.0, 1.0)) == (0, 0, 50, 50)
    crop = images.random_resized_crop(Image.fromarray(_smooth(40, 40)), 16, rng)
    assert crop.shape == (16, 16, 3) and crop.dtype == np.uint8


def test_random_resized_crop_flip_mirrors_the_same_crop():
    """The flip mirrors exactly the crop drawn without it: same generator state, same box,
    columns reversed (PIL's transpose against NumPy's reversed view)."""
    image = Image.fromarray(_smooth(60, 50))
    flipped = 0
    for seed in range(16):
        with_flip = images.random_resized_crop(image, 24, np.random.default_rng(seed), flip=True)
        plain = images.random_resized_crop(image, 24, np.random.default_rng(seed), flip=False)
        mirrored = np.random.default_rng(seed)
        images.random_resized_crop_box(*image.size, mirrored, (0.9, 1.0), (3 / 4, 4 / 3))
        if mirrored.random() < 0.5:
            flipped += 1
            np.testing.assert_array_equal(with_flip, plain[:, ::-1])
        else:
            np.testing.assert_array_equal(with_flip, plain)
    assert 0 < flipped < 16
