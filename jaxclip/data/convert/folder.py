"""Image folders: images plus a captions file, or one subfolder of images per class.

Captions file (`--captions_file`), one entry per image:

- CSV (`.csv`, or `.tsv` with tabs): `path,caption[,caption...]`; a first row whose first cell
  is a column name (path, image, file, filename, filepath, image_path) is a header.
- JSONL (`.jsonl`/`.json`): one object per line with `path` (or `image`, `file`, `filepath`)
  and `caption` (a string) or `captions` (a list).

Paths are relative to `--input` (default: the captions file's folder) unless absolute. Rows
naming the same image are merged into one record with all their captions, in file order (COCO-
style files list one caption per row). The key of a record is its path as written.

Class folders (no captions file): `--input/<class>/.../*.jpg`; labels index the class names
in sorted order, which the manifest stores as `label_names`. Records have no captions.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

from jaxclip.data.convert.source import ConversionError, Example, Skip, split_evenly

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PATH_COLUMNS = ("path", "image", "file", "filename", "filepath", "image_path")

# A row: (key = path as written, captions, parse error or "") -- errors become skips in the
# worker that writes the row's shard, so that skip counts live with the shards.
Row = tuple[str, list[str], str]


def _read_csv(path: Path) -> list[tuple[str, list[str], str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, cells in enumerate(csv.reader(f, delimiter=delimiter), start=1):
            if not cells or not any(c.strip() for c in cells):
                continue
            if line_no == 1 and cells[0].strip().lower() in PATH_COLUMNS:
                continue  # header
            where = f"{path.name}:{line_no}"
            if not cells[0].strip():
                rows.append((where, [], "no image path in the first column"))
            else:
                rows.append((cells[0].strip(), cells[1:], ""))
    return rows


def _read_jsonl(path: Path) -> list[tuple[str, list[str], str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{line_no}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((where, [], f"not JSON ({e})"))
                continue
            if not isinstance(item, dict):
                rows.append((where, [], "not a JSON object"))
                continue
            image = next((item[k] for k in PATH_COLUMNS if isinstance(item.get(k), str)), None)
            if not image:
                rows.append((where, [], f"no image path (one of {', '.join(PATH_COLUMNS)})"))
                continue
            captions = item.get("captions", item.get("caption", item.get("text", [])))
            if isinstance(captions, str):
                captions = [captions]
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                rows.append((where, [], "'captions' must be a string or a list of strings"))
                continue
            rows.append((image, captions, ""))
    return rows


def read_captions_file(path: str | os.PathLike) -> list[Row]:
    """Rows of a CSV/TSV/JSONL captions file, duplicates of a path merged, in file order."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"--captions_file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        parsed = _read_csv(path)
    elif suffix in (".jsonl", ".json"):
        parsed = _read_jsonl(path)
    else:
        raise ConversionError(
            f"--captions_file {path}: unknown format {suffix!r}; use .csv, .tsv or .jsonl"
        )
    merged: dict[tuple, Row] = {}
    for line, (key, captions, error) in enumerate(parsed):
        slot = ("error", line) if error else ("path", key)
        if slot in merged:
            merged[slot][1].extend(captions)
        else:
            merged[slot] = (key, list(captions), error)
    if not merged:
        raise ConversionError(f"--captions_file {path} lists no image")
    return list(merged.values())


class CaptionedFolderSource:
    """Images named by a captions file."""

    kind = "folder"
    has_text = True
    label_names = None

    def __init__(self, root: str | os.PathLike | None, captions_file: str | os.PathLike):
        self.captions_file = os.path.abspath(captions_file)
        self.root = os.path.abspath(root) if root else os.path.dirname(self.captions_file)
        if not os.path.isdir(self.root):
            raise ConversionError(f"--input {self.root} is not a directory")
        self.rows = read_captions_file(self.captions_file)

    def plan(self, num_shards: int, records_per_shard: int) -> list[list[Row]]:
        return split_evenly(self.rows, num_shards, records_per_shard)

    def read(self, task: list[Row]) -> Iterator[Example | Skip]:
        for key, captions, error in task:
            if error:
                yield Skip("bad_caption_entry", key, error)
                continue
            path = os.path.join(self.root, key)
            try:
                with open(path, "rb") as f:
                    image = f.read()
            except FileNotFoundError:
                yield Skip("missing_pair_member", key, f"captioned, but {path} does not exist")
                continue
            except OSError as e:
                yield Skip("undecodable_image", key, f"cannot read {path}: {e}")
                continue
            yield Example(key=key, image=image, captions=captions)

    def describe(self) -> dict:
        return {
            "type": self.kind,
            "root": self.root,
            "captions_file": self.captions_file,
            "images_listed": len(self.rows),
        }

    def __getstate__(self):  # workers get their rows with the task, not the whole list
        return {**self.__dict__, "rows": None}


class ClassFolderSource:
    """`root/<class>/**/<image>`: labelled images, class names sorted."""

    kind = "class_folder"
    has_text = False

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(root)
        if not os.path.isdir(self.root):
            raise ConversionError(f"--input {self.root} is not a directory")
        classes = sorted(
            p.name for p in Path(self.root).iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not classes:
            raise ConversionError(
                f"--input {self.root} has no class subfolders. For images with captions, pass "
                f"--captions_file (CSV or JSONL: path, caption); for classification data, put "
                f"each class's images in a subfolder named after the class."
            )
        self.label_names = classes
        self.items: list[tuple[str, int]] = []
        for label, name in enumerate(classes):
            files = sorted(
                p.relative_to(self.root).as_posix()
                for p in (Path(self.root) / name).rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            self.items += [(f, label) for f in files]
        if not self.items:
            raise ConversionError(
                f"the class subfolders of {self.root} hold no images ({', '.join(IMAGE_SUFFIXES)})"
            )

    def plan(self, num_shards: int, records_per_shard: int) -> list[list[tuple[str, int]]]:
        return split_evenly(self.items, num_shards, records_per_shard)

    def read(self, task: list[tuple[str, int]]) -> Iterator[Example | Skip]:
        for key, label in task:
            try:
                with open(os.path.join(self.root, key), "rb") as f:
                    image = f.read()
            except OSError as e:
                yield Skip("undecodable_image", key, f"cannot read: {e}")
                continue
            yield Example(key=key, image=image, captions=[], label=label)

    def describe(self) -> dict:
        return {"type": self.kind, "root": self.root, "classes": len(self.label_names)}

    def __getstate__(self):  # workers get their files with the task, not the whole list
        return {**self.__dict__, "items": None}
