"""Real evaluation datasets: how a task names one, and reading its images, labels, captions.

A task in `config.eval.tasks` is `KIND:SOURCE[,option=value...]`:

    zeroshot:cifar10                       a TFDS dataset (prepared in `eval.data_dir`)
    zeroshot:imagenet2012,split=validation,n=10000
    zeroshot:folder=/data/pets/val         an image folder with one subfolder per class
    zeroshot:records=/data/pets_records    a converted dataset whose manifest has label_names
    retrieval:coco_captions                TFDS, several captions per image
    retrieval:records=/data/flickr30k_test
    zeroshot:shapes=combo_heldout          the shapes world (shape, colour, combo_seen,
    retrieval:shapes=val                   combo_heldout; retrieval on its val split)

Options: `split` (TFDS only; default: the dataset's test or validation split), `n` (evaluate
an evenly spaced subset of n examples; default `eval.max_examples`, 0 = all), `name` (the
dataset's name in metric names), `prefix` (the whole metric prefix), `image`/`label`/`text`
(TFDS feature names), and for zero-shot `class_names=FILE` and
`templates=imagenet|cifar|simple|shapes`.

The shapes world's sets are rendered, not decoded: `eval.num_examples` of them, one object
per image, class-balanced.

TFDS datasets are read with `data_source` (ArrayRecord, no TensorFlow); images stay encoded
until a batch is decoded, so an evaluation set never has to fit in memory.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from jaxclip.config import ConfigError
from jaxclip.data import images as images_lib
from jaxclip.data import records as records_lib
from jaxclip.data.convert.tfds_source import texts, value_at

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Split tried in order when a TFDS task names none (ImageNet calls it 'validation').
DEFAULT_SPLITS = ("test", "validation", "val")
# Captions kept per image for retrieval: COCO and Flickr30k have five (COCO a few more).
CAPTIONS_PER_IMAGE = 5
_TEXT_FIELDS = ("captions/text", "captions", "caption", "text")


class EvalDataError(ConfigError):
    """An evaluation task that names a dataset which is missing, unprepared or unusable."""


# --- Task names ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A parsed `KIND:SOURCE[,option=value...]` task name."""

    text: str
    kind: str  # "zeroshot" | "retrieval"
    source: str  # "tfds" | "folder" | "records"
    location: str  # TFDS name, or a directory
    options: dict[str, str]

    @property
    def name(self) -> str:
        """The `name` option, the TFDS name, the directory's name, or shapes_<task>."""
        if "name" in self.options:
            return self.options["name"]
        if self.source == "shapes":
            return f"shapes_{self.location}"
        if self.source == "tfds":
            return self.location.split(":")[0].replace("/", "_")
        return Path(self.location).name or self.location

    def prefix(self) -> str:
        """What every metric of this task starts with: `prefix`, else `<kind>/<name>`."""
        return self.options.get("prefix") or f"{self.kind}/{self.name}"


SOURCES = ("tfds", "folder", "records", "shapes")


def parse_task(text: str, allowed_options: Sequence[str]) -> TaskSpec:
    kind, _, rest = text.partition(":")
    parts = [p.strip() for p in rest.split(",")]
    if not parts[0]:
        raise EvalDataError(
            f"Evaluation task {text!r} names no dataset; write e.g. '{kind}:cifar10' or "
            f"'{kind}:folder=/path/to/images'."
        )
    head, sep, value = parts[0].partition("=")
    source, location = (head, value) if sep else ("tfds", head)
    if source not in SOURCES:
        raise EvalDataError(
            f"Evaluation task {text!r}: unknown dataset source {source!r}; use a TFDS name, "
            f"'folder=DIR', 'records=DIR' or 'shapes=TASK'."
        )
    options = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep or key not in allowed_options:
            raise EvalDataError(
                f"Evaluation task {text!r}: bad option {part!r}; options are "
                f"{', '.join(f'{k}=...' for k in allowed_options)}."
            )
        options[key] = value
    if source != "tfds":
        tfds_only = sorted({"split", "image", "label", "text"} & set(options))
        if tfds_only:
            raise EvalDataError(
                f"Evaluation task {text!r}: option(s) {tfds_only} apply to TFDS datasets only."
            )
    return TaskSpec(text=text, kind=kind, source=source, location=location, options=options)


def subset(size: int, n: int) -> np.ndarray:
    """Evenly spaced indices of n examples (all if n <= 0): covers every class of a folder
    or a converted dataset, whose records are often sorted by class."""
    if n <= 0 or n >= size:
        return np.arange(size)
    return np.arange(n) * size // n


# --- TFDS ------------------------------------------------------------------------------------


