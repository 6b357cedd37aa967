"""Tensor-by-tensor maps between a flat state dict (PyTorch layouts) and jaxclip's params tree.

A format is a list of ``Rule``s: the source key (``{i}`` for a layer index), the path in
jaxclip's tree, and the two layout transforms. jaxclip stacks a tower's layers on a leading
axis, so per-layer rules gather ``depth`` tensors into one array on import and split it on
export. Import checks that every rule finds its tensor and that nothing is left over, so a
missing or unexpected tensor is named instead of silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from jaxclip.weights.architectures import WeightsError

Transform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str  # a state-dict key; "{i}" stands for the layer index
    path: tuple[str, ...]  # where the (stacked) array sits in jaxclip's params tree
    to_jax: Transform
    to_torch: Transform
    depth: int = 0  # > 0: a per-layer rule over this many layers


def same(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    return np.array(x.T, order="C")


def conv_to_patch_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d (width, 3, p, p) -> jaxclip's (p, p, 3, width): (row, col, channel) order."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def patch_kernel_to_conv(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(k.transpose(3, 2, 0, 1))


def heads_in(heads: int) -> tuple[Transform, Transform]:
    """Linear (heads*k, d) projecting into heads <-> jaxclip's (d, heads, k)."""

    def to_jax(w):
        return np.ascontiguousarray(w.T.reshape(w.shape[1], heads, -1))

    def to_torch(k):
        return np.ascontiguousarray(k.reshape(k.shape[0], -1).T)

    return to_jax, to_torch


def heads_bias(heads: int) -> tuple[Transform, Transform]:
    return (lambda b: b.reshape(heads, -1)), (lambda b: b.reshape(-1))


def heads_out(heads: int) -> tuple[Transform, Transform]:
    """Linear (d, heads*k) combining heads <-> jaxclip's (heads, k, d)."""

    def to_jax(w):
        return np.ascontiguousarray(w.T.reshape(heads, -1, w.shape[0]))

    def to_torch(k):
        return np.ascontiguousarray(k.reshape(-1, k.shape[-1]).T)

    return to_jax, to_torch


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            raise WeightsError(f"the jaxclip params have no {'/'.join(path)}")
        tree = tree[key]
    return tree


def _sources(rule: Rule) -> list[str]:
    return [rule.source.format(i=i) for i in range(rule.depth)] if rule.depth else [rule.source]


def to_params(tensors: Mapping[str, np.ndarray], rules: Iterable[Rule], fmt: str) -> dict:
    """Flat state dict -> jaxclip params tree (float32); refuses missing or unused tensors."""
    rules = list(rules)
    wanted = {key for rule in rules for key in _sources(rule)}
    missing = sorted(wanted - set(tensors))
    unexpected = sorted(set(tensors) - wanted)
    if missing or unexpected:
        raise WeightsError(_mismatch_message(fmt, missing, unexpected))
    params: dict = {}
    for rule in rules:
        arrays = [rule.to_jax(np.asarray(tensors[k], np.float32)) for k in _sources(rule)]
        _set(params, rule.path, np.stack(arrays) if rule.depth else arrays[0])
    return params


def to_state_dict(params: Mapping, rules: Iterable[Rule]) -> dict[str, np.ndarray]:
    """jaxclip params tree -> flat state dict in the format's (PyTorch) layouts, float32."""
    tensors = {}
    for rule in rules:
        value = np.asarray(_get(params, rule.path), np.float32)
        if rule.depth:
            for i, key in enumerate(_sources(rule)):
                tensors[key] = rule.to_torch(value[i])
        else:
            tensors[rule.source] = rule.to_torch(value)
    return tensors


def _mismatch_message(fmt: str, missing: list[str], unexpected: list[str]) -> str:
    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")

    parts = [f"the tensors do not form a {fmt} CLIP of the expected architecture"]
    if missing:
        parts.append(f"missing {len(missing)}: {listed(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {listed(unexpected)}")
    parts.append(
        "check --from and --model (a missing tensor usually means a truncated or non-CLIP "
        "file; unexpected ones, another architecture)"
    )
    return "; ".join(parts)


def check_shapes(params: Mapping, expected: Mapping, prefix: str = "") -> None:
    """Every array of `params` has the shape of its counterpart in `expected` (abstract)."""
    for key, value in expected.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            check_shapes(params.get(key, {}), value, name + "/")
        elif key not in params:
            raise WeightsError(f"no tensor for jaxclip parameter {name}")
        elif tuple(params[key].shape) != tuple(value.shape):
            raise WeightsError(
                f"shape mismatch for jaxclip parameter {name}: the weights give "
                f"{tuple(params[key].shape)}, the architecture needs {tuple(value.shape)}; "
                f"the --model (or inferred) architecture does not match the file"
            )
