"""Zero-shot classification on real datasets: TFDS (cifar10, cifar100, imagenet2012, ...),
image folders with class subfolders, and converted records with label names.

Class names come from the dataset's own metadata (TFDS ClassLabel names, folder names,
manifest `label_names`) made readable by `class_names`, or from a class-names file. Each class
is embedded through CLIP's prompt-template ensemble for the dataset (`templates`); an image is
scored against every class and counted correct at k when its label is among the k best.
Images are decoded chunk by chunk (resize shorter side + centre crop to the model's size) and
encoded on the whole mesh; `Encoders` pads the last chunk and drops the padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from absl import logging

from jaxclip.data.images import DEFAULT_MAX_PIXELS
from jaxclip.evaluate import class_names as names_lib
from jaxclip.evaluate import datasets
from jaxclip.evaluate import templates as templates_lib
from jaxclip.evaluate.registry import register_family
from jaxclip.evaluate.zeroshot import class_weights

KS = (1, 5)
OPTIONS = ("split", "n", "name", "image", "label", "class_names", "templates")


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


class RealZeroShot:
    def __init__(self, cfg, task: str):
        self.spec, self.data, self.indices = datasets.open_task(cfg, task, OPTIONS, labelled=True)
        spec = self.spec
        raw = self.data.label_names
        if "class_names" in spec.options:
            self.class_names = names_lib.read_names_file(spec.options["class_names"], len(raw))
        else:
            self.class_names = names_lib.readable_names(raw)
        default = templates_lib.default_ensemble(spec.location) if spec.source == "tfds" else None
        self.templates = templates_lib.ensemble(
            spec.options.get("templates") or default or "imagenet"
        )
        self.image_size = int(cfg.data.image_size)
        self.max_pixels = int(cfg.data.get("max_image_pixels", 0) or DEFAULT_MAX_PIXELS)
        self.prefix = f"zeroshot/{spec.name}"

    def texts(self) -> list[str]:
        """Every prompt this evaluator embeds (LIFT looks them up or embeds them)."""
        return [t.format(name) for name in self.class_names for t in self.templates]

    def run(self, encoders) -> dict[str, float]:
        num_classes = len(self.class_names)
        weights = class_weights(encoders, self.class_names, self.templates)
        ks = [k for k in KS if k == 1 or k < num_classes]  # top-5 of 5 classes says nothing
        hits, count, skipped, first_error = dict.fromkeys(ks, 0), 0, 0, ""
        for batch in datasets.image_batches(
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
        results[f"{self.prefix}/chance"] = 1.0 / num_classes
        results[f"{self.prefix}/examples"] = float(count)
        results[f"{self.prefix}/skipped"] = float(skipped)
        return results


register_family("zeroshot")(RealZeroShot)
