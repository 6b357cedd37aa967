"""Compositional hard negatives (SugarCrepe): does the image match its caption better than a
minimally changed, false one?

Every example is an image, its (positive) caption and one negative caption per category
(replace/swap/add of objects, attributes, relations). An image counts as correct for a
pair when cos(image, positive) > cos(image, negative); a tie counts one half, so a negative
the model cannot tell from the positive scores exactly 50%, which is also what a model
that ignores the image scores on average.

    compositional:shapes=val           the shapes world's val split, multi-object scenes
                                       (up to `objects=3`), negatives from
                                       evaluate/hard_negatives.py
    compositional:sugarcrepe=DIR       SugarCrepe's JSON files in DIR (one per category),
                                       images in DIR/images or `images=IMAGES_DIR`

Options: `n` (shapes: scenes, default `eval.num_examples`; SugarCrepe: pairs per category,
an evenly spaced subset, default `eval.max_examples`, 0 = all), `name`, `prefix`,
`objects` (shapes only). Metrics: `<prefix>/<category>`, `<prefix>/mean` (the mean over
categories), `<prefix>/examples` (images scored), `<prefix>/skipped` (unreadable images).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
from absl import logging

from jaxclip.data import shapes
from jaxclip.data.images import DEFAULT_MAX_PIXELS
from jaxclip.evaluate import datasets, eval_batches, hard_negatives
from jaxclip.evaluate.registry import register_alias, register_family

OPTIONS = ("n", "name", "prefix", "images", "objects")
# SugarCrepe's categories in its own order; a directory's other *.json files follow, sorted.
SUGARCREPE_CATEGORIES = (
    "add_obj",
    "add_att",
    "replace_obj",
    "replace_att",
    "replace_rel",
    "swap_obj",
    "swap_att",
)
_FIELDS = ("filename", "caption", "negative_caption")


@dataclasses.dataclass(frozen=True)
class Pair:
    image: int  # index into the evaluation set's images
    category: str
    positive: str
    negative: str


def pair_scores(image_emb: np.ndarray, positive_emb: np.ndarray, negative_emb: np.ndarray):
    """Per row: 1 when the image is closer to the positive than to the negative, 0.5 on a
    tie, 0 otherwise (all embeddings L2-normalized, so dot products are cosines)."""
    pos = np.sum(image_emb * positive_emb, axis=-1)
    neg = np.sum(image_emb * negative_emb, axis=-1)
    return (pos > neg) + 0.5 * (pos == neg)


# --- Evaluation sets ------------------------------------------------------------------------


class ShapesScenes(datasets.EvalSet):
    """Rendered val scenes with up to `objects` objects, each with its hard negatives."""

    categories = hard_negatives.CATEGORIES

    def __init__(self, spec: datasets.TaskSpec, cfg):
        from jaxclip.data.sources import shapes_world

        if spec.location != "val":
            raise datasets.EvalDataError(
                f"Task {spec.text!r}: the shapes world's compositional set is 'shapes=val'."
            )
        self.name = spec.name
        count = _integer(spec, "n", cfg.eval.num_examples)
        objects = _integer(spec, "objects", 3)
        if count < 1 or objects < 2:
            raise datasets.EvalDataError(
                f"Task {spec.text!r}: needs n >= 1 scenes and objects >= 2 (relations and "
                f"swaps need two objects); got n={count}, objects={objects}."
            )
        self.world = shapes_world(
            cfg.data, "val", num_examples=count, max_objects=objects, caption_style="detailed"
        )

    def __len__(self) -> int:
        return len(self.world)

    def read(self, index: int) -> dict:
        return {"pixels": self.world[int(index)]["image"]}

    def pairs(self) -> list[Pair]:
        found = []
        for i in range(len(self.world)):
            scene = self.world.scene(i)
            positive = shapes.detailed_caption(scene)
            negatives = hard_negatives.hard_negatives(scene, (self.world.seed, i))
            found += [Pair(i, c, positive, n) for c, n in negatives.items()]
        return found


class SugarCrepeSet(datasets.EvalSet):
    """SugarCrepe's layout: DIR/<category>.json, each {id: {"filename": image path relative
    to the images directory, "caption": positive, "negative_caption": negative}}."""

    def __init__(self, spec: datasets.TaskSpec, cfg):
        root = Path(spec.location)
        self.name = spec.options.get("name", "sugarcrepe")
        self.images_dir = Path(spec.options.get("images") or root / "images")
        files = sorted(root.glob("*.json")) if root.is_dir() else []
        if not files:
            raise datasets.EvalDataError(
                f"Task {spec.text!r}: {root} holds no SugarCrepe JSON files; 'sugarcrepe=DIR' "
                f"needs DIR/<category>.json ({', '.join(SUGARCREPE_CATEGORIES)})."
            )
        if not self.images_dir.is_dir():
            raise datasets.EvalDataError(
                f"Task {spec.text!r}: image directory {self.images_dir} does not exist; put "
                f"the images (COCO val2017 for SugarCrepe) there or pass images=DIR."
            )
        order = {c: k for k, c in enumerate(SUGARCREPE_CATEGORIES)}
        files.sort(key=lambda p: (order.get(p.stem, len(order)), p.stem))
        n = _integer(spec, "n", cfg.eval.get("max_examples", 0))
        entries = {f.stem: _read_category(f) for f in files}
        self.categories = tuple(entries)
        self.filenames = sorted({e[0] for rows in entries.values() for e in rows})
        image_of = {name: k for k, name in enumerate(self.filenames)}
        self._pairs = [
            Pair(image_of[rows[k][0]], category, rows[k][1], rows[k][2])
            for category, rows in entries.items()
            for k in datasets.subset(len(rows), n)
        ]

    def __len__(self) -> int:
        return len(self.filenames)

    def read(self, index: int) -> dict:
        path = self.images_dir / self.filenames[int(index)]
        try:
            return {"image": path.read_bytes()}
        except OSError as e:
            return {"error": f"cannot read {path}: {e}"}

    def pairs(self) -> list[Pair]:
        return self._pairs


def _read_category(path: Path) -> list[tuple[str, str, str]]:
    """(filename, caption, negative caption) of each entry of one SugarCrepe file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise datasets.EvalDataError(f"SugarCrepe file {path} is not readable JSON: {e}") from e
    if not isinstance(data, dict) or not data:
        raise datasets.EvalDataError(_format_error(path, "the file", "a non-empty JSON object"))
    rows = []
    for key, entry in data.items():
        ok = isinstance(entry, dict) and all(
            isinstance(entry.get(f), str) and entry[f].strip() for f in _FIELDS
        )
        if not ok:
            raise datasets.EvalDataError(_format_error(path, f"entry {key!r}", "an object"))
        rows.append(tuple(entry[f].strip() for f in _FIELDS))
    return rows


