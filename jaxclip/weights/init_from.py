"""``init.from``: a new run's initial parameters from a jaxclip workdir or a weights file.

The source may be a workdir (an import or any training run: its latest step's parameters,
never its optimizer state or data position) or a foreign file or directory (open_clip/OpenAI
``.safetensors``/``.pt``, a Hugging Face CLIPModel directory), converted on the fly for the
run's own architecture. Image position embeddings are resized when the run's image size
differs; any other difference in shape is an error naming the parameter. The trainer calls
this only when the run has no checkpoint of its own: resuming takes precedence.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxclip.checkpoint import checkpoint_dir
from jaxclip.weights import architectures as arch_lib
from jaxclip.weights import convert
from jaxclip.weights import workdir as workdir_lib
from jaxclip.weights.architectures import WeightsError
from jaxclip.weights.mapping import check_shapes
from jaxclip.weights.pos_embed import adapt_image_size


def source_params(cfg: ml_collections.ConfigDict, source: str | Path) -> dict:
    """Host (numpy) parameters of `source`, in the layout of `cfg`'s model."""
    source = Path(source)
    if checkpoint_dir(source).is_dir():
        _, params, step = workdir_lib.read_params(source)
        logging.info("init.from: parameters of step %d in %s", step, source)
        return params
    if source.is_dir() and (source / "config.json").is_file():
        return convert.read_foreign("hf", source).params
    if source.is_file() or (source.is_dir() and (source / convert.OPEN_CLIP_CONFIG).is_file()):
        arch = arch_lib.from_config(cfg, workdir_lib.vocab_rows(cfg))
        model = None if source.is_dir() else arch  # a bare file: read as the run's architecture
        return convert.read_foreign("open_clip", source, model).params
    raise WeightsError(
        f"init.from={str(source)!r} is neither a jaxclip workdir (with checkpoints/), a "
        f"Hugging Face CLIPModel directory, nor an open_clip/OpenAI weights file"
    )


def _place(value: np.ndarray, sharding: Any) -> jax.Array:
    """A global array from a host copy: every process holds it and gives each device its part."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def initial_params(
    cfg: ml_collections.ConfigDict, abstract_params: Mapping, shardings: Mapping
) -> dict:
    """Parameters from ``cfg.init["from"]``, checked against and placed like `abstract_params`."""
    source = cfg.init["from"]
    if not source:
        raise WeightsError("init.from is empty: there is nothing to initialize from")
    params = source_params(cfg, source)
    rows = abstract_params.get("image", {}).get("pos_embed")
    if rows is not None and "image" in params and params["image"]["pos_embed"].shape != rows.shape:
        logging.info("init.from: image position embeddings resized to %s", rows.shape)
        params = adapt_image_size(params, rows.shape[0])
    if "text" in params and "text" in abstract_params:
        workdir_lib.check_tokenizer_fits(cfg, params["text"]["token_embed"].shape[0])
    params = _restrict(params, abstract_params)
    check_shapes(params, abstract_params)
    return jax.tree.map(
        lambda value, abstract, sharding: _place(value, sharding).astype(abstract.dtype),
        params,
        dict(abstract_params),
        dict(shardings),
    )


def _restrict(params: Mapping, abstract: Mapping) -> dict:
    """The part of `params` the run's model has (a CLIP source for a LIFT run: no text)."""
    out = {}
    for key, value in abstract.items():
        if key in params:
            out[key] = _restrict(params[key], value) if isinstance(value, Mapping) else params[key]
    return out