def _tfds_hint(name: str, data_dir: str) -> str:
    where = f" --data_dir={data_dir}" if data_dir else ""
    return (
        f"Prepare it once, in ArrayRecord format (TFDS needs TensorFlow for this step only; "
        f"ImageNet also needs its manually downloaded archives, see --manual_dir):\n"
        f"    pip install tensorflow && tfds build {name}{where} --file_format=array_record\n"
        f"then point --config.eval.data_dir at that directory. Or convert it to jaxclip records "
        f"with launch/prepare_data.py and use 'records=DIR' in the task."
    )


def tfds_split(name: str, data_dir: str, split: str | None, features: Sequence[str]):
    """(builder, data source, split name) of a prepared TFDS split, images left encoded."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # DatasetNotFoundError (its text lists every TFDS dataset) and kin
        known = tfds.core.registered.list_imported_builders()
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        where = data_dir or "the default TFDS data dir"
        raise EvalDataError(
            f"TFDS knows no dataset {name!r} and none is prepared under {where} "
            f"({type(e).__name__}).{hint}\n{_tfds_hint(name, data_dir)}"
        ) from e
    splits = list(builder.info.splits)
    if not splits:
        raise EvalDataError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}.\n"
            f"{_tfds_hint(name, data_dir)}"
        )
    if split is None:
        split = next((s for s in DEFAULT_SPLITS if s in splits), None)
        if split is None:
            raise EvalDataError(
                f"TFDS dataset {name!r} has no test or validation split; name one with "
                f"',split=...' (it has {', '.join(splits)})."
            )
    elif split.split("[")[0] not in splits:
        raise EvalDataError(f"TFDS dataset {name!r} has no split {split!r}; it has {splits}.")
    missing = [f for f in features if f.split("/")[0] not in builder.info.features]
    if missing:
        raise EvalDataError(
            f"TFDS dataset {name!r} has no feature {missing[0]!r}; its features are "
            f"{', '.join(builder.info.features)}. Name the right one in the task options."
        )
    image_feature = features[0]
    try:
        source = builder.as_data_source(
            split=split, decoders={image_feature: tfds.decode.SkipDecoding()}
        )
    except NotImplementedError as e:
        raise EvalDataError(
            f"TFDS dataset {name!r} in {builder.data_dir} is not stored as ArrayRecord, which "
            f"jaxclip reads without TensorFlow ({e}). Convert it once:\n"
            f"    tfds convert_format --dataset_dir={builder.data_dir} "
            f"--out_file_format=array_record"
        ) from e
    return builder, source, split


# --- Evaluation sets -------------------------------------------------------------------------


class EvalSet:
    """Random access to encoded images plus labels (`label_names`) or captions.

    `read(i)` returns {"image": bytes, "label": int} or {"image": bytes, "captions": [str]}
    ("pixels": a uint8 array instead of "image" for a rendered set), or {"error": why} for an
    unreadable example, which evaluators skip and count. `image_groups` (retrieval) says
    which images count as the same for a caption: by default each image is its own.
    """

    name: str
    label_names: list[str] | None = None
    templates: str | None = None  # the prompt ensemble that suits the set, if any

    def __len__(self) -> int:
        raise NotImplementedError

    def captions_of(self, index: int) -> list[str]:
        """The example's captions ([] if it has none or cannot be read)."""
        return list(self.read(index).get("captions", []))

    def image_groups(self, indices: Sequence[int]) -> np.ndarray:
        """Images with equal group ids are interchangeable answers in retrieval."""
        return np.arange(len(indices))

    def read(self, index: int) -> dict:
        raise NotImplementedError


class TfdsSet(EvalSet):
    def __init__(self, spec: TaskSpec, data_dir: str, *, labelled: bool):
        self.name = spec.name
        self.image_field = spec.options.get("image", "image")
        self.label_field = spec.options.get("label", "label") if labelled else None
        features = [self.image_field] + ([self.label_field] if labelled else [])
        self.builder, self.source, self.split = tfds_split(
            spec.location, data_dir, spec.options.get("split"), features
        )
        if labelled:
            feature = self.builder.info.features[self.label_field]
            names = getattr(feature, "names", None)
            if not names:
                raise EvalDataError(
                    f"TFDS feature {spec.location}/{self.label_field} is not a ClassLabel with "
                    f"names; name the label feature with ',label=...'."
                )
            self.label_names = list(names)
            self.text_field = None
        else:
            self.text_field = spec.options.get("text") or next(
                (f for f in _TEXT_FIELDS if self._has_field(f)), None
            )
            if self.text_field is None or not self._has_field(self.text_field):
                raise EvalDataError(
                    f"TFDS dataset {spec.location!r} has no caption feature (looked for "
                    f"{', '.join(_TEXT_FIELDS)}); name it with ',text=...'."
                )

    def _has_field(self, path: str) -> bool:
        node = self.builder.info.features
        for part in path.split("/"):
            feature = getattr(node, "feature", node)  # look inside a Sequence
            try:
                node = feature[part]
            except (KeyError, TypeError):
                return False
        return True

    def __len__(self) -> int:
        return len(self.source)

    def read(self, index: int) -> dict:
        try:
            example = self.source[int(index)]
            item = {"image": bytes(value_at(example, self.image_field))}
            if self.label_field is not None:
                item["label"] = int(value_at(example, self.label_field))
            else:
                item["captions"] = texts(value_at(example, self.text_field))
        except Exception as e:
            return {"error": f"cannot read example {index}: {type(e).__name__}: {e}"}
        return item


