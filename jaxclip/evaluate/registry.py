"""Evaluators by name: an experiment lists the ones it wants in `config.eval.tasks`.

A name is a family and a dataset ("zeroshot:cifar10", "retrieval:records=/data/coco_test",
"zeroshot:shapes=colour"; see evaluate/datasets.py), or an alias of one ("zeroshot_colour",
"retrieval": the shapes world's tasks under the names the demo reports).
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from jaxclip.config import ConfigError

# "zeroshot" -> factory(cfg, task name) for every task named "zeroshot:<dataset>".
_FAMILIES: dict[str, Callable] = {}
# "zeroshot_colour" -> "zeroshot:shapes=colour,prefix=zeroshot_colour"
_ALIASES: dict[str, str] = {}


def register_alias(name: str, task: str) -> None:
    _ALIASES[name] = task


def register_family(kind: str):
    def wrap(factory):
        _FAMILIES[kind] = factory
        return factory

    return wrap


def available() -> list[str]:
    _import_all()
    return sorted(_ALIASES) + [f"{kind}:<dataset>" for kind in sorted(_FAMILIES)]


def is_registered(name: str) -> bool:
    """Whether `name` (a task or an alias) names a registered evaluator family."""
    _import_all()
    kind, sep, _ = _ALIASES.get(name, name).partition(":")
    return bool(sep) and kind in _FAMILIES


def _import_all() -> None:
    # Importing the modules runs their @register decorators.
    from jaxclip.evaluate import (  # noqa: F401
        compositional,
        dense,
        grounding,
        linear_probe,
        retrieval,
        zeroshot,
    )


def build_evaluators(cfg: ml_collections.ConfigDict) -> dict:
    """Instantiates every evaluator named in cfg.eval.tasks."""
    _import_all()
    evaluators = {}
    for name in cfg.eval.tasks:
        if not is_registered(name):
            raise ConfigError(
                f"Unknown evaluator {name!r}; available: {', '.join(available())} (a dataset "
                f"is a TFDS name, folder=DIR, records=DIR or shapes=TASK)."
            )
        task = _ALIASES.get(name, name)
        evaluators[name] = _FAMILIES[task.partition(":")[0]](cfg, task)
    return evaluators


def run_all(evaluators: dict, encoders) -> dict[str, float]:
    results = {}
    for evaluator in evaluators.values():
        results.update(evaluator.run(encoders))
    return results


def eval_texts(cfg: ml_collections.ConfigDict) -> list[str]:
    """Every text the configured evaluators embed, deduplicated in a stable order."""
    texts: dict[str, None] = {}
    for evaluator in build_evaluators(cfg).values():
        texts.update(dict.fromkeys(evaluator.texts()))
    return list(texts)
