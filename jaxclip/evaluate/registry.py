"""Evaluators by name: an experiment lists the ones it wants in `config.eval.tasks`."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

_REGISTRY: dict[str, Callable] = {}


def register(name: str):
    def wrap(factory):
        _REGISTRY[name] = factory
        return factory

    return wrap


def available() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def _import_all() -> None:
    # Importing the modules runs their @register decorators.
    from jaxclip.evaluate import retrieval, zeroshot  # noqa: F401


def build_evaluators(cfg: ml_collections.ConfigDict) -> dict:
    """Instantiates every evaluator named in cfg.eval.tasks."""
    _import_all()
    evaluators = {}
    for name in cfg.eval.tasks:
        if name not in _REGISTRY:
            raise ValueError(f"Unknown evaluator {name!r}; available: {', '.join(available())}.")
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
