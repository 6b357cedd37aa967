"""Zero-shot classification: class prompts through the text tower, template-ensembled.

Each class name is put into every prompt template; the normalized text embeddings are
averaged and re-normalized into that class's weight vector; an image is assigned the class of
highest cosine similarity. On the shapes world, `combo_heldout` classifies images whose
(shape, colour) combination never appeared in training among all combinations.
"""

from __future__ import annotations

import functools

import numpy as np

from jaxclip.data import shapes
from jaxclip.data.pipeline import make_source
from jaxclip.evaluate.registry import register

# task name -> (split, label field, class-name task in the shapes world)
TASKS = {
    "zeroshot_shape": ("val", "shape", "shape"),
    "zeroshot_colour": ("val", "colour", "colour"),
    "zeroshot_combo_seen": ("val", "combo", "combo"),
    "zeroshot_combo_heldout": ("heldout", "combo", "combo"),
}


def class_weights(encoders, class_names: list[str], templates: tuple[str, ...]) -> np.ndarray:
    """(num_classes, D): the re-normalized mean of each class's prompt embeddings."""
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = encoders.texts(prompts).reshape(len(class_names), len(templates), -1)
    mean = emb.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


class ZeroShot:
    def __init__(self, cfg, task: str):
        split, self.label_field, names_task = TASKS[task]
        self.name = task
        self.source = make_source(
            cfg.data, split, num_examples=cfg.eval.num_examples, single_object=True
        )
        self.class_names = shapes.class_names(names_task)
        self.templates = tuple(shapes.PROMPT_TEMPLATES)

    @functools.cached_property
    def examples(self) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels), rendered on first use: listing prompts renders nothing."""
        examples = [self.source[i] for i in range(len(self.source))]
        images = np.stack([e["image"] for e in examples])
        return images, np.array([int(e[self.label_field]) for e in examples])

    def texts(self) -> list[str]:
        """Every prompt this evaluator embeds (LIFT precomputes them)."""
        return [t.format(name) for name in self.class_names for t in self.templates]

    def run(self, encoders) -> dict[str, float]:
        weights = class_weights(encoders, self.class_names, self.templates)
        images, labels = self.examples
        predicted = np.argmax(encoders.images(images) @ weights.T, axis=-1)
        return {
            f"{self.name}/top1": float(np.mean(predicted == labels)),
            f"{self.name}/chance": 1.0 / len(np.unique(labels)),
        }


for _task in TASKS:
    register(_task)(lambda cfg, _task=_task: ZeroShot(cfg, _task))
