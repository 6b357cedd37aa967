"""Real, small data sources built on disk for tests: the formats users bring, not mocks.

Every image is a rendered shapes-world scene with ONE object (`jaxclip.data.shapes`,
split "val", `single_object=True`), so its content varies per example and carries a known
class: `label` is the object's colour index into `CLASS_NAMES` (= `shapes.COLOURS`), and the
caption is a shapes-world caption (words of the shapes tokenizer). A model trained on the
shapes world can therefore classify these images zero-shot.

Helpers (each returns a small dataclass saying what was written and what a converter should
keep or skip):

- `make_webdataset(dir, n, shards=2, ...)`: img2dataset-style tar shards `00000.tar`, ...
  holding `000000001.jpg` + `.txt` and/or `.json` (img2dataset's json: caption, url, key,
  status, sizes), with optional corrupt images, decompression bombs, empty captions, missing
  pair members and a truncated last tar.
- `make_image_folder(dir, n, captions_format="csv"|"jsonl", ...)`: images plus a captions
  file (CSV rows `path,caption[,caption...]` with a header, or JSONL objects with `path` and
  `caption`/`captions`).
- `make_class_folder(dir, classes, per_class)`: one subfolder of images per class.
- `make_tfds_dataset(data_dir, name, ...)`: a TFDS dataset prepared in the `array_record`
  file format by a `GeneratorBasedBuilder` defined here, readable with `tfds.data_source` and
  `tfds.builder(name, data_dir=...).info` WITHOUT TensorFlow: features `image` (PNG/JPEG
  bytes, which TFDS stores without TensorFlow), `label` (ClassLabel with names) and
  optionally `captions` (Sequence(Text), or COCO-style Sequence({"id", "text"})).
- `bomb_png(width, height)`: a valid PNG header declaring a huge image over a tiny body,
  the shape of a decompression bomb, for testing that it is refused before decoding.
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import tarfile
import types
import zlib
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from jaxclip.data import shapes

CLASS_NAMES: tuple[str, ...] = shapes.COLOURS
_WORLD_SEED = 1234


# --- Images ---------------------------------------------------------------------------------


def example(index: int, size: tuple[int, int] = (48, 32), colour: int | None = None):
    """(PIL RGB image of `size` (w, h), caption, colour label) of shapes-world scene `index`.

    With `colour`, the scene is re-rendered with its object in that colour (class folders).
    """
    world = shapes.ShapesWorld(
        split="val",
        num_examples=index + 1,
        image_size=max(size),
        seed=_WORLD_SEED,
        max_objects=1,
        caption_style="short",
        single_object=True,
    )
    scene = world.scene(index)
    caption = world.caption(index)
    if colour is not None and colour != scene.main.colour:
        rgb = tuple(float(v) for v in shapes.COLOUR_RGB[colour])
        main = dataclasses.replace(scene.main, colour=colour, rgb=rgb)
        scene = dataclasses.replace(scene, objects=[main, *scene.objects[1:]])
        caption = f"a photo of a {shapes.object_phrase(main)}"
    pixels, _, _ = shapes.render(scene, max(size))
    image = Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)
    return image, caption, int(scene.main.colour)


def encode(image: Image.Image, fmt: str = "jpg") -> bytes:
    """Image bytes in `fmt` (jpg, jpeg, png, webp)."""
    pil_format = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format, **({"quality": 90} if pil_format == "JPEG" else {}))
    return buffer.getvalue()


def corrupt_image_bytes(index: int) -> bytes:
    """A JPEG header followed by garbage: PIL identifies it, then fails to decode it."""
    rng = np.random.default_rng(index)
    return b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 600, dtype=np.uint8).tobytes()


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A PNG declaring width x height pixels (900 M by default) over a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    body = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


# --- Webdataset (img2dataset layout) -----------------------------------------------------------


@dataclasses.dataclass
class WebdatasetFixture:
    tars: list[Path]
    pattern: str  # brace pattern covering every tar, e.g. DIR/{00000..00001}.tar
    keys: list[str]  # every sample key, in order
    captions: dict[str, str]  # key -> caption written (possibly empty)
    labels: dict[str, int]  # key -> colour class of the image
    expected_keys: list[str]  # keys a converter must keep, in order
    skipped: dict[str, list[str]]  # reason -> keys a converter must skip for it
    truncated_tar: Path | None = None


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def make_webdataset(
    directory,
    n: int,
    shards: int = 2,
    *,
    corrupt: Collection[int] = (),
    bombs: Collection[int] = (),
    empty_captions: Collection[int] = (),
    missing_text: Collection[int] = (),
    missing_image: Collection[int] = (),
    truncate_last: bool = False,
    image_size: tuple[int, int] = (48, 32),
    fmt: str = "jpg",
    json_captions: bool = False,
    txt_captions: bool = True,
) -> WebdatasetFixture:
    """`n` samples over `shards` tars `00000.tar` ... in `directory`, as img2dataset writes them.

    Sample i has key f"{shard:05d}{position:04d}". Indices in `corrupt` get undecodable image
    bytes, in `bombs` a decompression-bomb PNG, in `empty_captions` a whitespace caption, in
    `missing_text` no caption member, in `missing_image` no image member. `truncate_last`
    cuts the last tar in the middle of the image of its middle sample: that sample and all
    after it in that tar are lost (reported once as a truncated tar).
    """
    if not (txt_captions or json_captions):
        raise ValueError("write captions as .txt, .json or both")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bounds = [n * s // shards for s in range(shards + 1)]
    fixture = WebdatasetFixture(
        [], f"{directory}/{{00000..{shards - 1:05d}}}.tar", [], {}, {}, [], {}
    )
    for s in range(shards):
        path = directory / f"{s:05d}.tar"
        cut_key, cut_offset = None, None
        middle = (bounds[s] + bounds[s + 1]) // 2
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(bounds[s], bounds[s + 1]):
                key = f"{s:05d}{i - bounds[s]:04d}"
                image, caption, label = example(i, image_size)
                if i in empty_captions:
                    caption = "  "
                data = encode(image, fmt)
                if i in corrupt:
                    data = corrupt_image_bytes(i)
                if i in bombs:
                    data, ext = bomb_png(), "png"
                else:
                    ext = fmt
                fixture.keys.append(key)
                fixture.captions[key] = caption
                fixture.labels[key] = label
                if truncate_last and s == shards - 1 and i == middle:
                    cut_key = key
                    cut_offset = tar.offset + 512 + len(data) // 2  # inside the image data
                if i not in missing_image:
                    _add_member(tar, f"{key}.{ext}", data)
                if i not in missing_text:
                    if txt_captions:
                        _add_member(tar, f"{key}.txt", caption.encode())
                    if json_captions:
                        meta = {
                            "caption": caption,
                            "url": f"https://example.com/{key}.{ext}",
                            "key": key,
                            "status": "success",
                            "error_message": None,
                            "width": image_size[0],
                            "height": image_size[1],
                            "original_width": image_size[0] * 4,
                            "original_height": image_size[1] * 4,
                        }
                        _add_member(tar, f"{key}.json", json.dumps(meta).encode())
        if cut_offset is not None:
            with open(path, "r+b") as f:
                f.truncate(cut_offset)
            fixture.truncated_tar = path
            lost = fixture.keys[fixture.keys.index(cut_key) :]
        else:
            lost = []
        fixture.tars.append(path)
        for i in range(bounds[s], bounds[s + 1]):
            key = fixture.keys[i]
            reason = _webdataset_skip_reason(
                i, corrupt, bombs, empty_captions, missing_text, missing_image
            )
            if key in lost:
                continue
            if reason:
                fixture.skipped.setdefault(reason, []).append(key)
            else:
                fixture.expected_keys.append(key)
        if lost:
            fixture.skipped.setdefault("truncated_tar", []).append(str(path))
    return fixture


def _webdataset_skip_reason(i, corrupt, bombs, empty_captions, missing_text, missing_image):
    if i in missing_text or i in missing_image:
        return "missing_pair_member"
    if i in empty_captions:
        return "empty_caption"
    if i in bombs:
        return "decompression_bomb"
    if i in corrupt:
        return "undecodable_image"
    return None


# --- Image folders ----------------------------------------------------------------------------


@dataclasses.dataclass
class FolderFixture:
    root: Path
    captions_file: Path | None
    keys: list[str]  # relative image paths, in captions-file (or class, then name) order
    captions: dict[str, list[str]]
    labels: dict[str, int]
    label_names: list[str] | None
    expected_keys: list[str]
    skipped: dict[str, list[str]]


def make_image_folder(
    directory,
    n: int,
    captions_format: str = "csv",
    *,
    captions_per_image: int = 1,
    corrupt: Collection[int] = (),
    empty_captions: Collection[int] = (),
    missing_files: Collection[int] = (),
    image_size: tuple[int, int] = (48, 32),
    fmt: str = "jpg",
) -> FolderFixture:
    """Images under `directory`/images/ (two subfolders) and `directory`/captions.{csv,jsonl}.

    CSV: a header `path,caption[,caption_2...]` then one row per image; JSONL: one object per
    line, `{"path", "caption"}` or with several captions `{"path", "captions": [...]}`.
    Indices in `missing_files` are listed but their image is not written.
    """
    if captions_format not in ("csv", "jsonl"):
        raise ValueError(f"captions_format must be 'csv' or 'jsonl', got {captions_format!r}")
    root = Path(directory)
    fixture = FolderFixture(root, root / f"captions.{captions_format}", [], {}, {}, None, [], {})
    rows = []
    for i in range(n):
        rel = f"images/{'ab'[i % 2]}/img_{i:04d}.{fmt}"
        image, caption, label = example(i, image_size)
        captions = [caption] + [f"{caption} number {k}" for k in range(1, captions_per_image)]
        if i in empty_captions:
            captions = [" "] * captions_per_image
        if i not in missing_files:
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(corrupt_image_bytes(i) if i in corrupt else encode(image, fmt))
        rows.append((rel, captions))
        fixture.keys.append(rel)
        fixture.captions[rel] = captions
        fixture.labels[rel] = label
        reason = (
            "missing_pair_member"
            if i in missing_files
            else "empty_caption"
            if i in empty_captions
            else "undecodable_image"
            if i in corrupt
            else None
        )
        if reason:
            fixture.skipped.setdefault(reason, []).append(rel)
        else:
            fixture.expected_keys.append(rel)
    _write_captions_file(fixture.captions_file, rows, captions_per_image)
    return fixture


def _write_captions_file(path: Path, rows, captions_per_image: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            extra = [f"caption_{k + 1}" for k in range(1, captions_per_image)]
            writer.writerow(["path", "caption", *extra])
            for rel, captions in rows:
                writer.writerow([rel, *captions])
    else:
        with open(path, "w") as f:
            for rel, captions in rows:
                item = {"path": rel}
                if len(captions) == 1:
                    item["caption"] = captions[0]
                else:
                    item["captions"] = captions
                f.write(json.dumps(item) + "\n")


def make_class_folder(
    directory,
    classes: Sequence[str] = CLASS_NAMES[:3],
    per_class: int = 3,
    *,
    image_size: tuple[int, int] = (40, 40),
    fmt: str = "png",
) -> FolderFixture:
    """`directory`/<class>/<class>_<k>.<fmt>: images whose object has the class's colour (the
    class name's colour when it is a shapes colour, else colour number = class position).

    Labels follow the SORTED class names, as a converter must assign them.
    """
    root = Path(directory)
    label_names = sorted(classes)
    fixture = FolderFixture(root, None, [], {}, {}, label_names, [], {})
    for position, name in enumerate(classes):
        colour = CLASS_NAMES.index(name) if name in CLASS_NAMES else position % len(CLASS_NAMES)
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            image, _, _ = example(position * per_class + k, image_size, colour=colour)
            rel = f"{name}/{name}_{k:03d}.{fmt}"
            (root / rel).write_bytes(encode(image, fmt))
            fixture.captions[rel] = []
            fixture.labels[rel] = label_names.index(name)
    fixture.keys = sorted(fixture.labels, key=lambda rel: (fixture.labels[rel], rel))
    fixture.expected_keys = list(fixture.keys)
    return fixture


# --- TFDS (array_record, no TensorFlow) --------------------------------------------------------


@dataclasses.dataclass
class TfdsFixture:
    data_dir: Path
    name: str
    splits: dict[str, int]
    label_names: list[str]
    # split -> list of (caption list, label) in index order, as written
    examples: dict[str, list[tuple[list[str], int]]]


def make_tfds_dataset(
    data_dir,
    name: str = "jaxclip_tiny_shapes",
    *,
    splits: dict[str, int] | None = None,
    captions: str | None = "flat",
    captions_per_image: int = 2,
    image_size: tuple[int, int] = (40, 32),
    fmt: str = "png",
) -> TfdsFixture:
    """Prepares dataset `name` (version 1.0.0) under `data_dir` in the array_record format.

    `captions`: None (image + label only, like cifar10), "flat" (`captions`:
    Sequence(Text)) or "coco" (`captions`: Sequence({"id": int64, "text": Text}), the layout
    of TFDS coco_captions, whose text feature is `captions/text`). Split sizes default to
    {"train": 12, "test": 6}; split "test" uses indices after those of "train".
    """
    import tensorflow_datasets as tfds

    if captions not in (None, "flat", "coco"):
        raise ValueError(f"captions must be None, 'flat' or 'coco', got {captions!r}")
    splits = dict(splits or {"train": 12, "test": 6})
    written: dict[str, list[tuple[list[str], int]]] = {}
    start = 0
    for split, count in splits.items():
        written[split] = []
        for i in range(start, start + count):
            _, caption, label = example(i, image_size)
            caps = [caption] + [f"{caption} seen again {k}" for k in range(1, captions_per_image)]
            written[split].append((caps, label))
        start += count

    features = {
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
    }
    if captions == "flat":
        features["captions"] = tfds.features.Sequence(tfds.features.Text())
    elif captions == "coco":
        features["captions"] = tfds.features.Sequence(
            {"id": np.int64, "text": tfds.features.Text()}
        )

    def info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="jaxclip test fixture: single-object shapes-world scenes.",
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,  # index i of a split is the i-th example generated
        )

    def split_generators(self, dl_manager):
        del dl_manager
        offsets, start = {}, 0
        for split, count in splits.items():
            offsets[split] = start
            start += count
        return {split: self._generate_examples(split, offsets[split]) for split in splits}

    def generate_examples(self, split, offset):
        for j, (caps, label) in enumerate(written[split]):
            image, _, _ = example(offset + j, image_size)
            item = {"image": encode(image, fmt), "label": label}
            if captions == "flat":
                item["captions"] = caps
            elif captions == "coco":
                item["captions"] = [
                    {"id": 1000 * offset + k, "text": c} for k, c in enumerate(caps)
                ]
            yield f"{split}_{j:05d}", item

    body = {
        "name": name,
        "VERSION": tfds.core.Version("1.0.0"),
        "_info": info,
        "_split_generators": split_generators,
        "_generate_examples": generate_examples,
    }
    # Not registered: several tests may define a builder of the same name, and readers find the
    # prepared dataset from its files (tfds.builder(name, data_dir=...) -> ReadOnlyBuilder).
    builder_cls = types.new_class(
        "FixtureBuilder",
        (tfds.core.GeneratorBasedBuilder,),
        {"skip_registration": True},
        lambda ns: ns.update(body),
    )
    tfds.disable_progress_bar()  # keeps test logs readable
    builder = builder_cls(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(verify_ssl=False),
    )
    return TfdsFixture(Path(data_dir), name, splits, list(CLASS_NAMES), written)