def _format_error(path: Path, what: str, expected: str) -> str:
    return (
        f"SugarCrepe file {path}: {what} is not {expected} of the form {{id: {{"
        f'"filename": "IMAGE", "caption": "POSITIVE", "negative_caption": "NEGATIVE"}}}} '
        f"(all three non-empty strings)."
    )


def _integer(spec: datasets.TaskSpec, option: str, default) -> int:
    value = spec.options.get(option, default)
    try:
        return int(value)
    except ValueError:
        raise datasets.EvalDataError(
            f"Task {spec.text!r}: {option}={value!r} is not a whole number."
        ) from None


def open_compositional(cfg, task: str):
    spec = datasets.parse_task(task, OPTIONS)
    if spec.source == "shapes":
        return spec, ShapesScenes(spec, cfg)
    if spec.source == "sugarcrepe":
        return spec, SugarCrepeSet(spec, cfg)
    raise datasets.EvalDataError(
        f"Task {task!r}: compositional evaluation reads 'shapes=val' or 'sugarcrepe=DIR' "
        f"(SugarCrepe's JSON files), not {spec.source} data."
    )


# --- The evaluator --------------------------------------------------------------------------


class Compositional:
    def __init__(self, cfg, task: str):
        self.spec, self.data = open_compositional(cfg, task)
        self.image_size = int(cfg.data.image_size)
        self.max_pixels = int(cfg.data.get("max_image_pixels", 0) or DEFAULT_MAX_PIXELS)
        name = self.data.name
        self.prefix = self.spec.options.get("prefix") or f"{self.spec.kind}/{name}"

    @functools.cached_property
    def pairs(self) -> list[Pair]:
        return self.data.pairs()

    def texts(self) -> list[str]:
        """Every positive and negative caption, deduplicated in a stable order."""
        return list(dict.fromkeys(t for p in self.pairs for t in (p.positive, p.negative)))

    def run(self, encoders) -> dict[str, float]:
        needed = np.array(sorted({p.image for p in self.pairs}), np.int64)
        kept, image_emb, errors = eval_batches.embed_images(
            self.data, needed, self.image_size, encoders, self.max_pixels
        )
        row_of = {i: row for row, i in enumerate(kept)}
        skipped = len(needed) - len(row_of)
        if skipped:
            logging.warning(
                "%s: skipped %d of %d images, e.g. %s",
                self.spec.text,
                skipped,
                len(needed),
                errors[0],
            )
        pairs = [p for p in self.pairs if p.image in row_of]
        if not pairs:
            raise datasets.EvalDataError(
                f"{self.spec.text}: none of {len(needed)} images could be read "
                f"(e.g. {errors[0] if errors else 'no pairs'})."
            )
        texts = self.texts()
        text_row = {t: k for k, t in enumerate(texts)}
        text_emb = encoders.texts(texts)
        images = image_emb[[row_of[p.image] for p in pairs]]
        scores = pair_scores(
            images,
            text_emb[[text_row[p.positive] for p in pairs]],
            text_emb[[text_row[p.negative] for p in pairs]],
        )
        categories = np.array([p.category for p in pairs])
        order = [c for c in self.data.categories if c in set(categories)]
        results = {f"{self.prefix}/{c}": float(scores[categories == c].mean()) for c in order}
        results[f"{self.prefix}/mean"] = float(
            np.mean([results[f"{self.prefix}/{c}"] for c in order])
        )
        results[f"{self.prefix}/examples"] = float(len(row_of))
        results[f"{self.prefix}/skipped"] = float(skipped)
        return results


register_family("compositional")(Compositional)
register_alias("compositional", "compositional:shapes=val,prefix=compositional")