class FolderSet(EvalSet):
    """An image folder with one subfolder per class (sorted names = labels 0..C-1)."""

    def __init__(self, spec: TaskSpec):
        root = Path(spec.location)
        self.name = spec.name
        if not root.is_dir():
            raise EvalDataError(
                f"Image folder {root} does not exist; 'folder=DIR' needs a directory with one "
                f"subfolder per class (DIR/<class name>/<images>)."
            )
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name[0] != ".")
        if len(classes) < 2:
            raise EvalDataError(
                f"Image folder {root} has {len(classes)} class subfolder(s); zero-shot "
                f"classification needs at least two (DIR/<class name>/<images>)."
            )
        self.label_names = classes
        self.files: list[tuple[Path, int]] = []
        for label, cls in enumerate(classes):
            found = sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            self.files.extend((p, label) for p in found)
        if not self.files:
            raise EvalDataError(
                f"Image folder {root} has class subfolders but no images "
                f"({', '.join(IMAGE_SUFFIXES)})."
            )

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> dict:
        path, label = self.files[int(index)]
        try:
            return {"image": path.read_bytes(), "label": label}
        except OSError as e:
            return {"error": f"cannot read {path}: {e}"}


class RecordsSet(EvalSet):
    """A dataset converted by launch/prepare_data.py (labels need manifest label_names)."""

    def __init__(self, spec: TaskSpec, *, labelled: bool):
        self.name = spec.name
        try:
            self.source = records_lib.RecordsSource(spec.location)
        except records_lib.DatasetError as e:
            raise EvalDataError(str(e)) from e
        if labelled and not self.source.label_names:
            raise EvalDataError(
                f"Converted dataset {spec.location} has no label_names in its manifest, so it "
                f"cannot be used for zero-shot classification; convert it from a labelled "
                f"source (an image folder with class subfolders or a TFDS dataset with labels)."
            )
        self.label_names = list(self.source.label_names) if labelled else None

    def __len__(self) -> int:
        return len(self.source)

    def read(self, index: int) -> dict:
        item = self.source[int(index)]
        where = f"record {item['position']} of {item['shard']}"
        if item["read_error"]:
            return {"error": f"{where}: {item['read_error']}"}
        try:
            record = records_lib.decode_record(item["raw"])
        except records_lib.RecordError as e:
            return {"error": f"{where}: {e}"}
        if self.label_names is not None:
            if not isinstance(record.get("label"), int):
                return {"error": f"{where}: no integer 'label'"}
            return {"image": record["image"], "label": record["label"]}
        return {"image": record["image"], "captions": record["captions"]}


