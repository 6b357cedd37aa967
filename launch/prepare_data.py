"""Convert webdataset tars, an image folder or a TFDS dataset into jaxclip training records.

    python launch/prepare_data.py --source webdataset --input '/data/cc3m/{00000..00331}.tar' \\
        --output /data/jaxclip/cc3m
    python launch/prepare_data.py --source folder --input /data/pets \\
        --captions_file /data/pets/captions.csv --output /data/jaxclip/pets
    python launch/prepare_data.py --source folder --input /data/imagenet/val \\
        --output /data/jaxclip/imagenet_val          # class subfolders -> labels
    python launch/prepare_data.py --source tfds --tfds_name cifar10 \\
        --tfds_data_dir ~/tensorflow_datasets --output /data/jaxclip/cifar10   # OUT/train, OUT/test

Images are re-encoded so their shorter side (--resize_side) is at most --max_side pixels;
shards are written in parallel (--workers); rerunning the same command resumes; what was
skipped and why is printed at the end and stored in each manifest. See docs/data.md.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from absl import app, flags  # noqa: E402

SOURCES = ("webdataset", "folder", "tfds")
flags.DEFINE_enum("source", None, SOURCES, "Kind of input.")
flags.DEFINE_string(
    "input",
    None,
    "webdataset: tar files as a brace pattern ('DIR/{00000..00099}.tar'), a glob, a directory "
    "or several joined by '::'. folder: the image folder (class subfolders if no "
    "--captions_file; default with --captions_file: the captions file's folder).",
)
flags.DEFINE_string(
    "captions_file", None, "folder: CSV/TSV (path,caption[,caption...]) or JSONL captions file."
)
flags.DEFINE_string("output", None, "Output directory (TFDS: one subdirectory per split).")
flags.DEFINE_string("name", None, "Dataset name in the manifest (default: output dir name).")
flags.DEFINE_string("tfds_name", None, "tfds: dataset name, e.g. cifar10 or coco_captions.")
flags.DEFINE_list("tfds_split", [], "tfds: splits to convert (default: all).")
flags.DEFINE_string("tfds_data_dir", None, "tfds: data_dir holding the prepared dataset.")
flags.DEFINE_string("image_feature", "image", "tfds: the image feature.")
flags.DEFINE_string(
    "text_feature",
    None,
    "tfds: caption feature path, e.g. captions/text (default: first of captions/text, "
    "captions, caption, text that exists; 'none' for no captions).",
)
flags.DEFINE_string(
    "label_feature", None, "tfds: ClassLabel feature (default: 'label' if present; 'none')."
)
flags.DEFINE_integer("max_side", 256, "Bound, in pixels, on the side chosen by --resize_side.")
flags.DEFINE_enum("resize_side", "shorter", ["shorter", "longer"], "Which side --max_side bounds.")
flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality of re-encoded images.")
flags.DEFINE_integer(
    "max_pixels", None, "Refuse images declaring more pixels (default: PIL's 89.5 M)."
)
flags.DEFINE_integer(
    "num_shards", 0, "Output shards (0: one per input tar, else --records_per_shard)."
)
flags.DEFINE_integer("records_per_shard", 10_000, "Shard size when --num_shards is 0.")
flags.DEFINE_integer("workers", os.cpu_count() or 1, "Shards written in parallel.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
FLAGS = flags.FLAGS

# Flags that mean something for one source only: given with another, they are a mistake.
_ONLY_FOR = {
    "captions_file": "folder",
    "tfds_name": "tfds",
    "tfds_split": "tfds",
    "tfds_data_dir": "tfds",
    "text_feature": "tfds",
    "label_feature": "tfds",
}


def _check_flags() -> None:
    if FLAGS.source is None:
        sys.exit(f"error: --source is required ({', '.join(SOURCES)})")
    if not FLAGS.output:
        sys.exit("error: --output is required (the directory to write the dataset to)")
    for flag, source in _ONLY_FOR.items():
        if FLAGS[flag].present and FLAGS.source != source:
            sys.exit(f"error: --{flag} applies to --source={source}, not --source={FLAGS.source}")
    if FLAGS.source == "webdataset" and not FLAGS.input:
        sys.exit("error: --source=webdataset needs --input (e.g. '/data/cc3m/{00000..00331}.tar')")
    if FLAGS.source == "folder" and not (FLAGS.input or FLAGS.captions_file):
        sys.exit("error: --source=folder needs --input (an image folder) and/or --captions_file")
    if FLAGS.source == "tfds" and not FLAGS.tfds_name:
        sys.exit("error: --source=tfds needs --tfds_name (e.g. cifar10)")
    if FLAGS.source == "tfds" and FLAGS.input:
        sys.exit("error: --source=tfds reads --tfds_name from --tfds_data_dir, not --input")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    _check_flags()
    from jaxclip.data import convert
    from jaxclip.data.images import DEFAULT_MAX_PIXELS

    started = time.perf_counter()
    try:
        options = convert.ImageOptions(
            max_side=FLAGS.max_side,
            resize_side=FLAGS.resize_side,
            jpeg_quality=FLAGS.jpeg_quality,
            max_pixels=FLAGS.max_pixels or DEFAULT_MAX_PIXELS,
        )
        common = dict(
            name=FLAGS.name,
            options=options,
            num_shards=FLAGS.num_shards,
            records_per_shard=FLAGS.records_per_shard,
            workers=FLAGS.workers,
            progress=FLAGS.progress,
        )
        if FLAGS.source == "webdataset":
            manifests = {"": convert.webdataset(FLAGS.input, FLAGS.output, **common)}
        elif FLAGS.source == "folder":
            manifests = {
                "": convert.image_folder(
                    FLAGS.input, FLAGS.output, captions_file=FLAGS.captions_file, **common
                )
            }
        else:
            manifests = convert.tfds(
                FLAGS.tfds_name,
                FLAGS.output,
                splits=FLAGS.tfds_split or None,
                data_dir=FLAGS.tfds_data_dir,
                image_feature=FLAGS.image_feature,
                text_feature=FLAGS.text_feature,
                label_feature=FLAGS.label_feature,
                **common,
            )
    except convert.ConversionError as e:
        sys.exit(f"error: {e}")
    for split, manifest in manifests.items():
        where = Path(FLAGS.output) / convert.safe_prefix(split) if split else Path(FLAGS.output)
        print(
            f"{where}: {manifest['count']} records in {len(manifest['shards'])} shards "
            f"(of {manifest['input_records']} read; content hash {manifest['content_hash'][:16]})"
        )
        print(convert.skip_report(manifest))
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    app.run(main)
