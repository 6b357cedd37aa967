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
    compositional:shapes=val               hard-negative captions (evaluate/compositional.py)
    compositional:sugarcrepe=DIR           SugarCrepe's JSON files (compositional only)

Options: `split` (TFDS only; default: the dataset's test or validation split), `n` (evaluate
an evenly spaced subset of n examples; default `eval.max_examples`, 0 = all), `name` (the
dataset's name in metric names), `prefix` (the whole metric prefix), `image`/`label`/`text`
(TFDS feature names), and for zero-shot `class_names=FILE` and
`templates=imagenet|cifar|simple|shapes|shapes_unseen`.

The shapes world's sets are rendered, not decoded: `eval.num_examples` of them, one object
per image, class-balanced.

TFDS datasets are read with `data_source` (ArrayRecord, no TensorFlow); images stay encoded
until a batch is decoded, so an evaluation set never has to fit in memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxclip.config import ConfigError
from jaxclip.data import records as records_lib

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


# sugarcrepe: caption pairs for the compositional evaluator only (evaluate/compositional.py).
SOURCES = ("tfds", "folder", "records", "shapes", "sugarcrepe")


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
            f"'folder=DIR', 'records=DIR', 'shapes=TASK' or (compositional) 'sugarcrepe=DIR'."
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


def count_option(spec: TaskSpec, key: str, default: int) -> int:
    """An integer option of a task (e.g. n=), with a clear error for anything else."""
    value = spec.options.get(key, default)
    try:
        return int(value)
    except ValueError:
        raise EvalDataError(f"Task {spec.text!r}: {key}={value!r} is not a whole number.") from None


def subset(size: int, n: int) -> np.ndarray:
    """Evenly spaced indices of n examples (all if n <= 0): covers every class of a folder
    or a converted dataset, whose records are often sorted by class."""
    if n <= 0 or n >= size:
        return np.arange(size)
    return np.arange(n) * size // n


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
    if spec.source == "sugarcrepe":
        raise EvalDataError(
            f"Task {spec.text!r}: a SugarCrepe directory holds caption pairs, not a "
            f"{spec.kind} set; evaluate it as 'compositional:sugarcrepe=DIR'."
        )
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
    from jaxclip.evaluate.tfds_sets import TfdsSet

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
