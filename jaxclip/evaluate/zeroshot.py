"""Zero-shot classification on any labelled evaluation set: the shapes world, TFDS datasets
(cifar10, imagenet2012, ...), image folders with class subfolders, converted records.

Each class name goes into every prompt template; the normalized text embeddings are averaged
and re-normalized into that class's weight vector; an image is scored against every class
and counted correct at k when its label is among the k best. Class names come from the
set's metadata (TFDS ClassLabel names, folder names, manifest `label_names`, the shapes
world's phrases) made readable by `class_names`, or from a class-names file. Images are
decoded (or rendered) chunk by chunk and encoded on the whole mesh.

`zeroshot_combo_heldout` and its siblings are the shapes world's tasks under the names the
demo reports; `combo_heldout` classifies images whose (shape, colour) combination never
appeared in training, among all combinations. `zeroshot_<task>_unseen` does the same with
prompts in phrasings no training caption used (templates=shapes_unseen).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from absl import logging

from jaxclip.data.images import DEFAULT_MAX_PIXELS
from jaxclip.evaluate import class_names as names_lib
from jaxclip.evaluate import datasets, eval_batches
from jaxclip.evaluate import templates as templates_lib
from jaxclip.evaluate.registry import register_alias, register_family

KS = (1, 5)
OPTIONS = ("split", "n", "name", "prefix", "image", "label", "class_names", "templates")


def class_weights(encoders, class_names: list[str], templates: tuple[str, ...]) -> np.ndarray:
    """(num_classes, D): the re-normalized mean of each class's prompt embeddings."""
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = encoders.texts(prompts).reshape(len(class_names), len(templates), -1)
    mean = emb.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def topk_correct(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = KS) -> dict[int, int]:
    """How many rows have their label among the k highest logits, for each k.

    Ties are broken by class index, as a stable sort would (two classes with the same name,
    as ImageNet has, get the same weights; only the first can be predicted).
    """
    rows = np.arange(len(labels))
    own = logits[rows, labels][:, None]
    before = np.arange(logits.shape[1])[None, :] < labels[:, None]
    rank = (logits > own).sum(1) + ((logits == own) & before).sum(1)
    return {k: int((rank < k).sum()) for k in ks}


class ZeroShot:
    def __init__(self, cfg, task: str):
        self.spec, self.data, self.indices = datasets.open_task(cfg, task, OPTIONS, labelled=True)
        spec = self.spec
        raw = self.data.label_names
        if "class_names" in spec.options:
            self.class_names = names_lib.read_names_file(spec.options["class_names"], len(raw))
        elif spec.source == "shapes":
            self.class_names = list(raw)  # already the phrases its captions use
        else:
            self.class_names = names_lib.readable_names(raw)
        default = self.data.templates
        if spec.source == "tfds":
            default = templates_lib.default_ensemble(spec.location)
        self.templates = templates_lib.ensemble(
            spec.options.get("templates") or default or "imagenet"
        )
        self.image_size = int(cfg.data.image_size)
        self.max_pixels = int(cfg.data.get("max_image_pixels", 0) or DEFAULT_MAX_PIXELS)
        self.prefix = spec.prefix()

    def texts(self) -> list[str]:
        """Every prompt this evaluator embeds (LIFT precomputes them into its store)."""
        return [t.format(name) for name in self.class_names for t in self.templates]

    def run(self, encoders) -> dict[str, float]:
        num_classes = len(self.class_names)
        weights = class_weights(encoders, self.class_names, self.templates)
        ks = [k for k in KS if k == 1 or k < num_classes]  # top-5 of 5 classes says nothing
        hits, seen_labels, count, skipped, first_error = dict.fromkeys(ks, 0), set(), 0, 0, ""
        for batch in eval_batches.image_batches(
            self.data, self.indices, self.image_size, encoders.batch_size, self.max_pixels
        ):
            labels = np.array([item["label"] for item in batch.items], np.int64)
            bad = (labels < 0) | (labels >= num_classes)
            errors = batch.errors + [
                f"label {v} outside {num_classes} classes" for v in labels[bad]
            ]
            skipped += len(errors)
            first_error = first_error or (errors[0] if errors else "")
            if not (~bad).any():
                continue
            logits = encoders.images(batch.images[~bad]) @ weights.T
            for k, v in topk_correct(logits, labels[~bad], ks).items():
                hits[k] += v
            seen_labels.update(labels[~bad].tolist())
            count += int((~bad).sum())
        if skipped:
            message = f"skipped {skipped} of {len(self.indices)} examples, e.g. {first_error}"
            logging.warning("%s: %s", self.spec.text, message)
        if not count:
            raise datasets.EvalDataError(
                f"{self.spec.text}: none of {len(self.indices)} examples could be decoded "
                f"(e.g. {first_error})."
            )
        results = {f"{self.prefix}/top{k}": hits[k] / count for k in ks}
        # What a constant guess among the classes present scores on a balanced set.
        results[f"{self.prefix}/chance"] = 1.0 / len(seen_labels)
        results[f"{self.prefix}/examples"] = float(count)
        results[f"{self.prefix}/skipped"] = float(skipped)
        return results


register_family("zeroshot")(ZeroShot)
for _task in datasets.ShapesSet.TASKS:
    register_alias(f"zeroshot_{_task}", f"zeroshot:shapes={_task},prefix=zeroshot_{_task}")
    _unseen = f"zeroshot_{_task}_unseen"
    register_alias(_unseen, f"zeroshot:shapes={_task},templates=shapes_unseen,prefix={_unseen}")
