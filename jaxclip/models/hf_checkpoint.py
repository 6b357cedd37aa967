"""Reading Hugging Face checkpoint directories straight into sharded parameters.

A directory holds ``config.json`` and one ``model.safetensors`` or several shards named by
``model.safetensors.index.json``. Tensors are opened lazily with ``safetensors.safe_open``
(numpy; bfloat16 through ml_dtypes) and never read whole: each device's shard of a parameter
is sliced out of the file, transposed/reshaped into jaxclip's layout and cast, inside the
callback of `jax.make_array_from_callback`. A host therefore holds at most one parameter's
worth of its own shards at a time, never the whole model, in any dtype.

Each parameter names where it comes from with a `Source` per layer: the tensor, how its axes
map onto ours (`LAYOUTS`), and, for fused tensors (K and V in one matrix), which rows it uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors needs)
import numpy as np
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
# How a checkpoint tensor (PyTorch Linear weights are (out, in)) maps onto a parameter:
#   copy         same axes
#   transpose    (out, in) -> (in, out)
#   split_heads  (heads*K, in) -> (in, heads, K)        q/k/v projections
#   merge_heads  (out, heads*K) -> (heads, K, out)      attention output projection
#   bias_heads   (heads*K,) -> (heads, K)
LAYOUTS = ("copy", "transpose", "split_heads", "merge_heads", "bias_heads")
_BLOB = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or misshapen tensors."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One checkpoint tensor (or a block of its rows) that fills one parameter or one layer."""

    name: str
    layout: str = "copy"
    head_dim: int = 0  # K, for the head layouts
    row_offset: int = 0  # first row of the tensor this parameter uses
    rows: int | None = None  # the tensor's full first dimension when only a block is used

    def expected_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The checkpoint tensor's shape for a parameter (one layer of it) of `shape`."""
        if self.layout == "copy":
            hf = tuple(shape)
        elif self.layout == "transpose":
            hf = (shape[1], shape[0])
        elif self.layout == "split_heads":
            hf = (shape[1] * shape[2], shape[0])
        elif self.layout == "merge_heads":
            hf = (shape[2], shape[0] * shape[1])
        elif self.layout == "bias_heads":
            hf = (shape[0] * shape[1],)
        else:
            raise ValueError(f"unknown layout {self.layout!r}; valid: {LAYOUTS}")
        return (self.rows if self.rows is not None else hf[0], *hf[1:])

    def read(self, tensor: Any, index: Sequence[tuple[int, int]]) -> np.ndarray:
        """The block `index` ((start, stop) per parameter axis) of the parameter, as numpy."""
        off, K = self.row_offset, self.head_dim

        def rows(a: int, b: int) -> slice:
            return slice(off + a, off + b)

        if self.layout == "copy":
            return tensor[(rows(*index[0]), *(slice(a, b) for a, b in index[1:]))]
        if self.layout == "transpose":
            (i0, i1), (o0, o1) = index
            return tensor[rows(o0, o1), i0:i1].T
        if self.layout == "split_heads":
            (d0, d1), (n0, n1), (k0, k1) = index
            block = tensor[rows(n0 * K, n1 * K), d0:d1]
            return block.T.reshape(d1 - d0, n1 - n0, K)[:, :, k0:k1]
        if self.layout == "merge_heads":
            (n0, n1), (k0, k1), (d0, d1) = index
            block = tensor[rows(d0, d1), n0 * K : n1 * K]
            return block.T.reshape(n1 - n0, K, d1 - d0)[:, k0:k1, :]
        (n0, n1), (k0, k1) = index  # bias_heads
        return tensor[rows(n0 * K, n1 * K)].reshape(n1 - n0, K)[:, k0:k1]


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a parameter comes from: one source, or one per layer along a leading axis."""

    sources: tuple[Source, ...]
    stacked: bool = False


def single(source: Source) -> Placement:
    return Placement((source,))


def per_layer(sources: Iterable[Source]) -> Placement:
    return Placement(tuple(sources), stacked=True)


class CheckpointDir:
    """The safetensors tensors of a Hugging Face model directory, opened lazily."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = sorted({self.dir / f for f in weight_map.values()})
            absent = [f.name for f in self.files if not f.exists()]
            if absent:
                raise FileNotFoundError(f"{index} names shards that are not there: {absent}")
        else:
            self.files = sorted(self.dir.glob("*.safetensors"))
            if not self.files:
                raise FileNotFoundError(f"no *.safetensors files (nor {INDEX}) in {self.dir}")
        self._handles = {f: safe_open(str(f), framework="numpy") for f in self.files}
        self._where: dict[str, Path] = {}
        for f, handle in self._handles.items():
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is no dict)
                self._where[name] = f

    def names(self) -> set[str]:
        return set(self._where)

    def tensor(self, name: str) -> Any:
        """A lazy slice: indexing it reads only the requested block from the file."""
        return self._handles[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensor(name).get_shape())

    def prefix(self, candidates: Sequence[str], probe: str) -> str:
        """The first of `candidates` under which the checkpoint has `probe`."""
        for prefix in candidates:
            if prefix + probe in self._where:
                return prefix
        tried = [p + probe for p in candidates]
        raise CheckpointError(f"{self.dir}: none of the tensors {tried} is in the checkpoint")