class ShapesSet(EvalSet):
    """A rendered shapes-world split. Zero-shot tasks classify the single object's shape,
    colour or (shape, colour) combination, seen in training or held out; retrieval uses the
    val split with captions in the evaluation style, where images with the same caption
    text are the same answer (a procedural world repeats captions)."""

    TASKS = {  # task -> (split, label field, class names)
        "shape": ("val", "shape", "shape"),
        "colour": ("val", "colour", "colour"),
        "combo_seen": ("val", "combo", "combo"),
        "combo_heldout": ("heldout", "combo", "combo"),
    }
    templates = "shapes"

    def __init__(self, spec: TaskSpec, cfg, *, labelled: bool):
        from jaxclip.data import shapes
        from jaxclip.data.sources import shapes_world

        self.name = spec.name
        if labelled:
            if spec.location not in self.TASKS:
                raise EvalDataError(
                    f"Task {spec.text!r}: the shapes world classifies one of "
                    f"{', '.join(self.TASKS)}; write e.g. 'zeroshot:shapes=colour'."
                )
            split, self.label_field, names = self.TASKS[spec.location]
            self.label_names = shapes.class_names(names)
            style = {}
        else:
            if spec.location != "val":
                raise EvalDataError(f"Task {spec.text!r}: retrieve on 'shapes=val'.")
            split, self.label_field = "val", None
            style = cfg.eval.get("retrieval_caption_style") or cfg.data.shapes.caption_style
            style = {"caption_style": style}
        self.world = shapes_world(
            cfg.data, split, num_examples=cfg.eval.num_examples, single_object=labelled, **style
        )

    def __len__(self) -> int:
        return len(self.world)

    def read(self, index: int) -> dict:
        example = self.world[int(index)]
        if self.label_field is not None:
            return {"pixels": example["image"], "label": int(example[self.label_field])}
        return {"pixels": example["image"], "captions": [example["caption"]]}

    def captions_of(self, index: int) -> list[str]:
        return [self.world.caption(int(index))]  # no rendering

    def image_groups(self, indices: Sequence[int]) -> np.ndarray:
        captions = [self.world.caption(int(i)) for i in indices]
        return np.unique(captions, return_inverse=True)[1].reshape(-1)


def open_eval_set(spec: TaskSpec, cfg, *, labelled: bool) -> EvalSet:
    if spec.source == "shapes":
        return ShapesSet(spec, cfg, labelled=labelled)
    if spec.source == "folder":
        if not labelled:
            raise EvalDataError(
                f"Task {spec.text!r}: a plain image folder has no captions; convert folder + "
                f"captions file with launch/prepare_data.py and use 'retrieval:records=DIR'."
            )
        return FolderSet(spec)
    if spec.source == "records":
        return RecordsSet(spec, labelled=labelled)
    return TfdsSet(spec, cfg.eval.get("data_dir", ""), labelled=labelled)


def open_task(cfg, task: str, options: Sequence[str], *, labelled: bool):
    """(spec, eval set, indices to evaluate) for the task name `task` of config `cfg`."""
    spec = parse_task(task, options)
    # .get: configs saved before these keys existed still evaluate.
    eval_set = open_eval_set(spec, cfg, labelled=labelled)
    n = spec.options.get("n", cfg.eval.get("max_examples", 0))
    try:
        n = int(n)
    except ValueError:
        raise EvalDataError(f"Task {task!r}: n={n!r} is not a number of examples.") from None
    return spec, eval_set, subset(len(eval_set), n)


# --- Decoding images in batches --------------------------------------------------------------


def eval_view(
    data: bytes, size: int, max_pixels: int = images_lib.DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Encoded image -> uint8 (size, size, 3): shorter side to `size`, centre crop."""
    image = images_lib.decode_image(data, max_pixels=max_pixels, draft_size=(size, size))
    return images_lib.resize_center_crop(image, size)


@dataclasses.dataclass
class Batch:
    """The decodable examples of one chunk, plus why the others were skipped."""

    indices: np.ndarray  # dataset indices of the decoded examples
    images: np.ndarray  # uint8 (len(indices), size, size, 3)
    items: list[dict]  # their `EvalSet.read` dicts, without the image bytes
    errors: list[str]


def image_batches(
    eval_set: EvalSet,
    indices: Sequence[int],
    size: int,
    batch_size: int,
    max_pixels: int = images_lib.DEFAULT_MAX_PIXELS,
) -> Iterator[Batch]:
    """Reads `indices` chunk by chunk and decodes each chunk on a thread pool (PIL releases
    the GIL), so only one chunk of encoded and decoded images is in memory at a time."""
    workers = max(1, min(8, os.cpu_count() or 1))

    def decode(item: dict) -> np.ndarray | str:
        if "error" in item:
            return item["error"]
        if "pixels" in item:  # rendered at the evaluation size already
            return item["pixels"]
        try:
            return eval_view(item["image"], size, max_pixels)
        except images_lib.ImageError as e:
            return str(e)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(indices), batch_size):
            chunk = [int(i) for i in indices[start : start + batch_size]]
            items = [eval_set.read(i) for i in chunk]
            decoded = list(pool.map(decode, items))
            ok = [j for j, d in enumerate(decoded) if not isinstance(d, str)]
            yield Batch(
                indices=np.array([chunk[j] for j in ok], np.int64),
                images=(
                    np.stack([decoded[j] for j in ok])
                    if ok
                    else np.zeros((0, size, size, 3), np.uint8)
                ),
                items=[
                    {k: v for k, v in items[j].items() if k not in ("image", "pixels")} for j in ok
                ],
                errors=[d for d in decoded if isinstance(d, str)],
            )
