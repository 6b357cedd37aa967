"""Evaluators by name: an experiment lists the ones it wants in `config.eval.tasks`.

A name is either a fixed evaluator ("zeroshot_colour") or a family and a dataset
("zeroshot:cifar10", "retrieval:records=/data/coco_test"; see evaluate/datasets.py).
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from jaxclip.config import ConfigError

_REGISTRY: dict[str, Callable] = {}
# "zeroshot" -> factory(cfg, task name) for every task named "zeroshot:<dataset>".
_FAMILIES: dict[str, Callable] = {}


def register(name: str):
    def wrap(factory):
        _REGISTRY[name] = factory
        return factory

    return wrap


def register_family(kind: str):
    def wrap(factory):
        _FAMILIES[kind] = factory
        return factory

    return wrap


def available() -> list[str]:
    _import_all()
    return sorted(_REGISTRY) + [f"{kind}:<dataset>" for kind in sorted(_FAMILIES)]


def _import_all() -> None:
    # Importing the modules runs their @register decorators.
    from jaxclip.evaluate import real_retrieval, real_zeroshot, retrieval, zeroshot  # noqa: F401


def build_evaluators(cfg: ml_collections.ConfigDict) -> dict:
    """Instantiates every evaluator named in cfg.eval.tasks."""
    _import_all()
    evaluators = {}
    for name in cfg.eval.tasks:
        kind, sep, _ = name.partition(":")
        if sep and kind in _FAMILIES:
            evaluators[name] = _FAMILIES[kind](cfg, name)
            continue
        if name not in _REGISTRY:
            raise ConfigError(
                f"Unknown evaluator {name!r}; available: {', '.join(available())} (a dataset "
                f"is a TFDS name, folder=DIR or records=DIR)."
            )
        evaluators[name] = _REGISTRY[name](cfg)
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
