"""Convert the data people have into jaxclip records (see docs/data.md).

    webdataset(...)     img2dataset-style tar shards -> one dataset
    image_folder(...)   images + a CSV/JSONL captions file, or class subfolders -> one dataset
    tfds(...)           a prepared TFDS dataset -> one dataset per split (OUTPUT/<split>)

Each returns the manifest(s) written; `launch/prepare_data.py` is the command line over them.
The format written is described in jaxclip/data/records.py.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from jaxclip.data.convert.folder import CaptionedFolderSource, ClassFolderSource
from jaxclip.data.convert.source import SKIP_REASONS, ConversionError
from jaxclip.data.convert.webdataset import WebdatasetSource
from jaxclip.data.convert.writer import ImageOptions, convert, safe_prefix, skip_report

__all__ = [
    "SKIP_REASONS",
    "ConversionError",
    "ImageOptions",
    "image_folder",
    "safe_prefix",
    "skip_report",
    "tfds",
    "webdataset",
]


def _default_name(output) -> str:
    return Path(os.path.abspath(output)).name


def webdataset(inputs: str | Sequence[str], output, *, name: str | None = None, **kwargs) -> dict:
    """Tars (brace pattern, glob, directory, '::'-joined or a list) -> dataset in `output`."""
    source = WebdatasetSource(inputs)
    return convert(source, output, name=name or _default_name(output), **kwargs)


def image_folder(root, output, *, captions_file=None, name: str | None = None, **kwargs) -> dict:
    """With `captions_file`: captioned images; without: class subfolders with labels."""
    source = (
        CaptionedFolderSource(root, captions_file) if captions_file else ClassFolderSource(root)
    )
    return convert(source, output, name=name or _default_name(output), **kwargs)


def tfds(
    tfds_name: str,
    output,
    *,
    splits: Sequence[str] | None = None,
    data_dir: str | None = None,
    image_feature: str = "image",
    text_feature: str | None = None,
    label_feature: str | None = None,
    name: str | None = None,
    **kwargs,
) -> dict[str, dict]:
    """Every split (or `splits`) of a prepared TFDS dataset -> `output`/<split>."""
    from jaxclip.data.convert.tfds_source import TfdsSource, split_names

    manifests = {}
    for split in splits or split_names(tfds_name, data_dir):
        source = TfdsSource(
            tfds_name,
            split,
            data_dir,
            image_feature=image_feature,
            text_feature=text_feature,
            label_feature=label_feature,
        )
        manifests[split] = convert(
            source,
            Path(output) / safe_prefix(split),
            name=name or tfds_name,
            prefix=f"{name or tfds_name}-{split}",
            extra={"split": split},
            **kwargs,
        )
    return manifests
