"""Linear probe: multinomial logistic regression on frozen, L2-normalized image embeddings.

The classifier minimizes mean cross-entropy + l2/2 * ||W||^2 (the bias is not penalized)
with full-batch L-BFGS (optax) in JAX, from zeros, so a fit is deterministic. The L2
strength is chosen from `L2_GRID` by accuracy on a validation split (ties: the stronger),
and the chosen classifier is scored once on the test split.

    linear_probe:shapes=colour     the shapes world's main object: colour, shape, combo
    linear_probe:shapes=size,n=512 or size; n examples per split (train from its train
                                   split, val and test from disjoint index ranges of val)
    linear_probe:folder=DIR        any labelled set the datasets module opens (folder,
    linear_probe:records=DIR       records, TFDS), split by a fixed permutation into
    linear_probe:cifar10,train_fraction=0.6,val_fraction=0.2   train / val / test

`fit_logistic` and `probe` work on plain arrays, for studies that have features already.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxclip.data.images import DEFAULT_MAX_PIXELS
from jaxclip.evaluate import datasets, eval_batches
from jaxclip.evaluate.registry import register_family

L2_GRID = tuple(10.0**e for e in range(-6, 1))  # 1e-6 .. 1e0
MAX_ITER = 500
SHAPES_FIELDS = ("colour", "shape", "combo", "size")
OPTIONS = ("split", "n", "name", "prefix", "image", "label", "train_fraction", "val_fraction")
SPLIT_SEED = 0  # the permutation that splits a single labelled set


@dataclasses.dataclass(frozen=True)
class LogisticModel:
    weights: np.ndarray  # (D, C) float32
    bias: np.ndarray  # (C,)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, np.float32) @ self.weights + self.bias

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(features), axis=-1)


def logistic_objective(params, features, labels, l2):
    """Mean cross-entropy of softmax(features @ W + b) plus l2/2 * ||W||^2."""
    weights, bias = params
    logits = features @ weights + bias
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce + 0.5 * l2 * jnp.sum(weights**2)


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def _lbfgs(features, labels, l2, tol, *, num_classes: int, max_iter: int):
    def objective(params):
        return logistic_objective(params, features, labels, l2)

    params = (jnp.zeros((features.shape[1], num_classes)), jnp.zeros((num_classes,)))
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(
            grad, state, params, value=value, grad=grad, value_fn=objective
        )
        return optax.apply_updates(params, updates), state

    def going(carry):
        _, state = carry
        count = optax.tree_utils.tree_get(state, "count")
        grad = optax.tree_utils.tree_get(state, "grad")
        return (count == 0) | ((count < max_iter) & (optax.tree_utils.tree_norm(grad) >= tol))

    params, _ = jax.lax.while_loop(going, step, (params, solver.init(params)))
    return params


def fit_logistic(
    features: np.ndarray,
    labels: np.ndarray,
    l2: float,
    *,
    num_classes: int | None = None,
    max_iter: int = MAX_ITER,
    tol: float = 1e-6,
) -> LogisticModel:
    """Multinomial logistic regression, labels in [0, num_classes) (default: max + 1).

    Stops when the gradient's norm is below `tol` or after `max_iter` L-BFGS steps.
    """
    labels = np.asarray(labels, np.int32)
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..")
    weights, bias = _lbfgs(
        jnp.asarray(features, jnp.float32),
        jnp.asarray(labels),
        jnp.float32(l2),
        jnp.float32(tol),
        num_classes=num_classes,
        max_iter=int(max_iter),
    )
    return LogisticModel(np.asarray(weights), np.asarray(bias))


def probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    l2_grid: tuple[float, ...] = L2_GRID,
    max_iter: int = MAX_ITER,
) -> dict[str, float]:
    """(features, labels) per split -> top1 (test), l2 (chosen), val_top1, chance, examples.

    Labels may be any integers; a val/test label absent from train counts as wrong.
    chance: test accuracy of always answering the most frequent training class.
    """
    classes, train_y = np.unique(np.asarray(train[1]), return_inverse=True)

    def index(labels):
        pos = np.clip(np.searchsorted(classes, labels), 0, len(classes) - 1)
        return np.where(classes[pos] == labels, pos, -1)

    val_y, test_y = index(np.asarray(val[1])), index(np.asarray(test[1]))
    best = None
    for l2 in sorted(l2_grid, reverse=True):  # strongest first: ties keep the stronger
        model = fit_logistic(train[0], train_y, l2, num_classes=len(classes), max_iter=max_iter)
        accuracy = float(np.mean(model.predict(val[0]) == val_y))
        if best is None or accuracy > best[0]:
            best = (accuracy, l2, model)
    val_top1, l2, model = best
    majority = np.argmax(np.bincount(train_y))
    return {
        "top1": float(np.mean(model.predict(test[0]) == test_y)),
        "l2": float(l2),
        "val_top1": val_top1,
        "chance": float(np.mean(test_y == majority)),
        "examples": float(len(test_y)),
    }


# --- The evaluator ---------------------------------------------------------------------------


class ShapesLabels(datasets.EvalSet):
    """A shapes-world split, one object per image, labelled by one of `SHAPES_FIELDS`."""

    def __init__(self, world, field: str, name: str):
        self.world, self.field, self.name = world, field, name

    def __len__(self) -> int:
        return len(self.world)

    def read(self, index: int) -> dict:
        example = self.world[int(index)]
        return {"pixels": example["image"], "label": int(example[self.field])}


def _fraction(spec: datasets.TaskSpec, key: str, default: float) -> float:
    try:
        value = float(spec.options.get(key, default))
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise datasets.EvalDataError(
            f"Task {spec.text!r}: {key}={spec.options.get(key)!r} must be a fraction in (0, 1)."
        )
    return value


def _shapes_splits(cfg, spec: datasets.TaskSpec) -> list[tuple[datasets.EvalSet, np.ndarray]]:
    from jaxclip.data.sources import shapes_world

    if spec.location not in SHAPES_FIELDS:
        raise datasets.EvalDataError(
            f"Task {spec.text!r}: the shapes world's linear probe classifies one of "
            f"{', '.join(SHAPES_FIELDS)}; write e.g. 'linear_probe:shapes=colour'."
        )
    n = datasets.count_option(spec, "n", cfg.eval.num_examples)
    if n < 2:
        raise datasets.EvalDataError(f"Task {spec.text!r}: n={n} examples per split is too few.")
    train = shapes_world(cfg.data, "train", num_examples=n, single_object=True)
    held = shapes_world(cfg.data, "val", num_examples=2 * n, single_object=True)
    train_set = ShapesLabels(train, spec.location, spec.name)
    held_set = ShapesLabels(held, spec.location, spec.name)
    # test = val[0, n), val = val[n, 2n): the zero-shot evaluators' val images are the test.
    return [(train_set, np.arange(n)), (held_set, np.arange(n, 2 * n)), (held_set, np.arange(n))]


def _split_one_set(cfg, spec: datasets.TaskSpec, task: str):
    _, eval_set, indices = datasets.open_task(cfg, task, OPTIONS, labelled=True)
    train_fraction = _fraction(spec, "train_fraction", 0.6)
    val_fraction = _fraction(spec, "val_fraction", 0.2)
    order = np.random.default_rng(SPLIT_SEED).permutation(indices)
    a = int(round(train_fraction * len(order)))
    b = a + int(round(val_fraction * len(order)))
    if not 0 < a < b < len(order):
        raise datasets.EvalDataError(
            f"Task {task!r}: {len(order)} examples split {train_fraction}/{val_fraction}/rest "
            f"leave an empty train, val or test split; use more examples (n=) or other fractions."
        )
    return [
        (eval_set, np.sort(order[:a])),
        (eval_set, np.sort(order[a:b])),
        (eval_set, np.sort(order[b:])),
    ]


class LinearProbe:
    def __init__(self, cfg, task: str):
        self.spec = datasets.parse_task(task, OPTIONS)
        if self.spec.source == "shapes":
            self.splits = _shapes_splits(cfg, self.spec)
        else:
            self.splits = _split_one_set(cfg, self.spec, task)
        self.image_size = int(cfg.data.image_size)
        self.max_pixels = int(cfg.data.get("max_image_pixels", 0) or DEFAULT_MAX_PIXELS)
        self.prefix = self.spec.prefix()

    def texts(self) -> list[str]:
        return []  # images only

    def features(self, encoders, eval_set, indices) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(embeddings, labels, errors) of the readable examples among `indices`."""
        features, labels, errors = [], [], []
        for batch in eval_batches.image_batches(
            eval_set, indices, self.image_size, encoders.batch_size, self.max_pixels
        ):
            errors += batch.errors
            if len(batch.indices):
                features.append(encoders.images(batch.images))
                labels.append(np.array([item["label"] for item in batch.items], np.int64))
        if not features:
            raise datasets.EvalDataError(
                f"{self.spec.text}: none of {len(indices)} examples could be decoded "
                f"(e.g. {errors[0] if errors else 'no examples'})."
            )
        return np.concatenate(features), np.concatenate(labels), errors

    def run(self, encoders) -> dict[str, float]:
        parts = [self.features(encoders, s, i) for s, i in self.splits]
        errors = [e for _, _, errs in parts for e in errs]
        if errors:
            logging.warning(
                "%s: skipped %d examples, e.g. %s", self.spec.text, len(errors), errors[0]
            )
        train, val, test = ((f, y) for f, y, _ in parts)
        results = {f"{self.prefix}/{k}": v for k, v in probe(train, val, test).items()}
        results[f"{self.prefix}/skipped"] = float(len(errors))
        return results


register_family("linear_probe")(LinearProbe)
