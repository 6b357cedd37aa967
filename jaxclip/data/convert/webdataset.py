"""Webdataset tar shards, as img2dataset writes them, read as a stream.

A sample is the run of consecutive tar members sharing a key: the member path up to the
first dot of its file name (`00000/000000001.jpg` -> key `00000/000000001`, extension `jpg`).
The image is the `jpg`, `jpeg`, `png` or `webp` member; captions come from `txt` and from the
`json` member's "caption" string or "captions" list (duplicates dropped). Other members
(img2dataset's parquet-derived metadata, `.cls`, ...) are ignored.

Each output shard gathers whole input tars, in order, so every tar is read once, start to end,
by one worker (`tarfile` in stream mode: no seeking, gzip works too). A truncated or damaged tar
yields the samples before the damage and one `truncated_tar` skip naming it. A tar that simply
stops at a member boundary is caught by its missing end-of-archive blocks.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from jaxclip.data.convert.source import ConversionError, Example, Skip

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "json")
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_END_OF_ARCHIVE = 1024  # two zero blocks close every well-formed tar


def expand_braces(pattern: str) -> list[str]:
    """Shell-style braces: `{00000..00012}` (zero-padded ranges) and `{a,b}`, any number."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        start, stop = numeric.groups()
        if int(stop) < int(start):
            raise ConversionError(f"empty range {{{body}}} in {pattern!r}")
        width = len(start) if start.startswith("0") or len(start) == len(stop) else 0
        options = [f"{i:0{width}d}" for i in range(int(start), int(stop) + 1)]
    elif "," in body:
        options = body.split(",")
    else:  # not a brace expression: a literal part of the path
        return [f"{head}{{{body}}}{rest}" for rest in expand_braces(tail)]
    return [p for option in options for p in expand_braces(head + option + tail)]


def resolve_tars(inputs: str | Sequence[str]) -> list[str]:
    """Tar paths from a brace pattern, a glob, a directory, or several joined by '::' (or a
    list). A brace pattern names files that must all exist; a glob takes what exists."""
    specs = inputs.split("::") if isinstance(inputs, str) else list(inputs)
    paths: list[str] = []
    for spec in (str(s).strip() for s in specs):
        if not spec:
            continue
        if os.path.isdir(spec):
            found = sorted(
                str(p) for p in Path(spec).iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz"))
            )
            if not found:
                raise ConversionError(f"--input directory {spec} holds no .tar files")
            paths += found
            continue
        for expanded in expand_braces(spec):
            if glob.has_magic(expanded):
                matched = sorted(glob.glob(expanded))
                if not matched:
                    raise ConversionError(f"--input glob {expanded!r} matches no file")
                paths += matched
            else:
                paths.append(expanded)
    if not paths:
        raise ConversionError(
            "--input names no tar file; give a brace pattern such as "
            "'/data/cc3m/{00000..00331}.tar', a glob, a directory, or paths joined by '::'"
        )
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ConversionError(
            f"{len(missing)} of the {len(paths)} tar files named by --input do not exist, e.g. "
            f"{missing[0]}. img2dataset leaves no tar for a failed shard: list only the files "
            f"that exist (a glob such as DIR/*.tar takes whatever is there)."
        )
    return paths


def split_member_name(name: str) -> tuple[str, str]:
    """('dir/000000001', 'jpg') from 'dir/000000001.jpg'; the extension is lower-cased."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, extension.lower() if dot else ""


def _captions(members: dict[str, bytes], key: str) -> list[str] | Skip:
    captions: list[str] = []
    try:
        if "txt" in members:
            captions.append(members["txt"].decode("utf-8"))
        if "json" in members:
            meta = json.loads(members["json"])
            listed = meta.get("captions") if isinstance(meta, dict) else None
            single = meta.get("caption") if isinstance(meta, dict) else None
            if isinstance(listed, list):
                captions += [c for c in listed if isinstance(c, str)]
            if isinstance(single, str):
                captions.append(single)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return Skip("bad_caption_entry", key, f"{type(e).__name__}: {e}")
    unique = [c for i, c in enumerate(captions) if c.strip() and c not in captions[:i]]
    return unique or [""]  # the writer reports an empty caption


def _sample(key: str, members: dict[str, bytes]) -> Example | Skip:
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    has_text = any(e in members for e in TEXT_EXTENSIONS)
    if image_ext is None or not has_text:
        have = ", ".join(sorted(members))
        lacks = "image (jpg/jpeg/png/webp)" if image_ext is None else "caption (txt/json)"
        return Skip("missing_pair_member", key, f"has {have} but no {lacks} member")
    captions = _captions(members, key)
    if isinstance(captions, Skip):
        return captions
    return Example(key=key, image=members[image_ext], captions=captions)


def _is_compressed(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return head.startswith(_COMPRESSED_MAGIC)


def read_tar(path: str) -> Iterator[Example | Skip]:
    """The samples of one tar, in order; a damaged tar ends with a `truncated_tar` skip."""
    key, members, samples, damage = None, {}, 0, None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, extension = split_member_name(member.name)
                if extension not in IMAGE_EXTENSIONS + TEXT_EXTENSIONS:
                    continue
                if member_key != key:
                    if key is not None:
                        samples += 1
                        yield _sample(key, members)
                    key, members = member_key, {}
                members[extension] = tar.extractfile(member).read()
            end = tar.offset
        if not _is_compressed(path) and os.path.getsize(path) - end < _END_OF_ARCHIVE:
            damage = "ends without the end-of-archive blocks (file cut short)"
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        damage = f"{type(e).__name__}: {e}"
    if key is not None:
        complete = any(e in members for e in IMAGE_EXTENSIONS) and any(
            e in members for e in TEXT_EXTENSIONS
        )
        if damage is None or complete:  # a sample cut by the damage is part of the loss
            samples += 1
            yield _sample(key, members)
    if damage is not None:
        yield Skip("truncated_tar", path, f"{damage}; read the {samples} samples before it")


class WebdatasetSource:
    """img2dataset-style tars -> examples; one output shard per input tar by default."""

    kind = "webdataset"
    has_text = True
    label_names = None

    def __init__(self, inputs: str | Sequence[str]):
        self.tars = resolve_tars(inputs)

    def plan(self, num_shards: int, records_per_shard: int) -> list[list[str]]:
        """Contiguous groups of whole tars (records per shard is unknown before reading)."""
        del records_per_shard
        count = num_shards or len(self.tars)
        if count > len(self.tars):
            raise ConversionError(
                f"--num_shards={count} but the input has {len(self.tars)} tar files; each "
                f"output shard gathers whole tars, so use --num_shards <= {len(self.tars)} "
                f"(0 = one output shard per tar)"
            )
        bounds = [len(self.tars) * i // count for i in range(count + 1)]
        return [self.tars[bounds[i] : bounds[i + 1]] for i in range(count)]

    def read(self, task: list[str]) -> Iterator[Example | Skip]:
        for path in task:
            yield from read_tar(path)

    def describe(self) -> dict:
        return {"type": self.kind, "tars": [os.path.abspath(p) for p in self.tars]}

    def __getstate__(self):  # workers get their tars with the task, not the whole list
        return {**self.__dict__, "tars": None}