# ---------------------------------------------------------------------------------------------
# Checks, with the message built apart from the decision
# ---------------------------------------------------------------------------------------------


def _fit_message(where: Path, missing: list[str], unexpected: list[str], unfilled: list[str]):
    parts = []
    if missing:
        parts.append(f"missing tensors {missing}")
    if unexpected:
        parts.append(f"unexpected tensors {unexpected} (the loader does not map them)")
    if unfilled:
        parts.append(f"parameters no tensor fills {unfilled}")
    return (
        f"checkpoint {where} does not fit the model built from its config.json: "
        + "; ".join(parts)
        + ". Is config.json the one these weights were saved with?"
    )


def _shape_message(name: str, got: tuple, want: tuple, param: str, shape: tuple) -> str:
    return (
        f"tensor {name!r} has shape {got}, but parameter {param} of shape {shape} needs {want}: "
        "the weights and config.json disagree on a dimension (hidden_size, intermediate_size, "
        "heads, head_dim or vocab_size)"
    )


def check_fit(
    ckpt: CheckpointDir,
    placements: Mapping[str, Placement],
    shapes: Mapping[str, tuple[int, ...]],
    ignored: Iterable[str] = (),
) -> None:
    """Every parameter filled, every tensor used (bar `ignored`), every shape consistent."""
    used = {s.name for p in placements.values() for s in p.sources}
    names = ckpt.names()
    missing = sorted(used - names)
    unexpected = sorted(names - used - set(ignored))
    unfilled = sorted(set(shapes) - set(placements))
    if missing or unexpected or unfilled:
        raise CheckpointError(_fit_message(ckpt.dir, missing, unexpected, unfilled))
    for param, placement in placements.items():
        shape = shapes[param]
        if placement.stacked and len(placement.sources) != shape[0]:
            raise CheckpointError(f"{param}: {len(placement.sources)} layers for shape {shape}")
        layer_shape = shape[1:] if placement.stacked else shape
        for source in placement.sources:
            want = source.expected_shape(layer_shape)
            got = ckpt.shape(source.name)
            if got != want:
                raise CheckpointError(_shape_message(source.name, got, want, param, shape))


# ---------------------------------------------------------------------------------------------
# Placing
# ---------------------------------------------------------------------------------------------


def load_array(
    ckpt: CheckpointDir,
    placement: Placement,
    shape: tuple[int, ...],
    dtype: Any,
    sharding: jax.sharding.Sharding,
) -> jax.Array:
    """The parameter as a global array with `sharding`; each device's block is read alone.

    Devices that hold the same block (a replicated axis) share one read.
    """
    cache: dict[tuple, np.ndarray] = {}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))
        if bounds not in cache:
            if placement.stacked:
                (l0, l1), rest = bounds[0], bounds[1:]
                parts = [_read(ckpt, placement.sources[i], rest) for i in range(l0, l1)]
                block = np.stack(parts)
            else:
                block = _read(ckpt, placement.sources[0], bounds)
            cache[bounds] = np.ascontiguousarray(block, dtype=dtype)
        return cache[bounds]

    return jax.make_array_from_callback(shape, sharding, read)


def _read(ckpt: CheckpointDir, source: Source, bounds) -> np.ndarray:
    return source.read(ckpt.tensor(source.name), bounds)


# ---------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """sha256 of a file; free for a Hugging Face cache snapshot, whose files link to blobs
    named by their sha256."""
    target = path.resolve()
    if path.is_symlink() and _BLOB.fullmatch(target.name):
        return target.name
    hasher = hashlib.sha256()
    with open(target, "rb") as f:
        while block := f.read(chunk):
            hasher.update(block)
    return hasher.hexdigest()


def weights_sha256(files: Sequence[Path]) -> str:
    """One digest over the weight files: sha256 of 'name sha256' lines in name order."""
    lines = "".join(f"{f.name} {file_sha256(f)}\n" for f in sorted(files, key=lambda f: f.name))
    return hashlib.sha256(lines.encode()).hexdigest()
